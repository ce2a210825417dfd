"""``moslim launch slurm``: an sbatch script around any stage command, and whole pipelines.

One job = one stage. The script asks for ``nodes`` nodes and one task per node; each task is the
node wrapper (``moslim_mega.launch.node``) running ``torchrun`` with a c10d rendezvous hosted on
the first node of the allocation, so node ranks come from the rendezvous and global ranks from
torchrun's environment (read in one place: ``moslim_mega.parallel.dist``).

Preemption / time limit: ``--requeue --signal=B:USR1@<signal_seconds>``. The batch shell runs
``srun`` in the background and ``wait``s (a trap runs only once the foreground command returns),
forwards USR1/TERM to srun, and after the step ends reads the marker file the ranks write when
they stopped for a signal: then ``scontrol requeue`` while ``SLURM_RESTART_COUNT`` is below
``max_requeues``; the requeued run resumes from the checkpoint (``checkpoint.resume=auto``).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from ..config import ConfigError, LaunchConfig, SlurmConfig, _build, load_config

PREEMPT_MARKER = "PREEMPTED"
SLURM_DIR = "slurm"  # under the stage's --out: scripts, the job's output, per-restart node logs


class LaunchError(ConfigError):
    """A launch that cannot be written or submitted; the message names the field or command."""


# ---- the stage command ---------------------------------------------------------------------------
def stage_out(stage_argv: list[str]) -> str:
    """The stage's ``--out`` (validated by the real CLI parser, so a typo fails here, not on the
    cluster hours later)."""
    from ..cli import build_parser

    if not stage_argv:
        raise LaunchError("moslim launch slurm: no stage command after `--` (e.g. -- rm train --out runs/rm)")
    if stage_argv[0] in ("launch", "plan", "config", "profile", "serve"):
        raise LaunchError(f"moslim launch slurm: {stage_argv[0]!r} is not a stage to submit")
    try:
        args = build_parser().parse_args(stage_argv)
    except SystemExit as e:  # argparse already printed why
        raise LaunchError(f"moslim launch slurm: not a valid stage command: {' '.join(stage_argv)}") from e
    out = getattr(args, "out", None)
    if not out:
        raise LaunchError(f"moslim launch slurm: stage {' '.join(stage_argv[:2])!r} has no --out")
    return out


def stage_name(stage_argv: list[str]) -> str:
    words = [w for w in stage_argv[:2] if not w.startswith("-")]
    return "-".join(words[:2] if len(words) > 1 and words[0] in ("sft", "rm", "policy", "eval") else words[:1])


def stage_config_slurm(stage_argv: list[str], flags: dict) -> SlurmConfig:
    """``launch.slurm`` of the stage's own ``--config`` file and ``launch.slurm.*`` overrides,
    then the launch command's options (``flags``: field → value)."""
    config = None
    if "--config" in stage_argv:
        i = stage_argv.index("--config")
        config = stage_argv[i + 1] if i + 1 < len(stage_argv) else None
    stage_over = [a for a in stage_argv if a.startswith("launch.")]
    return dataclasses.replace(load_config(config, stage_over).launch.slurm, **flags)


# ---- the script -------------------------------------------------------------------------------------
def nproc(sc: SlurmConfig) -> int:
    return sc.nproc_per_node or sc.gpus_per_node or 1


def _sbatch_lines(sc: SlurmConfig, name: str, logs: str) -> list[str]:
    opts = [f"--job-name={sc.job_name or name}", f"--nodes={sc.nodes}", "--ntasks-per-node=1"]
    if sc.gpus_per_node:
        opts.append(f"--gpus-per-node={sc.gpus_per_node}")
    if sc.cpus_per_task:
        opts.append(f"--cpus-per-task={sc.cpus_per_task}")
    for key in ("partition", "account", "qos"):
        if getattr(sc, key):
            opts.append(f"--{key}={getattr(sc, key)}")
    opts += [f"--time={sc.time}", f"--output={logs}/%x-%j.out", "--open-mode=append", "--requeue"]
    if sc.signal_seconds:
        opts.append(f"--signal=B:USR1@{sc.signal_seconds}")
    opts += list(sc.extra_sbatch)
    return [f"#SBATCH {o}" for o in opts]


def _srun(sc: SlurmConfig) -> str:
    parts = ["srun", "--nodes=$SLURM_NNODES", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
             '--output="$LOG_DIR/node%n.log"']
    if sc.container_image:
        parts.append(f"--container-image={shlex.quote(sc.container_image)}")
        if sc.container_mounts:
            parts.append(f"--container-mounts={shlex.quote(sc.container_mounts)}")
        parts.append("--container-workdir=\"$PWD\"")
    return " ".join(parts)


def node_task_lines(stage_argv: list[str], sc: SlurmConfig) -> list[str]:
    """The shell text of one node's task: the node wrapper around torchrun around the stage.
    It reads SLURM_NNODES, MASTER_ADDR, MASTER_PORT and SLURM_JOB_ID from the environment (the
    batch script sets them; tests/launch runs the same lines as two agents on one host)."""
    return [
        f"  {sc.python} -m moslim_mega.launch.node -- \\",
        f"  {sc.python} -m torch.distributed.run --nnodes=$SLURM_NNODES --nproc_per_node={nproc(sc)} \\",
        '  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \\',
        "  --max_restarts=0 -m moslim_mega.cli \\",
        "  " + " ".join(shlex.quote(a) for a in stage_argv),
    ]


def render_script(stage_argv: list[str], sc: SlurmConfig) -> str:
    """The sbatch script of one stage (deterministic text: the README shows it)."""
    out = stage_out(stage_argv)
    logs = f"{out}/{SLURM_DIR}"
    name = f"moslim-{stage_name(stage_argv)}"
    q = shlex.quote
    stage = " ".join(q(a) for a in stage_argv)
    env = [f"export {e}" for e in sc.env]
    if sc.socket_ifname:
        env += [f"export NCCL_SOCKET_IFNAME={sc.socket_ifname}", f"export GLOO_SOCKET_IFNAME={sc.socket_ifname}"]
    n = nproc(sc)
    threads = f"$(( ${{SLURM_CPUS_PER_TASK:-{n}}} >= {n} ? ${{SLURM_CPUS_PER_TASK:-{n}}} / {n} : 1 ))"
    lines = [
        "#!/bin/bash",
        f"# moslim launch slurm: {stage}",
        *_sbatch_lines(sc, name, logs),
        "set -uo pipefail",
        "",
        "# ---- environment",
        *sc.setup,
        f"OUT={q(out)}",
        'RESTART="${SLURM_RESTART_COUNT:-0}"',
        f'LOG_DIR="$OUT/{SLURM_DIR}/$SLURM_JOB_ID/restart_$RESTART"',
        'mkdir -p "$LOG_DIR"',
        f'export MOSLIM_PREEMPT_MARKER="$OUT/{PREEMPT_MARKER}"  # written by rank 0 when it stopped for a signal',
        'rm -f "$MOSLIM_PREEMPT_MARKER"',
        "",
        "# ---- rendezvous: c10d store on the first node of the allocation",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        f"export MASTER_PORT={sc.port}",
        f"export OMP_NUM_THREADS={threads}",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        *env,
        'echo "moslim: job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# ---- one task per node: the node wrapper runs torchrun and forwards USR1/TERM to the ranks",
        f'{_srun(sc)} \\',
        *node_task_lines(stage_argv, sc)[:-1],
        node_task_lines(stage_argv, sc)[-1] + " &",
        "SRUN_PID=$!",
        "# The batch shell runs a trap only between commands: wait in the background, pass signals on.",
        "forward() { echo \"moslim: $1 received, passing it to the ranks\"; kill -s \"$1\" \"$SRUN_PID\" 2>/dev/null; }",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "while :; do",
        '  wait "$SRUN_PID"; RC=$?',
        '  kill -0 "$SRUN_PID" 2>/dev/null || break  # still running: wait was interrupted by a trap',
        "done",
        "",
        "# ---- preempted (checkpoint written): requeue while the budget allows",
        'if [ -f "$MOSLIM_PREEMPT_MARKER" ]; then',
        '  echo "moslim: preempted: $(cat "$MOSLIM_PREEMPT_MARKER")"',
        f'  if [ "$RESTART" -lt {sc.max_requeues} ]; then',
        '    echo "moslim: requeueing job $SLURM_JOB_ID (restart $((RESTART + 1)))"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "  fi",
        f'  echo "moslim: requeue budget spent ({sc.max_requeues}); resubmit to resume from the checkpoint" >&2',
        "  exit 75",
        "fi",
        'exit "$RC"',
        "",
    ]
    return "\n".join(lines)


# ---- submission ---------------------------------------------------------------------------------------
def sbatch_argv(script: Path, dependency: str = "") -> list[str]:
    argv = ["sbatch", "--parsable"]
    if dependency:
        argv += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    return argv + [str(script)]


def submit(script: Path, dependency: str = "") -> str:
    """sbatch the script; its job id."""
    argv = sbatch_argv(script, dependency)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: run on a Slurm login node (or use --dry-run)") from None
    if done.returncode != 0:
        raise LaunchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def write_script(stage_argv: list[str], sc: SlurmConfig, name: str | None = None) -> Path:
    out = Path(stage_out(stage_argv))
    path = out / SLURM_DIR / f"{name or 'moslim-' + stage_name(stage_argv)}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)  # --output's directory must exist at job start
    path.write_text(render_script(stage_argv, sc))
    path.chmod(0o755)
    return path


def launch_stage(stage_argv: list[str], flags: dict, dry_run: bool) -> str:
    """Write (or print) and submit one stage; returns what to print."""
    sc = stage_config_slurm(stage_argv, flags)
    if dry_run:
        deps = f" --dependency={sc.dependency} --kill-on-invalid-dep=yes" if sc.dependency else ""
        script = render_script(stage_argv, sc)
        return f"# sbatch --parsable{deps} {stage_out(stage_argv)}/{SLURM_DIR}/moslim-{stage_name(stage_argv)}.sbatch\n{script}"
    job = submit(write_script(stage_argv, sc), sc.dependency)
    return f"submitted job {job}: {' '.join(stage_argv)}"


# ---- pipelines ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PipelineStage:
    name: str
    argv: list[str]
    slurm: SlurmConfig
    plan: dict | None


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(text: str, dirs: dict[str, str], where: str) -> str:
    def sub(m):
        if m.group(1) not in dirs:
            raise LaunchError(f"{where}: {{{m.group(1)}}} is not an earlier stage or 'out' (known: {', '.join(dirs)})")
        return dirs[m.group(1)]

    return _PLACEHOLDER.sub(sub, text)


def load_recipe(path: str | Path, flags: dict | None = None) -> tuple[str, list[PipelineStage]]:
    """A pipeline recipe (configs/paper/*.yaml): ``name``, ``out``, ``config`` (the stages' config
    file, whose ``launch.slurm`` is the base), ``slurm`` (over it, for every stage) and ``stages``: a list of {name, command, overrides,
    slurm, plan}. ``{out}`` and ``{<earlier stage>}`` in commands/overrides become output dirs;
    each stage's ``--out`` is ``<out>/<name>``."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"--recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LaunchError(f"--recipe {path}: not valid YAML ({e}); quote commands/overrides holding {{stage}}") from None
    unknown = set(data) - {"name", "out", "config", "slurm", "stages", "description"}
    if unknown:
        raise LaunchError(f"{path}: unknown recipe keys {sorted(unknown)}")
    if not data.get("stages"):
        raise LaunchError(f"{path}: no 'stages'")
    out = str(data.get("out") or f"runs/{data.get('name', path.stem)}")
    # launch.slurm of the stages' config file, then the recipe's slurm, then each stage's.
    base = dataclasses.asdict(load_config(data.get("config")).launch.slurm)
    base = _build(SlurmConfig, {**base, **(data.get("slurm") or {})}, "slurm")
    dirs = {"out": out}
    stages = []
    for i, st in enumerate(data["stages"]):
        where = f"{path}: stages[{i}]"
        unknown = set(st) - {"name", "command", "overrides", "slurm", "plan"}
        if unknown or "name" not in st or "command" not in st:
            raise LaunchError(f"{where}: needs name and command (and optionally overrides, slurm, plan); "
                              f"unknown keys {sorted(unknown)}")
        name = st["name"]
        if name in dirs:
            raise LaunchError(f"{where}: stage name {name!r} used twice (or is 'out')")
        argv = [_expand(a, dirs, where) for a in shlex.split(st["command"])]
        if data.get("config") and "--config" not in argv:
            argv += ["--config", data["config"]]
        argv += ["--out", f"{out}/{name}"]
        argv += [_expand(str(o), dirs, where) for o in st.get("overrides") or []]
        sc = _build(SlurmConfig, {**dataclasses.asdict(base), **(st.get("slurm") or {})}, f"stages[{i}].slurm")
        sc = dataclasses.replace(sc, **(flags or {}))  # the launch command's options win
        sc = dataclasses.replace(sc, job_name=sc.job_name or f"{data.get('name', path.stem)}-{name}")
        stages.append(PipelineStage(name, argv, sc, st.get("plan")))
        dirs[name] = f"{out}/{name}"
    return out, stages


def check_plan(stage: PipelineStage) -> tuple[bool, str]:
    """Run the memory planner for the stage's layout (``plan:`` of the recipe); (fits, text)."""
    from ..parallel.planner import format_plan, plan

    p = dict(stage.plan)
    model = p.pop("model")
    kind = p.pop("stage", "rm")
    tp = int(p.pop("tp", 1))
    gpus = stage.slurm.gpus_per_node or 1
    dp = (stage.slurm.nodes * gpus) // tp
    allowed = {"seq", "micro_batch", "rollout_seqs", "gpu_gb", "logprob_chunk"}
    if set(p) - allowed:
        raise LaunchError(f"stage {stage.name}: unknown plan keys {sorted(set(p) - allowed)}")
    result = plan(model, stage.slurm.nodes, gpus, tp, dp, kind, **p)
    return result.fits, format_plan(result)


def launch_pipeline(recipe: str, flags: dict, dry_run: bool, force: bool) -> str:
    """Check every stage with the planner, then submit them as afterok-dependent jobs."""
    out, stages = load_recipe(recipe, flags)
    lines = []
    for st in stages:
        if st.plan:
            fits, text = check_plan(st)
            verdict = "fits" if fits else "DOES NOT FIT"
            lines.append(f"# plan {st.name}: {verdict} ({st.plan['model']}, {st.slurm.nodes}×{st.slurm.gpus_per_node} GPUs, "
                         f"tp={st.plan.get('tp', 1)})")
            if not fits and not force:
                raise LaunchError(f"stage {st.name}: the planner says this layout does not fit "
                                  f"(pass --force to submit anyway):\n{text}")
    previous = ""
    for st in stages:
        dep = f"afterok:{previous}" if previous else ""
        if dry_run:
            dep_text = f" --dependency=afterok:<{stages[stages.index(st) - 1].name} job id> --kill-on-invalid-dep=yes" if dep else ""
            lines.append(f"# ---- stage {st.name}\n# sbatch --parsable{dep_text} {out}/{st.name}/{SLURM_DIR}/"
                         f"{st.slurm.job_name}.sbatch")
            lines.append(render_script(st.argv, st.slurm))
            previous = "dry"
        else:
            previous = submit(write_script(st.argv, st.slurm, st.slurm.job_name), dep)
            lines.append(f"submitted {st.name}: job {previous}" + (f" ({dep})" if dep else ""))
    return "\n".join(lines)
