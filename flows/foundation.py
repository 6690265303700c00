"""The `foundation` flow: pre-train the broad foundation on whichever worker takes it, e.g. a GPU worker through
the `foundation/gpu` deployment (infra/prefect.yaml); a retry resumes from the last (mirrored) checkpoint.

    prefect deployment run foundation/gpu --param add_to_registry=true
"""

import json
import tempfile
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from components import layout
from components.params import PARAMS_FILE, FoundationParams, Params, load_params
from components.register import register_checkpoint
from flows.stages import retry_unless_bad_input, run_guarded

CHECKOUT_PARAMS = load_params(PARAMS_FILE) if PARAMS_FILE.exists() else Params()


@task(retries=2, retry_condition_fn=retry_unless_bad_input, tags={"training"})
def pretrain_foundation(root: Path, params: Params, out: str) -> dict:
    """`python -m components.foundation` with these params; training resumes from its last checkpoint."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=root, prefix=".foundation-params-") as file:
        yaml.safe_dump(params.model_dump(mode="json"), file)
        file.flush()
        run_guarded(["python", "-m", "components.foundation", "--params", file.name, "--out", out], root,
                    get_run_logger().info)
    return json.loads((root / out / "metrics.json").read_text())


@task(retries=2, retry_delay_seconds=5)
def add_foundation_to_registry(root: Path, params: Params, out: str) -> dict:
    return register_checkpoint(params.registry.uri, params.foundation.name, root / out)


@flow(name="foundation", log_prints=True)
def foundation(foundation: FoundationParams = CHECKOUT_PARAMS.foundation, repo: str = ".",
               out: str = str(layout.FOUNDATION), add_to_registry: bool = False) -> dict:
    """Pre-train a foundation on `foundation.corpus.paths` (local, s3:// or hf:// paths the worker can read)
    into `out`; with `add_to_registry`, add it to registry.uri as `foundation.name` for tasks to continue from."""
    root = Path(repo).resolve()
    params = CHECKOUT_PARAMS.model_copy(update={"foundation": foundation})
    summary = pretrain_foundation(root, params, out)
    print(f"foundation: {summary['tokens_seen']:,} tokens seen, held-out perplexity {summary['val_perplexity']:.1f}")
    if add_to_registry:
        manifest = add_foundation_to_registry(root, params, out)
        print(f"registered {manifest['name']}:{manifest['version']} in {params.registry.uri}")
    return {"tokens_seen": summary["tokens_seen"], "val_perplexity": summary["val_perplexity"],
            "val_perplexity_per_source": summary["val_perplexity_per_source"]}
