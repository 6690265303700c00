"""Sources: record what each data file holds now (content hash of a local file, ETag of an s3:// object), so that
a file replaced or added at the same path reruns ingest and what follows, and an unchanged one reruns nothing;
and the same of the checkpoint `pretrain.init_from` names (a registry alias that moved, a folder rebuilt in place,
a Hub revision that moved: each reruns tokenize and what follows).

    python -m components.data_sources --out data/sources.json --foundation data/foundation.json

dvc.yaml runs this stage every time (`always_changed`); DVC compares its output with the last run's, and the
stages after it rerun only when it differs.
"""

import argparse
from pathlib import Path

from components import layout
from components.atomic import write_json_atomic
from components.checkpoints import resolve_foundation
from components.errors import exit_on_input_error
from components.params import BUILTIN_BBC_NEWS, Params, load_params
from components.sources import builtin_bbc_news_dir, corpus_files, file_sha256


def describe(path: str, setting: str) -> list[dict]:
    """Each file `path` (the value of params' `setting`) names with a stamp that changes exactly when its content
    does."""
    builtin = str(builtin_bbc_news_dir()) if path == BUILTIN_BBC_NEWS else None
    listed = corpus_files([builtin or path], setting)
    for entry in listed:
        if "://" not in entry["uri"]:
            entry["version"] = file_sha256(Path(entry["uri"]))  # a copy over the file keeps its size, not its hash
        if builtin:  # the same wherever the package is installed
            entry["uri"] = BUILTIN_BBC_NEWS + entry["uri"].removeprefix(builtin)
    return [{"uri": entry["uri"], "bytes": entry["bytes"], "version": entry["version"]} for entry in listed]


def data_sources(params: Params) -> dict:
    data = params.data
    return {"labeled": describe(data.labeled.path, "data.labeled.path"),
            "test": describe(data.test.path, "data.test.path") if data.test.path else [],
            "unlabeled": [entry for path in data.unlabeled.paths
                          for entry in describe(path, "data.unlabeled.paths")]}


def foundation_source(params: Params) -> dict:
    """What identifies the checkpoint pre-training starts from: its record (weights' sha256, version, revision)
    and its tokenizer's sha256; resolving it fetches or imports it once, into the cache the later stages read."""
    init_from = params.pretrain.init_from
    foundation = resolve_foundation(init_from, params.registry.uri, params.model.context_length)
    if foundation is None:
        return {"init_from": init_from}
    return {"init_from": init_from, **foundation.record,
            "tokenizer_sha256": file_sha256(foundation.folder / "tokenizer.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=layout.SOURCES)
    parser.add_argument("--foundation", type=Path, default=layout.FOUNDATION_SOURCE)
    args = parser.parse_args()
    params = load_params(args.params)
    sources = data_sources(params)
    foundation = foundation_source(params)
    # DVC compares them with the last run's: the same records rerun nothing
    write_json_atomic(args.out, sources)
    write_json_atomic(args.foundation, foundation)
    print(f"sources: {sum(len(entries) for entries in sources.values())} data file(s) recorded; pre-training starts "
          f"from {foundation.get('name', foundation['init_from'])}"
          + (f" at revision {foundation['revision']}" if foundation.get("revision") else ""))


if __name__ == "__main__":
    exit_on_input_error(main)
