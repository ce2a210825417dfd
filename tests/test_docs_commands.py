"""Every shell block of the documentation is a promise that this test keeps.

Documents: README.md, docs/*.md and each top-level folder's README.md. A fenced block is a shell
block when its language is bash/sh/shell/console, or when it has none and a line starts with a
command (`moslim`, `make`, `python`, `pytest`, `launchers/...`). Each shell block is either

* run: every command, as written, from a fresh shell (an empty environment: HOME, a system-only
  PATH, OMP_NUM_THREADS=1; then `source .venv/bin/activate`, as the README says) in a scratch
  copy of the repo, in document order, after a shrunk stand-in for `make demo` (the Makefile's
  own demo recipe). `moslim` commands that take config overrides get SHRINK appended (sizes and
  step budgets only, never a key the command sets itself); or
* marked `<!-- not-run: REASON -->` on the line before its opening fence (other `<!-- ... -->`
  lines may stand between the two) and only checked statically.

Every shell block, run or not, is checked statically: each `moslim` command (typed directly, via
launchers/torchrun.sh, `python -m moslim_mega.cli`, or as the stage after `launch slurm --`) parses
with the real argparse parser using exact option names (argparse would accept `--val` for
`--val-fraction`; a document must not); every `a.b=value` key is a config key (and, in a full
command, a valid value); every path into the repo (configs/..., launchers/..., tests/...) exists;
`make` targets and variables exist; `python SCRIPT --flag` scripts define the flag. A usage line
with `[...]` placeholders (a synopsis) is checked for its subcommands, option names and keys.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moslim_mega.cli import build_parser
from moslim_mega.config import ConfigError, field_docs, load_config

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
ACTIVATE = "source .venv/bin/activate"  # what the README tells a new shell to run
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
COMMAND_WORDS = {"moslim", "make", "python", "python3", "pytest", "torchrun"}
NOT_RUN = re.compile(r"^<!--\s*not-run\b:?\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=")
# Only these leaves take config overrides that size a run; `rm eval`/`rm score` take mapping
# overrides and `config show` trains nothing.
SHRINKABLE = {("demo",), ("compare",), ("world", "build"), ("rm", "train"), ("sft", "train"), ("policy", "train")}
SHRINK = [
    # A world of 40 RM prompts (160 rated responses) and tiny one-layer models.
    "world.num_rm_prompts=40", "world.num_rm_eval_prompts=8", "world.num_sft=40", "world.num_policy_prompts=20",
    *(f"{m}.model.{k}={v}" for m in ("rm", "sft")
      for k, v in (("hidden_size", 32), ("num_layers", 1), ("num_heads", 2), ("intermediate_size", 64))),
    # 80 RM steps and 20 policy steps, so that the README's checkpoint.every=50 / =20 write a checkpoint.
    "rm.epochs=1", "rm.batch_size=2", "sft.epochs=1", "sft.batch_size=8",
    "policy.steps=20", "policy.prompts_per_step=2", "policy.samples_per_prompt=2", "policy.eval_every=0",
    "eval.prompts_per_target=2", "compare.dpa_iterations=1", "compare.dpa_prompts_per_iter=4",
    "compare.dpa_samples=2", "compare.rsoup_lambda_steps=2",
    # Step budgets, not the clock, decide what runs (the machine may be loaded); one thread each.
    "rm.max_minutes=0", "sft.max_minutes=0", "policy.max_minutes=0", "compare.dpa_sft_max_minutes=0",
    "run.num_threads=1",
]
CONFIG_KEYS = {key for key, *_ in field_docs()}


def doc_files() -> list[Path]:
    folders = sorted(p for p in ROOT.glob("*/README.md")
                     if not p.parent.name.startswith(".") and p.parent.name not in {"runs", "data", "build", "dist"})
    return [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), *folders]


@dataclass
class Block:
    doc: str  # path relative to the repo root
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]
    not_run: str | None  # the marker's reason
    commands: list["Command"] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS or (self.lang == "" and any(c.is_command for c in self.commands))


@dataclass
class Command:
    where: str
    text: str  # one logical line (continuations joined), comment removed

    @property
    def argv(self) -> list[str]:
        try:
            words = shlex.split(self.text)
        except ValueError:  # e.g. an apostrophe in prose of a language-less block: not a command
            return []
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value command
            words.pop(0)
        return words[:-1] if words[-1:] == ["&"] else words

    @property
    def is_command(self) -> bool:
        argv = self.argv
        return bool(argv) and (argv[0] in COMMAND_WORDS or re.match(r"^launchers/.*\.sh$", argv[0]) is not None)

    @property
    def synopsis(self) -> bool:
        """A usage line: optional parts in brackets or `...` (an `a.b=[x,y]` value is not one)."""
        return any(w.startswith("[") or (w.endswith("]") and "=" not in w) or w.endswith("...") for w in self.argv)


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` starting a word outside quotes)."""
    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                i += 1
        elif ch in "'\"":
            quote = ch
        elif ch == "\\":
            i += 1
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def logical_commands(where_doc: str, first_line: int, lines: list[str]) -> list[Command]:
    out, buf, start = [], "", None
    for n, raw in enumerate(lines):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = n if start is None else start
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        text = strip_comment(buf + line).strip()
        if text:
            out.append(Command(f"{where_doc}:{first_line + 1 + start}", text))
        buf, start = "", None
    return out


def parse_blocks(doc: str, text: str) -> tuple[list[Block], list[str]]:
    """Fenced blocks of a Markdown text and the problems of its not-run markers."""
    lines, blocks, problems, used = text.splitlines(), [], [], set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and not lines[j].strip().strip(fence[0])):
            j += 1
        if j == len(lines):
            problems.append(f"{doc}:{i + 1}: code fence never closed")
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:j]]
        reason, k = None, i - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):
            mark = NOT_RUN.match(lines[k].strip())
            if mark:
                used.add(k)
                reason = mark.group(1)
                if not reason:
                    problems.append(f"{doc}:{k + 1}: a not-run marker must say why: <!-- not-run: needs a GPU -->")
                break
            k -= 1
        block = Block(doc, i + 1, lang.lower(), body, reason)
        block.commands = logical_commands(doc, i + 1, body)
        blocks.append(block)
        i = j + 1
    for k, line in enumerate(lines):
        if NOT_RUN.match(line.strip()) and k not in used:
            problems.append(f"{doc}:{k + 1}: not-run marker is not right before a code block")
    return blocks, problems


def indented_code(doc: str, text: str) -> list[str]:
    """Indented (4-space) code blocks: invisible to this test, so they are refused."""
    problems, in_fence, prev_blank, last_text = [], None, True, ""
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and in_fence is None:
            in_fence = m.group(2)
        elif in_fence and line.strip().startswith(in_fence) and not line.strip().strip(in_fence[0]):
            in_fence = None
        elif in_fence is None and line.startswith("    ") and line.strip() and prev_blank \
                and not last_text.startswith((" ", "\t", "- ", "* ")) and not re.match(r"^\d+\. ", last_text):
            problems.append(f"{doc}:{n}: indented code block; use a fenced ```bash block (and a not-run "
                            f"marker if it cannot run here) so the docs test sees it")
        if line.strip():
            if not (line.startswith("    ") and prev_blank) or in_fence:
                last_text = line
            prev_blank = False
        else:
            prev_blank = True
    return problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in doc_files():
        text = path.read_text()
        got, probs = parse_blocks(str(path.relative_to(ROOT)), text)
        blocks += [b for b in got if b.is_shell]
        problems += probs + indented_code(str(path.relative_to(ROOT)), text)
    return blocks, problems


# ---------------------------------------------------------------- static checks

def _leaf(argv: list[str]):
    """(leaf parser, subcommand words, remaining words) of a moslim command, or a problem string."""
    parser, words, rest = build_parser(), [], list(argv)
    while True:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            return parser, tuple(words), rest
        choices = subs[0].choices
        if not rest or rest[0] not in choices:
            got = rest[0] if rest else "nothing"
            return f"`moslim {' '.join(words)}` has no subcommand {got!r} (choices: {', '.join(choices)})"
        words.append(rest.pop(0))
        parser = choices[words[-1]]


def _clean_synopsis(argv: list[str]) -> list[str]:
    out = []
    for w in argv:
        w = w.strip("[]")
        if w and w != "..." and not w.endswith("..."):
            out.append(w)
    return out


def check_moslim(argv: list[str], synopsis: bool) -> list[str]:
    if synopsis:
        argv = _clean_synopsis(argv)
    leaf = _leaf(argv)
    if isinstance(leaf, str):
        return [leaf]
    parser, words, rest = leaf
    name = "moslim " + " ".join(words)
    problems, stage, pipeline = [], None, None
    if words == ("launch", "slurm"):  # options, then `-- STAGE ARGS` or `pipeline --recipe FILE`
        for n, w in enumerate(rest):
            if w == "--":
                rest, stage = rest[:n], rest[n + 1:]
                break
            if w == "pipeline":
                rest, pipeline = rest[:n], rest[n + 1:]
                break
    for w in rest:
        if w.startswith("--") and w.split("=", 1)[0] not in parser._option_string_actions:
            problems.append(f"`{name}` has no option {w.split('=', 1)[0]}")
        key = OVERRIDE.match(w)
        if key and key.group(1) not in CONFIG_KEYS and not (synopsis and key.group(1) == "a.b"):
            problems.append(f"`{name}`: {key.group(1)} is not a config key (`moslim config doc` lists them)")
    if pipeline is not None:
        problems += [f"`{name} pipeline` has no option {w}" for w in pipeline
                     if w.startswith("--") and w not in ("--recipe", "--force")]
    if synopsis:
        return problems
    if stage is not None:
        problems += check_moslim(stage, synopsis=False)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit:
        problems.append(f"`{name}` does not parse: {err.getvalue().strip().splitlines()[-1]}")
    overrides = [w for w in rest if OVERRIDE.match(w)]
    if overrides and not problems:
        try:
            load_config(None, overrides)
        except ConfigError as e:
            problems.append(f"`{name}`: {e}")
    return problems


def check_paths(argv: list[str]) -> list[str]:
    """Paths into the repo (first component a tracked top-level folder) must exist."""
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} - {"runs", "data"}
    problems = []
    for w in argv:
        for cand in (w, w.split("=", 1)[-1]):
            cand = cand.strip("[]")
            if "/" in cand and cand.split("/", 1)[0] in tops and not (ROOT / cand).exists():
                problems.append(f"{cand} does not exist in the repo")
    return problems


def check_make(argv: list[str]) -> list[str]:
    mk = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", mk, re.M))
    variables = set(re.findall(r"^(\w+)\s*[?:+]?=", mk, re.M))
    problems = []
    for w in argv[1:]:
        if "=" in w:
            if w.split("=", 1)[0] not in variables:
                problems.append(f"the Makefile has no variable {w.split('=', 1)[0]}")
        elif not w.startswith("-") and w not in targets:
            problems.append(f"the Makefile has no target {w!r}")
    return problems


def check_python(argv: list[str]) -> list[str]:
    if argv[1:2] == ["-m"]:
        module, rest = argv[2], argv[3:]
        if module == "moslim_mega.cli":
            return check_moslim(rest, synopsis=False)
        if module == "torch.distributed.run" and "moslim_mega.cli" in rest:
            return check_moslim(rest[rest.index("moslim_mega.cli") + 1:], synopsis=False)
        if module.startswith("moslim_mega"):
            base = ROOT / module.replace(".", "/")
            if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
                return [f"no module {module} in the repo"]
        return []
    script = ROOT / argv[1]
    if not script.is_file():
        return []  # check_paths names it
    # The script's folder too: benchmark scripts share options through a helper module there.
    source = "\n".join(f.read_text() for f in sorted(script.parent.glob("*.py")))
    flags = [w.split("=", 1)[0] for w in argv[2:] if w.startswith("--")]
    return [f"{argv[1]} has no option {f}" for f in flags if f'"{f}"' not in source and f"'{f}'" not in source]


def check_command(cmd: Command) -> list[str]:
    try:
        shlex.split(cmd.text)
    except ValueError as e:
        return [f"{cmd.where}: not valid shell words ({e})  [{cmd.text}]"]
    argv = cmd.argv
    if not argv:  # a bare VAR=value
        return []
    problems = check_paths(argv)
    if argv[0] in ("moslim", ".venv/bin/moslim"):
        problems += check_moslim(argv[1:], cmd.synopsis)
    elif re.match(r"^launchers/.*\.sh$", argv[0]):
        if not argv[1:2] or not argv[1].isdigit():
            problems.append(f"{argv[0]} NPROC: expected a process count, got {argv[1:2]}")
        problems += check_moslim(argv[2:], cmd.synopsis)
    elif argv[0] == "make":
        problems += check_make(argv)
    elif argv[0] in ("python", "python3") and len(argv) > 1:
        problems += check_python(argv)
    return [f"{cmd.where}: {p}  [{cmd.text}]" for p in problems]


def test_every_documented_command_parses_and_its_paths_exist():
    blocks, problems = all_blocks()
    assert blocks, "no shell blocks found: the block parser is broken"
    for block in blocks:
        for cmd in block.commands:
            problems += check_command(cmd)
            if cmd.is_command and cmd.synopsis and block.not_run is None:
                problems.append(f"{cmd.where}: a synopsis cannot run; mark its block <!-- not-run: synopsis -->")
    assert not problems, "documented commands that no longer work:\n" + "\n".join(problems)


ROTTEN = """
```bash
moslim rm train --cofnig configs/rm_world.yaml --out runs/rm
moslim rm trian --out runs/rm
moslim rm train --out runs/rm rm.nope=1
moslim rm train --out runs/rm rm.epochs=many
moslim rm train --config configs/missing.yaml --out runs/rm
moslim data build-rm --val 0.1 --datatype 4 --out runs/x
moslim launch slurm --dry-run -- rm train --bogus --out x
moslim world build --out DIR [--confg FILE]
make demoo ALGOO=ppo
launchers/torchrun.sh 2 sft train --out x
python benchmarks/trl_rloo_side_by_side.py --no-such-flag
```

<!-- not-run: -->
```bash
moslim config doc
```
<!-- not-run: far away -->

text
"""


def test_the_checker_catches_rotten_commands():
    """Each line of ROTTEN breaks a different rule; the checker must name every one."""
    blocks, problems = parse_blocks("rotten.md", ROTTEN)
    found = [check_command(c) for c in blocks[0].commands]
    expected = ["no option --cofnig", "no subcommand 'trian'", "rm.nope is not a config key", "rm.epochs",
                "configs/missing.yaml does not exist", "no option --val", "no option --bogus", "no option --confg",
                "no target 'demoo'", "does not parse", "has no option --no-such-flag"]
    assert len(blocks[0].commands) == len(expected)
    for cmd, probs, want in zip(blocks[0].commands, found, expected):
        assert any(want in p for p in probs), f"{cmd.text!r}: expected a problem with {want!r}, got {probs}"
    assert any("no variable ALGOO" in p for p in found[8])
    assert [b.not_run for b in blocks] == [None, ""]
    assert any("must say why" in p for p in problems) and any("not right before a code block" in p for p in problems)
    assert indented_code("x.md", "text\n\n    python x.py\n\n- item\n\n    more of the item\n") == [
        "x.md:3: indented code block; use a fenced ```bash block (and a not-run marker if it cannot run "
        "here) so the docs test sees it"]


def test_markers_and_synopses_are_read():
    text = ("<!-- not-run: needs a GPU -->\n<!-- other:start -->\n```bash\nmoslim plan --paper-table\n```\n\n"
            "```\nmoslim world build --out DIR [--config FILE] [a.b=value ...]\n```\n")
    blocks, problems = parse_blocks("m.md", text)
    assert not problems and [b.not_run for b in blocks] == ["needs a GPU", None]
    assert blocks[1].is_shell and blocks[1].commands[0].synopsis and not blocks[0].commands[0].synopsis
    assert check_command(blocks[1].commands[0]) == []
    assert not Command("x", "moslim world build --out d prefs.dimensions=[helpfulness,honesty]").synopsis


# ---------------------------------------------------------------- running them

def with_shrink(cmd: Command) -> str:
    argv = cmd.argv
    moslim = argv[2:] if argv[0].startswith("launchers/") else argv[1:]
    leaf = _leaf(moslim)
    if isinstance(leaf, str) or leaf[1] not in SHRINKABLE:
        return cmd.text
    own = {m.group(1) for w in moslim if (m := OVERRIDE.match(w))}
    extra = [o for o in SHRINK if o.split("=", 1)[0] not in own]
    return cmd.text + " " + " ".join(shlex.quote(o) for o in extra)


def make_demo_command() -> str:
    """The Makefile's `demo` recipe with its variables' defaults (what `make demo` runs)."""
    mk = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+)\s*\?=\s*(\S+)", mk, re.M))
    recipe = re.search(r"^demo:.*\n\t(.+)$", mk, re.M).group(1)
    return re.sub(r"\$\((\w+)\)", lambda m: defaults[m.group(1)], recipe)


def test_readme_says_how_to_reach_the_tools():
    """A new shell has no `moslim` on PATH: the README says so right after the two commands, and
    the run test below activates the venv with exactly the line it gives."""
    readme = (ROOT / "README.md").read_text()
    two_commands = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert ACTIVATE in two_commands and ".venv/bin/moslim" in two_commands, (
        "README.md, section Two commands: say how to reach the tools in a new shell "
        f"(`{ACTIVATE}` or `.venv/bin/moslim`)")


@pytest.mark.slow
def test_documented_commands_run_from_a_fresh_shell(tmp_path):
    if not (VENV / "bin" / "activate").exists():
        pytest.skip(f"no {VENV}: the documented commands run in the project's venv (`make install` creates it)")
    work, home = tmp_path / "repo", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    for entry in ROOT.iterdir():  # a scratch checkout: the repo's files, its own runs/ and data/
        if not entry.name.startswith(".") and entry.name not in {"runs", "data"}:
            (work / entry.name).symlink_to(entry)
    (work / ".venv").symlink_to(VENV)
    # What a new terminal has, plus one thread each (the suite shares a small machine).
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def shell(line: str, cwd: Path, activate: bool = True) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        script = f"{ACTIVATE} && {line}" if activate else line
        proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        return proc, time.monotonic() - t0

    # The venv must run this checkout's code, or the test would pass on stale code.
    (home / ".venv").symlink_to(VENV)
    proc, _ = shell('python -c "import moslim_mega; print(moslim_mega.__file__)"', home)
    assert proc.returncode == 0, f"`import moslim_mega` fails in {VENV}: {proc.stderr[-2000:]}"
    where = Path(proc.stdout.strip()).resolve()
    assert where.is_relative_to(ROOT), f"{VENV} imports moslim_mega from {where}, not {ROOT}: `make install` here"

    blocks, _ = all_blocks()
    run, skipped = [b for b in blocks if b.not_run is None], [b for b in blocks if b.not_run is not None]
    assert run, "no runnable block: every documented command is marked not-run"
    setup = Command("Makefile:demo", make_demo_command())
    timings = []
    for block, cmd, activate in [(None, setup, False)] + [(b, c, True) for b in run for c in b.commands]:
        line = with_shrink(cmd)
        proc, secs = shell(line, work, activate)
        timings.append((secs, cmd.where, line))
        assert proc.returncode == 0, (
            f"{cmd.where}: `{cmd.text}` exited {proc.returncode} in a fresh shell "
            f"(ran: {line})\n--- output tail ---\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"\ndocs: {len(run)} shell blocks run, {len(skipped)} marked not-run:")
    for b in skipped:
        print(f"  not-run {b.where}: {b.not_run}")
    for secs, where, line in timings:
        print(f"  {secs:6.1f} s  {where}  {line[:150]}")
    print(f"  {sum(t for t, *_ in timings):6.1f} s  total")
