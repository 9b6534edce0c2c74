"""The package's layout: the library loads no application, and the applications start.

Each check runs a fresh interpreter, so that what this test session imported does not count.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APPLICATIONS = ("mpisign.train", "mpisign.plot", "mpisign.launch", "mpisign.diagnostics")


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


#: The library's layers, bottom up: a module may import its own layer and those below, never
#: one above (application -> optim/vote -> collectives -> backends -> MPI helpers -> mpi4py).
LAYERS = [
    ("MPI helpers", {"mpisign.world", "mpisign.comm", "mpisign.nodes", "mpisign.elastic"}),
    ("backends", {"mpisign.packing", "mpisign._signs", "mpisign.native", "mpisign.signs",
                  "mpisign.cuda"}),
    ("collectives", {"mpisign.costmodel", "mpisign.collectives"}),
    ("the optimizer's books", {"mpisign.header", "mpisign.isolation", "mpisign.layout",
                               "mpisign.exchanges", "mpisign.overlap", "mpisign.detection",
                               "mpisign.state", "mpisign.recovery"}),
    ("optim and vote", {"mpisign.optim", "mpisign.vote"}),
    ("applications", {"mpisign.adversary", "mpisign.train", "mpisign.plot", "mpisign.launch",
                      "mpisign.diagnostics", "mpisign"}),
]


def layer_of(module: str) -> int:
    """The layer of ``module`` (a package's submodules share its layer)."""
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            inside = module == name or (name != "mpisign" and module.startswith(name + "."))
            if inside and (best is None or len(name) > len(best[1])):
                best = (i, name)
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best[0]


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
    compiled = (path.parent / f"{path.name}.c").exists()   # a C extension (mpisign._signs)
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists() or compiled
