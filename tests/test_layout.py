"""The package layout shows the architecture: imports point one way and no module imports itself back.

Read from the source with `ast`, so a lazy import inside a function counts as much as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "repa_pipe"
BASE = {"pipeline": set(), "cache": {"pipeline"}, "models": {"pipeline"}, "metrics": {"pipeline"},
        "run": {"pipeline", "cache", "models"}}
MIDDLE = {"encoding", "training", "sampling", "demo", "analysis"}
ALLOWED = {
    **BASE,
    **{m: {"pipeline", "cache", "models", "metrics", "run"} for m in MIDDLE},
    "stages": {"pipeline", "cache", "models", "metrics", "run", *MIDDLE},
    "cli": {"pipeline", "cache", "stages", *MIDDLE},
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = f
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every repa_pipe module `path` imports (resolving `from repa_pipe.x import y` to x.y when y is a module)."""
    mods = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("repa_pipe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("repa_pipe"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in mods else node.module)
    return {m for m in found if m != module and m != "repa_pipe"}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_down():
    bad = []
    for module, path in _modules().items():
        pkg = _package(module)
        if pkg not in ALLOWED:
            continue
        for imported in _imports(path, module):
            other = _package(imported)
            if other and other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{module} imports {imported}")
    assert not bad, "\n".join(bad)


def test_every_package_is_placed_in_a_layer():
    packages = {_package(m) for m in _modules()} - {""}
    assert packages <= set(ALLOWED), packages - set(ALLOWED)


def test_no_import_cycles():
    graph = {m: _imports(p, m) for m, p in _modules().items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]) if n in stack else n)
            if n in graph and not state.get(n):
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


def test_stages_hold_one_file_per_command():
    files = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
    assert files == ["analyze", "bench", "cache", "demo", "encode_features", "encode_latents", "export",
                     "sample_eval", "train"]


def test_stages_are_thin_doors():
    """A stage calls one function of the layer below and prints its result: none but the demo (which runs the other
    stages) builds a network, an encode job or a cache writer itself."""
    mods = _modules()
    bad = sorted(f"{m} imports {i}" for m, p in mods.items() if m.startswith("repa_pipe.stages.")
                 and m != "repa_pipe.stages.demo" for i in _imports(p, m)
                 if i.startswith(("repa_pipe.models", "repa_pipe.encoding.runner", "repa_pipe.cache.writer")))
    assert not bad, "\n".join(bad)


def test_the_cli_imports_nothing_heavy_at_startup():
    """`repa-pipe --help` must not import torch (seconds): the CLI reads light config modules only."""
    import subprocess
    import sys

    code = "import sys, repa_pipe.cli; print('torch' in sys.modules, 'zarr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
