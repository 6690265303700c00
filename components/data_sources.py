"""Sources: record what each data file holds now (content hash of a local file, ETag of an s3:// object), so that
a file replaced or added at the same path reruns ingest and what follows, and an unchanged one reruns nothing.

    python -m components.data_sources --out data/sources.json

dvc.yaml runs this stage every time (`always_changed`); DVC compares its output with the last run's, and the
stages after it rerun only when it differs.
"""

import argparse
from pathlib import Path

from components import layout
from components.atomic import write_json_atomic
from components.errors import exit_on_input_error
from components.params import BUILTIN_BBC_NEWS, Params, load_params
from components.sources import builtin_bbc_news_dir, corpus_files, file_sha256


def describe(path: str) -> list[dict]:
    """Each file `path` names with a stamp that changes exactly when its content does."""
    builtin = str(builtin_bbc_news_dir()) if path == BUILTIN_BBC_NEWS else None
    listed = corpus_files([builtin or path])
    for entry in listed:
        if "://" not in entry["uri"]:
            entry["version"] = file_sha256(Path(entry["uri"]))  # a copy over the file keeps its size, not its hash
        if builtin:  # the same wherever the package is installed
            entry["uri"] = BUILTIN_BBC_NEWS + entry["uri"].removeprefix(builtin)
    return [{"uri": entry["uri"], "bytes": entry["bytes"], "version": entry["version"]} for entry in listed]


def data_sources(params: Params) -> dict:
    data = params.data
    return {"labeled": describe(data.labeled.path),
            "test": describe(data.test.path) if data.test.path else [],
            "unlabeled": [entry for path in data.unlabeled.paths for entry in describe(path)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=layout.SOURCES)
    args = parser.parse_args()
    sources = data_sources(load_params(args.params))
    write_json_atomic(args.out, sources)  # DVC compares it with the last run's: the same record reruns nothing
    print(f"sources: {sum(len(entries) for entries in sources.values())} data file(s) recorded")


if __name__ == "__main__":
    exit_on_input_error(main)
