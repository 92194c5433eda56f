"""The house rules of the layout, read off the code itself (docs/development.md "Layout"): imports only run
downward, with no circle; tasks/data/ never reaches a kind, the loop or the lifecycle; tasks/kinds/ never reaches
the pipeline or the flows; models/ imports nothing above it; config and sources load without torch; files and
functions stay small; the serving commands never branch on the kind; dvc.yaml names code by folder."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "models")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in it (module level or inside a function; not the imports for
    annotations only): `from a.b import c` counts as a.b.c when that is a module, else as a.b."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) in
                   ("TYPE_CHECKING", "typing.TYPE_CHECKING") for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never run
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # import a.b.c of a package: the deepest project module
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_the_graph_is_read():
    assert {"tasks.data", "tasks.kinds", "tasks.kinds.supervised", "tasks.data.text", "flows.cli"} <= set(GRAPH)
    assert "tasks.data" in GRAPH["tasks.data.images"] and "tasks.kinds.supervised" in GRAPH["tasks.kinds.language"]


def test_no_import_circle():
    """Tarjan's strongly connected components: every one is a single module."""
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    sys.setrecursionlimit(10_000)
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def reaches(prefixes: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    def hit(m, names):
        return any(m == n or m.startswith(n + ".") for n in names)

    return [f"{m} -> {t}" for m, targets in sorted(GRAPH.items()) if hit(m, prefixes)
            for t in sorted(targets) if hit(t, forbidden)]


@pytest.mark.parametrize("layer, forbidden", [
    (("tasks.data",), ("tasks.kinds", "tasks.train", "tasks.stages", "tasks.sweep", "tasks.serving", "tasks.networks",
                       "flows")),
    (("tasks.kinds",), ("tasks.stages", "tasks.sweep", "tasks.report", "tasks.dvc", "tasks.serving", "flows")),
    (("models",), ("tasks", "flows")),
    (("tasks.config", "tasks.sources", "tasks.references", "tasks.explain"), ("tasks.kinds", "tasks.data", "tasks.train", "tasks.stages")),
    (("tasks.train", "tasks.augment", "tasks.figures", "tasks.tracking", "tasks.registration"), ("tasks.kinds",)),
])
def test_imports_run_downward(layer, forbidden):
    assert reaches(layer, forbidden) == []


def test_config_and_sources_load_without_torch():
    code = ("import sys, tasks.config, tasks.sources, tasks.references; bad = [m for m in ('torch', 'tasks.kinds', 'tasks.data') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_sweep_report_loads_without_torch():
    code = "import sys, tasks.report; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for m, p in MODULES.items():
        if not m.startswith(("tasks", "flows")):
            continue
        text = p.read_text()
        if text.count("\n") > 450:
            long_files.append(f"{p.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long_files == [] and long_functions == []


def test_serving_commands_never_branch_on_the_kind():
    serving = (ROOT / "flows" / "serve.py").read_text()
    assert "nnlab.kind" not in serving and "get_kind" not in serving


def test_dvc_names_code_by_folder():
    """prepare runs tasks/data/ (never a kind); train and evaluate run every kind; a new kind or source is
    covered by its folder, never by a list to keep."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    prepare = stages["prepare"]["deps"]
    assert "tasks/data" in prepare and not any(d.startswith("tasks/kinds") for d in prepare)
    for name in ("train", "evaluate"):
        deps = stages[name]["do"]["deps"]
        assert "tasks/kinds" in deps and "models" in deps
    named = {d for s in stages.values() for d in (s.get("deps") or s.get("do", {}).get("deps", []))}
    assert not any(d.startswith(("tasks/kinds/", "tasks/data/")) for d in named)  # folders, not their files
    assert all((ROOT / d).exists() for d in named if d.startswith(("tasks", "models")))
