"""A real one-host Slurm cluster for the tests: munged + slurmctld + slurmd on localhost.

Everything lives in one temporary directory: ``slurm.conf`` (CPUs=2, select/cons_tres,
proctrack/linuxproc, no cgroups, no accounting), a fresh munge key, state/spool directories,
logs, and the munge socket. The daemons run in the foreground as children of the test process
(so the leftover-process guard sees them) and ``stop()`` ends them and checks they are gone.
Clients (sbatch, squeue, scontrol, scancel, srun) find the cluster through ``SLURM_CONF``.

Debian's ``slurm-wlm`` runs one ``slurmd`` per host, so this is a one-node cluster; the
multi-node path is tested through the generated script's torchrun rendezvous instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "localhost"


def missing_reason() -> str | None:
    """Why a real Slurm cannot run here (None: it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"Slurm/munge daemons not installed ({', '.join(missing)}); `make test` installs them as root with apt-get"
    if os.geteuid() != 0:
        return "the one-host Slurm cluster runs its daemons as root; not root here"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- configuration ---------------------------------------------------------------------
    def _write_files(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(f"""\
ClusterName=moslimtest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self._write_files()
        r = self.root
        sock = r / "munge" / "munge.socket"
        self._spawn("munged", [_daemon("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={r}/munge/munge.key",
                               f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                               f"--seed-file={r}/munge/munged.seed"])
        self._wait(lambda: sock.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_daemon("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "node idle")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _node_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}) at start-up:\n{self.logs()}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not cond():
            if time.time() > deadline:
                raise TimeoutError(f"Slurm test cluster: {what} not reached in {timeout} s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, end the daemons (SIGTERM, then SIGKILL) and check they are gone."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
            self._wait_jobs_gone(20)
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        alive = [n for n, p in self.procs.items() if p.poll() is None]
        assert not alive, f"Slurm daemons still running after stop: {alive}"

    def _wait_jobs_gone(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.3)

    # ---- helpers for tests -----------------------------------------------------------------
    def run(self, *argv: str, check: bool = True) -> str:
        out = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, Reason, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id)
        fields = {}
        for tok in text.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)
