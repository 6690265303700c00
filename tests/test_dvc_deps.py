"""dvc.yaml lists every source file a stage's command imports (transitively), so editing any of them reruns it."""

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def imported_components(module: str, seen: set[str] | None = None) -> set[str]:
    """components/*.py files that `python -m module` loads, following `components.*` imports."""
    seen = set() if seen is None else seen
    path = f"{module.replace('.', '/')}.py"
    if path in seen:
        return seen
    seen.add(path)
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "components":  # from components import layout
            names = [f"components.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name.startswith("components.") and (ROOT / f"{name.replace('.', '/')}.py").exists():
                imported_components(name, seen)
    return seen


def test_every_stage_lists_the_source_files_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
        deps = {dep for dep in stage["deps"]}
        missing = imported_components(module) - deps
        assert not missing, f"stage {name} imports {sorted(missing)} without listing them in dvc.yaml deps"


def test_stage_outputs_are_the_paths_the_code_reads():
    """register and the flow read outputs through components/layout.py: dvc.yaml must write exactly there."""
    from components import layout

    known = {str(value) for name, value in vars(layout).items() if name.isupper()}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path = next(iter(out)) if isinstance(out, dict) else out
                assert path in known, f"stage {name} writes {path}, which components/layout.py does not name"
                assert path in stage["cmd"] or str(Path(path).parent) in stage["cmd"], (name, path)
