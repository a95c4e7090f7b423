"""The package's layout holds: imports point one way between the stages, no module imports itself
back through others (counting imports inside functions too), the library prints nothing (only the
command line owns the console), and the run folder's file names are spelled in ``runs/`` alone."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpa_fastai"

# Stages from the bottom up; a module may import modules of its own rank and of lower ranks, except
# that training and inference, which share a rank, may not import each other.
RANKS = {
    "errors": 0, "atomic": 0, "console": 0, "config": 0, "paths": 0, "outputs": 0, "plots": 0, "jsonfile": 0,
    "runs": 0,  # the run folder: its file names, status, lock, readers and the runs table
    "data": 1, "synth": 1,
    "tools": 2,  # one-off data jobs (the HPAv18 download): on core, data and synth; only the CLI imports them
    "models": 3, "losses": 3, "metrics": 3, "evaluation": 3, "modelfile": 3, "device": 3,
    "transfer": 3,  # the weights a model starts from: ImageNet files, earlier runs (on models and modelfile)
    "training": 4, "inference": 4,
    "search": 5,  # hyperparameter search: many trainings through the training door; never inference
    "reporting": 6,
    "serve": 6,  # the web app on a trained model (inference and plots only)
    "cli": 8,
    "fastai_api": 8,  # the fastai-native door for notebooks and scripts; nothing in the library imports it
    "__init__": 9,  # the package's public doors (load_predictor)
    "__main__": 9,  # python -m hpa_fastai: the command line
}
# Only the command line writes to the console; the library speaks through logging and callbacks.
CONSOLE_USERS = {"cli"}
CONSOLE = "hpa_fastai.console"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its code (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hpa_fastai")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hpa_fastai"):
                continue
            for alias in node.names:  # `from . import plots` imports a module, not a name
                sub = f"{target}.{alias.name}"
                found.add(sub if is_module(sub) else target)
    found.discard(name)
    return found


def stage(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_stage():
    unknown = sorted({stage(m) for m in graph()} - set(RANKS))
    assert not unknown, f"modules outside the known stages: {unknown}; add them to RANKS"


def test_imports_point_down_the_stages():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            a, b = stage(module), stage(target)
            if a == b:
                continue
            if RANKS[b] > RANKS[a] or (RANKS[b] == RANKS[a] and {a, b} == {"training", "inference"}):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the direction core -> data -> tools -> models -> training | inference -> " \
                      "search -> reporting -> cli:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if nxt not in g:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_cli_imports_the_tools():
    # the tools sit low (they need only core, data and synth) but stay apart from the pipeline above them
    importers = sorted({stage(m) for m, targets in graph().items()
                        if stage(m) != "tools" and any(stage(t) == "tools" for t in targets)})
    assert importers == ["cli"], importers


def test_only_the_package_door_imports_the_fastai_api():
    importers = sorted(m for m, targets in graph().items() if "hpa_fastai.fastai_api" in targets)
    assert importers == ["hpa_fastai"], importers


def test_the_checker_sees_imports_inside_functions(tmp_path):
    # a guard on the guard: a function-level import is what hid the old cycles
    source = "def f():\n    from ..training import run\n"
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found.add(node.module)
    assert found == {"training"}
    assert "hpa_fastai.training.run" in imports_of(PACKAGE / "training" / "cv.py")


def test_only_the_command_line_writes_to_the_console():
    users = sorted(m for m, targets in graph().items() if CONSOLE in targets and stage(m) not in CONSOLE_USERS)
    assert not users, f"library modules that import the console (log through logging.getLogger(__name__)): {users}"


def test_library_modules_do_not_print():
    printing = []
    for path in PACKAGE.rglob("*.py"):
        if stage(module_name(path)) in CONSOLE_USERS or path.name == "console.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{module_name(path)}:{node.lineno}")
    assert not printing, f"print() in library code: {printing}"


def run_file_names() -> set[str]:
    """The names of the run folder's files (its subfolders, ``tensorboard`` and ``evaluate``, share
    their names with a flag value and a command, and are left out)."""
    from hpa_fastai.runs import folder

    return {name for name in set(folder.RUN_FILES) | set(folder.EVALUATION_FILES) if "." in name}


def test_run_folder_file_names_are_spelled_in_runs_only():
    names, found = run_file_names(), []
    for path in PACKAGE.rglob("*.py"):
        if stage(module_name(path)) == "runs":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{module_name(path)}:{node.lineno} {node.value!r}")
    assert not found, "run-folder file names outside hpa_fastai/runs (take them from runs.folder):\n" + "\n".join(found)


def test_json_is_parsed_only_through_the_guarded_reader():
    # json.load(s) on a file a user may have edited raises RecursionError on nested brackets and
    # reads FIFOs forever; hpa_fastai.jsonfile bounds and guards every parse
    direct = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) == "hpa_fastai.jsonfile":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("load", "loads")
                    and isinstance(node.value, ast.Name) and node.value.id == "json"):
                direct.append(f"{module_name(path)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "json" and {"load", "loads"} & {
                    a.name for a in node.names}:
                direct.append(f"{module_name(path)}:{node.lineno}")
    assert not direct, f"JSON parsed outside hpa_fastai.jsonfile: {direct}"


def test_the_json_reader_imports_only_the_error_type():
    assert imports_of(PACKAGE / "jsonfile.py") == {"hpa_fastai.errors"}
