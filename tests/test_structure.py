"""The house's design, checked: imports point down the layers (no cycle, none hidden inside a
function), each dvc.yaml stage lists exactly the project modules it runs, and no function grows
too long to hold in mind."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
STAGES = ("collect", "clean", "tokenize", "train", "evaluate")
MAX_FUNCTION_LINES = 80
READABLE = {"model": 60, "decoding": 60}  # tighter in the packages a reader reads first
MAX_MODEL_LINES = 300  # pipeline/model/model.py: the networks, top to bottom, as nanoGPT's


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST) -> list[str]:
    """The project modules an import statement names (`from a.b import c` names a.b, or a.b.c
    when c is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
        return []
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != "pipeline":
            found.append(name)
    return found


def imports_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return {m for node in ast.walk(tree) for m in imported(node)} - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += GRAPH[m]
    return seen


def test_no_import_cycle():
    """Depth-first search for a back edge; imports inside functions count too."""
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycle = path[path.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_no_project_import_hidden_in_a_function():
    """Third-party libraries may be imported late (an optional extra, a slow import); the project's
    own modules are imported at the top, where a reader sees them."""
    hidden = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(tree.body)
        for node in ast.walk(tree):
            if imported(node) and node not in top and not _guarded_main(tree, node):
                hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not hidden, f"project imports inside functions: {hidden}"


def _guarded_main(tree: ast.Module, node: ast.AST) -> bool:
    return any(
        isinstance(s, ast.If) and "__main__" in ast.unparse(s.test) and node in list(ast.walk(s)) for s in tree.body
    )


def test_the_layers_point_down():
    """A library never imports a stage or a tool; a stage never imports another stage."""
    tops = {m for m in MODULES if m.count(".") == 1 and MODULES[m].name != "__init__.py"}
    for m, deps in GRAPH.items():
        wrong = deps & tops
        assert not wrong, f"{m} imports {sorted(wrong)}: stages and tools are imported by no one"


def test_package_inits_hold_no_code():
    """So that no stage depends on an __init__ (dvc.yaml leaves them out): a docstring at most."""
    for path in MODULES.values():
        if path.name == "__init__.py":
            body = ast.parse(path.read_text(encoding="utf-8")).body
            assert all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body), path


def stage_deps() -> dict[str, set[str]]:
    """Each dvc.yaml stage's deps under pipeline/, as files (a folder stands for its .py files)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for name in STAGES:
        files = set()
        for dep in stages[name]["deps"]:
            path = ROOT / dep
            if path.is_relative_to(PACKAGE):
                assert path.exists(), f"dvc.yaml: stage {name} lists {dep}, which does not exist"
                files |= {p for p in path.rglob("*.py") if p.name != "__init__.py"} if path.is_dir() else {path}
        out[name] = {str(p.relative_to(ROOT)) for p in files}
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_deps_are_the_modules_the_stage_runs(stage):
    """A module the stage runs but dvc.yaml does not name is a silent reproducibility bug (an edit
    re-runs nothing); one it names but never runs re-runs it for nothing."""
    runs = {str(MODULES[m].relative_to(ROOT)) for m in closure(f"pipeline.{stage}") if MODULES[m].name != "__init__.py"}
    listed = stage_deps()[stage]
    assert not runs - listed, f"dvc.yaml: stage {stage} lacks deps {sorted(runs - listed)}"
    assert not listed - runs, f"dvc.yaml: stage {stage} lists deps it never imports: {sorted(listed - runs)}"


def test_no_function_is_too_long():
    """80 lines at most; 60 in model/ and decoding/; and model.py itself at most 300 lines."""
    long = []
    for path in MODULES.values():
        cap = READABLE.get(path.relative_to(PACKAGE).parts[0], MAX_FUNCTION_LINES)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > cap:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines, at most {cap})")
    assert not long, f"functions too long: {long}"
    model = (PACKAGE / "model" / "model.py").read_text(encoding="utf-8").count("\n")
    assert model <= MAX_MODEL_LINES, f"pipeline/model/model.py has {model} lines (at most {MAX_MODEL_LINES})"
