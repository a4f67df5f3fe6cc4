"""The package's imports point one way (docs/architecture.md): foundations -> physics and I/O ->
bias model -> training -> analysis and HPC tools -> workflows -> commands; no cycles, no module
importing a command, no relative imports. Walks the source with ``ast`` (nothing is imported)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lagbias_mpi"
LEVEL = {"core": 0, "config": 1, "mpi": 1, "mesh": 2, "io": 3, "nbody": 3, "bias": 4, "training": 5,
         "analysis": 6, "hpc": 6, "workflows": 7}
COMMAND_LEVEL = 8
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _level(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:
        return -1  # the package itself (__version__)
    if parts[1] in LEVEL:
        return LEVEL[parts[1]]
    return COMMAND_LEVEL  # a top-level module is a command


def _imports(path: Path, modules: dict) -> list[tuple[str, int]]:
    """(imported lagbias_mpi module, line) of every import in the file, in functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            if node.module and node.module.split(".")[0] == "lagbias_mpi":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.append((sub if sub in modules else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "lagbias_mpi"]
    return out


def _graph():
    modules = _modules()
    return modules, {m: _imports(p, modules) for m, p in modules.items()}


def test_every_subpackage_has_a_level():
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subs == set(LEVEL), f"subpackages without a level (or levels without a package): {subs ^ set(LEVEL)}"


def test_imports_point_one_way():
    modules, graph = _graph()
    bad = []
    for mod, imps in graph.items():
        for target, line in imps:
            assert target in modules, f"{modules[mod]}:{line}: imports unknown module {target}"
            if _level(target) > _level(mod) or (_level(target) == COMMAND_LEVEL and target != mod):
                bad.append(f"{mod} (level {_level(mod)}) imports {target} (level {_level(target)}) at line {line}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    _, graph = _graph()
    edges = {m: sorted({t for t, _ in imps if t != m and t != "lagbias_mpi"}) for m, imps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail(tmp_path):
    """The level rule flags a planted upward import and the walker sees imports inside functions."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from lagbias_mpi.workflows.train import run\n")
    assert _imports(path, {"lagbias_mpi.workflows.train": path}) == [("lagbias_mpi.workflows.train", 2)]
    assert _level("lagbias_mpi.workflows.train") > _level("lagbias_mpi.mesh.grid")
    assert _level("lagbias_mpi.train") == COMMAND_LEVEL


def test_modules_stay_small_and_commands_thin():
    long = [f"{p.relative_to(PKG)}: {n}" for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules past {MAX_LINES} lines: {long}"
    for p in PKG.glob("*.py"):
        if p.name == "__init__.py":
            continue
        tree = ast.parse(p.read_text())
        defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert len(defs) <= 4, f"command {p.name} defines {defs}: move the work into a workflow"
