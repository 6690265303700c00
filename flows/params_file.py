"""Write a run's params into params.yaml, changing only the values that differ and keeping the comments."""

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from components.atomic import atomic_file
from components.params import Params, read_raw


def changed_leaves(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in new for change in changed_leaves(old.get(key), new[key], (*path, key))]
    return [] if old == new else [(path, new)]


def write_params(path: Path, params: Params) -> bool:
    """Returns whether the file changed. Keys the file lacks are written too: DVC requires every param a
    stage lists to be present in params.yaml."""
    changes = changed_leaves(read_raw(path), params.model_dump(mode="json"))
    if not changes:
        return False
    yaml = YAML()
    document = yaml.load(path.read_text()) if path.exists() else None
    document = document if document is not None else {}
    for keys, value in changes:
        node = document
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    with atomic_file(path) as staging, staging.open("w") as file:
        yaml.dump(document, file)
    return True
