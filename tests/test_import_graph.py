"""The package's import graph: no import cycle between modules, and kernels are leaves.

How it checks, without importing anything: every ``moslim_mega/**/*.py`` file is parsed with
``ast`` and *every* ``import`` / ``from ... import`` node is collected with ``ast.walk`` — at module
level and inside functions, methods, ``try`` and ``if`` blocks alike (a function-level import is a
cycle that merely waits for its first call). Relative imports are resolved against the importing
module's package; ``from pkg import name`` counts as an import of the submodule ``pkg.name`` when
that file exists, else of ``pkg``. Importing ``a.b.c`` first executes ``a/__init__.py`` and
``a/b/__init__.py``, so each import also adds edges to those package ``__init__`` modules (except
the importer's own ancestors, which are already running). The strongly connected components
of that directed graph (Tarjan) are the cycles: any component of more than one module fails,
with the edges and line numbers that close it. Separately, every ``moslim_mega.kernels.*``
module may import only other ``moslim_mega.kernels`` modules (plus torch / triton / stdlib).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "moslim_mega"
ROOT = Path(__file__).resolve().parents[1]

# Cycles that predate issue 16's list and sit where this change may not go (``moslim_mega/eval/`` is
# another engineer's; the cli ↔ launch one needs the parser passed into launch/slurm.py). Each must
# still exist exactly as written — when one is untied, delete its entry here.
KNOWN_CYCLES = {
    frozenset({"moslim_mega.compare", "moslim_mega.eval.compare_seeds"}),
    frozenset({"moslim_mega.cli", "moslim_mega.launch.slurm"}),
}


def module_files(root: Path, pkg: str = PKG) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every .py file under ``root/pkg``."""
    mods = {}
    for path in sorted((root / pkg).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_edges(root: Path, pkg: str = PKG) -> dict[str, dict[str, int]]:
    """importer -> {imported module of ``pkg``: first line number}, over all imports in the file."""
    mods = module_files(root, pkg)

    def owner(name: str) -> str | None:  # the longest existing module prefix of a dotted name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, dict[str, int]] = {}
    for mod, (path, is_pkg) in mods.items():
        base = mod if is_pkg else mod.rpartition(".")[0]
        targets: list[tuple[str, int]] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    src = ".".join(parts + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.append((sub if sub in mods else src, node.lineno))
        out = edges.setdefault(mod, {})
        for name, line in targets:
            if not (name == pkg or name.startswith(pkg + ".")):
                continue
            target = owner(name)
            while target:
                # Its package __init__s run first; the importer's own ancestors are already running.
                if target != mod and not (mod + ".").startswith(target + "."):
                    out.setdefault(target, line)
                target = target.rpartition(".")[0] if "." in target else None
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges.get(start, {})))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.add(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def _describe(comp: frozenset[str], edges) -> str:
    return "\n".join(f"  {a} -> {b} (line {line})" for a in sorted(comp) for b, line in edges[a].items() if b in comp)


def test_the_package_has_no_import_cycle():
    edges = import_edges(ROOT)
    assert len(edges) > 100 and "moslim_mega.algos.logprob" in edges  # the walk saw the package
    found = cycles(edges)
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n\n".join(_describe(c, edges) for c in new)
    gone = KNOWN_CYCLES - set(found)
    assert not gone, f"no longer cycles, delete them from KNOWN_CYCLES: {[sorted(c) for c in gone]}"


def test_kernels_import_nothing_of_the_package_but_kernels():
    edges = import_edges(ROOT)
    kernels = [m for m in edges if m == f"{PKG}.kernels" or m.startswith(f"{PKG}.kernels.")]
    assert {f"{PKG}.kernels.linear_logprob", f"{PKG}.kernels.multihead_head"} <= set(kernels)
    bad = {m: sorted(t for t in edges[m] if not t.startswith(f"{PKG}.kernels")) for m in kernels}
    assert not {m: t for m, t in bad.items() if t}, f"kernels importing the package: {bad}"


def test_the_checker_sees_function_level_and_package_init_cycles(tmp_path):
    # A tiny package with the two shapes this repo had: a ↔ b closed by an import inside a
    # function, and k importing r.m while r/__init__ imports r.io, which imports k lazily.
    files = {
        "p/__init__.py": "",
        "p/a.py": "from .b import f\n",
        "p/b.py": "def f():\n    from . import a\n    return a\n",
        "p/k.py": "from .r.m import X\n",
        "p/r/__init__.py": "from .io import load\n",
        "p/r/m.py": "X = 1\n",
        "p/r/io.py": "def load():\n    import p.k\n",
        "p/leaf.py": "import os\nfrom p.r import m\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_edges(tmp_path, "p")
    assert edges["p.b"] == {"p.a": 2}
    assert edges["p.leaf"] == {"p.r.m": 2, "p.r": 2}
    assert set(cycles(edges)) == {frozenset({"p.a", "p.b"}), frozenset({"p.k", "p.r", "p.r.io"})}
