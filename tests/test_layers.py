"""The package's layers: its folders, imported one way; the library loads no application, and the
applications start.

Each check runs a fresh interpreter, so that what this test session imported does not count.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APPLICATIONS = ("mpisign.train", "mpisign.launch", "mpisign.diagnostics")


def loaded_after(statement: str) -> set[str]:
    """The ``mpisign`` modules a fresh interpreter holds after running ``statement``."""
    code = (f"{statement}\nimport sys\n"
            f"print(*sorted(m for m in sys.modules if m.startswith('mpisign')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_import_mpisign_loads_no_application_module():
    loaded = loaded_after("import mpisign, sys")
    assert "mpisign.optim" in loaded   # the check sees the library's modules
    apps = [m for m in loaded if m in APPLICATIONS or m.startswith(APPLICATIONS)]
    assert apps == [], apps


def test_the_diagnostics_share_the_option_types_but_not_the_training_loop():
    loaded = loaded_after("import mpisign.diagnostics.cli")
    assert "mpisign.train.options" in loaded
    assert not {"mpisign.train.cli", "mpisign.train.loop"} & loaded, sorted(loaded)


def test_python_m_mpisign_train_help():
    proc = subprocess.run([sys.executable, "-m", "mpisign.train", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m mpisign.train"), proc.stdout[:200]
    for option in ("--optimizer", "--topology", "--resume", "--vote-timeout", "--device"):
        assert option in proc.stdout, option


#: The library's layers, bottom up, as its folders: a module may import its own layer and those
#: below, never one above. Every module of the package is in a folder named here, or is one of
#: the few top-level modules named here, so a new module cannot sit in no layer.
LAYERS = [
    ("MPI helpers", ("mpisign.mpi",)),
    ("backends", ("mpisign.backends", "mpisign.cuda")),
    ("collectives", ("mpisign.collectives",)),
    ("the vote engine and optimizers", ("mpisign.optim",)),
    ("the public vote, a script's data and rank 0, the DDP hook",
     ("mpisign.vote", "mpisign.group_vote", "mpisign.script", "mpisign.ddp")),
    ("applications", ("mpisign.train", "mpisign.diagnostics", "mpisign.launch", "mpisign")),
]


def layer_of(module: str) -> int:
    """The layer of ``module``: the folder (or named top-level module) it is in."""
    for i, (_, places) in enumerate(LAYERS):
        for place in places:
            if module == place or (place != "mpisign" and module.startswith(place + ".")):
                return i
    assert False, (f"{module} is in no layer: put it in the folder of its layer "
                   f"({', '.join(p for _, ps in LAYERS for p in ps)})")


def test_every_folder_of_the_package_is_a_layer():
    """A new folder, or a module at the top, must be given a layer here first."""
    top = REPO / "mpisign"
    places = {p for _, ps in LAYERS for p in ps}
    folders = {f"mpisign.{d.name}" for d in top.iterdir()
               if d.is_dir() and (d / "__init__.py").exists()}
    modules = {f"mpisign.{f.stem}" for f in top.glob("*.py") if f.name != "__init__.py"}
    assert folders | modules <= places, sorted((folders | modules) - places)
    assert layer_of("mpisign.optim.signum") > layer_of("mpisign.collectives.server") \
        > layer_of("mpisign.backends.packing") > layer_of("mpisign.mpi.comm")


def imports_of(path: Path, module: str) -> set[str]:
    """Every mpisign module ``path`` imports, at its top or inside a function."""
    import ast
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level \
                else node.module
            names = {f"{target}.{a.name}" for a in node.names}
            submodules = {m for m in names if _is_module(m)}   # `from . import packing`
            found |= submodules if submodules else {target}
    return {m for m in found if m == "mpisign" or m.startswith("mpisign.")}


def test_the_library_imports_one_way():
    """No module imports from a layer above its own: the house reads one way."""
    upward = []
    for path in sorted((REPO / "mpisign").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for target in imports_of(path, module):
            if not _is_module(target):
                continue   # a name imported from a module, not a module
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert upward == [], "\n".join(upward)


def _is_module(name: str) -> bool:
    parts = name.split(".")
    path = REPO.joinpath(*parts)
    compiled = (path.parent / f"{path.name}.c").exists()   # a C extension (mpisign.backends._signs)
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists() or compiled


def test_no_import_cycle():
    """No chain of imports, at a module's top or inside a function, leads back to where it
    began (a package and its own submodules aside: an ``__init__`` gathers its folder)."""
    graph = {}
    for path in sorted((REPO / "mpisign").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {t for t in imports_of(path, module)
                         if _is_module(t) and t != module and not module.startswith(t + ".")
                         and not t.startswith(module + ".")}
    cycles = []

    def visit(node, trail, seen):
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, trail + [nxt], seen)
    for start in sorted(graph):
        visit(start, [start], {start})
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles[:5])


def test_no_function_is_longer_than_80_lines():
    """A function that does not fit on a screen is usually two things."""
    import ast
    long = []
    for path in sorted((REPO / "mpisign").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines}")
    assert long == [], "\n".join(long)
