"""`gptpipe`: one console program, one subcommand per verb.

    gptpipe run [--set section.key=value]...
    gptpipe predict --model NAME[@ALIAS|:VERSION] [TEXT ...] [--input FILE]
    gptpipe generate [--model models/pretrained|NAME@ALIAS] [PROMPT ...]
    gptpipe foundation [--set foundation.key=value]... [--out DIR] [--register]
    gptpipe notify [NAME] [--path PATH]
    gptpipe team-setup --results s3://bucket/prefix
    gptpipe registry list|show|promote|rollback
"""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from components import layout
from components.errors import InputError, exit_on_input_error
from components.model_card import delivered_rows
from components.params import PARAMS_FILE, load_params

# A signal ends `gptpipe run` within 10 s: the flow run reported crashed, then SIGTERM to SIGKILL for its processes.
REPORT_SECONDS = 1.5
STOP_GRACE_SECONDS = 7.0


def registry_uri(args: argparse.Namespace) -> str:
    return args.registry or load_params(PARAMS_FILE).registry.uri


def hide_bad_input_tracebacks(error_type: type[Exception]) -> None:
    """Bad input ends the run with one line (printed by exit_on_input_error); Prefect would also log the
    exception with its traceback from the task and from the flow. Those records are dropped from the console
    (the UI still shows the failed state and its message)."""
    def keep(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], error_type):
            return False
        return error_type.__name__ not in record.getMessage()

    names = [name for name in logging.root.manager.loggerDict if name.startswith("prefect")]
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in logger.handlers:
            handler.addFilter(keep)


def report_crash(signal_name: str) -> None:
    """Mark the flow run this process is in Crashed, as Prefect's own SIGTERM handler would, so the UI does not
    show it running on. Best effort, at most REPORT_SECONDS: the API may be gone (a temporary server gets the
    signal too when it is sent to the run's process group) or the interrupted code may hold a lock the client
    needs. It uses the run's own client, already connected."""
    if "prefect.context" not in sys.modules:  # stopped before the flow loaded: nothing to report
        return
    from prefect.context import FlowRunContext
    from prefect.states import Crashed

    context = FlowRunContext.get()
    if not context or not context.flow_run:
        return
    state = Crashed(message=f"gptpipe run stopped by {signal_name}")
    thread = threading.Thread(target=context.client.set_flow_run_state, args=(context.flow_run.id, state),
                              kwargs={"force": True}, daemon=True)
    thread.start()
    thread.join(REPORT_SECONDS)


def stop_run(signum: int, _frame) -> None:
    """SIGTERM or Ctrl-C: stop every process this run started (servers, `dvc repro` and training, which keeps
    its last checkpoint), reap them, and exit, within STOP_GRACE_SECONDS + REPORT_SECONDS. A second signal
    changes nothing."""
    import psutil

    for ignored in (signal.SIGTERM, signal.SIGINT):
        signal.signal(ignored, signal.SIG_IGN)
    name = signal.Signals(signum).name
    with contextlib.suppress(Exception):
        report_crash(name)
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=STOP_GRACE_SECONDS)  # reaps this process's own children
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=1)
    # os.write: the signal may have interrupted a write to stderr, and print would fail on its buffer's lock.
    os.write(2, f"gptpipe: stopped by {name}; training resumes from its last checkpoint on the next run\n".encode())
    os._exit(128 + signum)


def own_stop_signals() -> None:
    """SIGTERM and SIGINT go to stop_run for the whole run, from its start."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_run)


def keep_prefect_off_sigterm() -> None:
    """Prefect's flow engine would swap in, for the flow run, a SIGTERM handler of its own that raises into the
    flow and reports the crash before anything stops; with the API gone (a signal to the run's process group also
    stops the temporary server) that report retries for minutes, and the run lingers with its stopped children
    unreaped. `gptpipe run` has no runner to take cancellations through that handler, so the engine is told not
    to install it."""
    from prefect import flow_engine

    if hasattr(flow_engine, "capture_sigterm"):
        flow_engine.capture_sigterm = contextlib.nullcontext


def cmd_run(args: argparse.Namespace) -> None:
    params = load_params(PARAMS_FILE, args.set)  # validate before any server or stage starts
    if args.push:
        from flows.stages import require_shared_remote

        require_shared_remote(Path.cwd(), "run --push")
    # Without PREFECT_API_URL a temporary server serves the run; its first start migrates a new database, which
    # takes longer than Prefect's 20 s default on a small machine. Nothing here may call home.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.stages import StageInputError

    own_stop_signals()
    local = not (os.environ.get("PREFECT_API_URL") or args.push or args.isolate)
    try:
        if local:  # a team's runs are always recorded in its Prefect server
            from flows.up_to_date import registered_without_changes

            if registered := registered_without_changes(Path.cwd(), params):
                print("nothing changed since the last run: no flow run started")
                print_summary([], json.loads(layout.METRICS.read_text()), registered)
                return
        from flows.temporary_server import TemporaryServer

        server = TemporaryServer() if not os.environ.get("PREFECT_API_URL") else None
        from flows.retrain import retrain  # Prefect's import is slow: the server starts meanwhile

        hide_bad_input_tracebacks(StageInputError)
        keep_prefect_off_sigterm()
        if server:
            server.wait_until_up(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        result = retrain(params=params, push=args.push, isolate=args.isolate)
    except StageInputError as error:
        raise InputError(str(error)) from None
    print_summary(result["stages_run"], result["metrics"], result["registered"])


def print_summary(stages_run: list[str], metrics: dict, registered: dict) -> None:
    print(f"stages run: {', '.join(stages_run) or 'none (all up to date)'}")
    rows = [*delivered_rows(metrics), *((name, baseline["test"]) for name, baseline in metrics["baselines"].items())]
    for name, test in rows:
        print(f"test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} ({name})")
    print(f"registered {registered['name']}:{registered['version']} as {registered['alias']} in {registered['uri']}"
          f" ({registered['reason']})")


def cmd_predict(args: argparse.Namespace) -> None:
    from components.predict import label_table, load_registered, predict, read_input, to_json_lines, write_table

    table = read_input(Path(args.input), args.text_column) if args.input else None
    if args.output and table is None:
        raise InputError("predict --output needs --input FILE: the output is that table with predictions added")
    texts = list(args.texts) + (table[args.text_column].fill_null("").to_list() if table is not None else [])
    if not texts:
        raise InputError("predict: no text given; pass TEXT arguments or --input FILE")
    classifier, _ = load_registered(registry_uri(args), args.model)
    if args.output:
        write_table(label_table(classifier, table, args.text_column), Path(args.output))
        print(f"wrote {table.height} predictions to {args.output}")
        return
    for line in to_json_lines(predict(classifier, texts)):
        print(line)


def cmd_export(args: argparse.Namespace) -> None:
    from components.export import export
    from components.predict import load_registered

    classifier, manifest = load_registered(registry_uri(args), args.model)
    export(classifier, manifest, args.format, Path(args.out))
    print(f"exported {manifest['name']}:{manifest['version']} as {args.format} to {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from components.checkpoints import locate_checkpoint
    from components.generate import generate

    folder = locate_checkpoint(args.model, registry_uri(args))
    for index, prompt in enumerate(args.prompts or [""]):
        print(generate(folder, prompt, args.max_new_tokens, args.temperature, args.top_k, seed=args.seed + index))


def cmd_notify(args: argparse.Namespace) -> None:
    from prefect.events import emit_event

    event = emit_event(event="gptpipe.data.updated", resource={"prefect.resource.id": f"gptpipe.data.{args.name}"},
                       payload={"path": args.path} if args.path else None)
    if event is None:
        raise InputError("notify: no Prefect API to send the event to; set PREFECT_API_URL to your Prefect server")
    print(f"emitted gptpipe.data.updated for gptpipe.data.{args.name} (event {event.id})")


def cmd_team_setup(args: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not os.environ.get("PREFECT_API_URL"):
        raise InputError("team-setup: set PREFECT_API_URL to the team's Prefect server (it stores the pools and the "
                         "results block)")
    from flows.team import team_setup

    for line in team_setup(args.results):
        print(line)


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def score(metrics: dict, key: str, spec: str = ".4f") -> str:
    """A metric for the table, or `-` where this kind of model has none (a foundation has no test accuracy)."""
    return format(metrics[key], spec) if isinstance(metrics.get(key), int | float) else "-"


def cmd_foundation(args: argparse.Namespace) -> None:
    from components.foundation import build_foundation
    from components.register import register_checkpoint

    params = load_params(PARAMS_FILE, args.set)
    out = Path(args.out)
    summary = build_foundation(params.foundation, params.seed, params.registry.uri, out)
    print(f"foundation: {summary['tokens_seen']:,} tokens seen, held-out perplexity {summary['val_perplexity']:.1f}; "
          f"wrote {out}")
    if args.register:
        manifest = register_checkpoint(params.registry.uri, params.foundation.name, out)
        print(f"registered {manifest['name']}:{manifest['version']} in {params.registry.uri}; continue tasks from it "
              f"with --set pretrain.init_from=registry:{manifest['name']}@latest")


def cmd_registry(args: argparse.Namespace) -> None:
    from components.registry import ModelRef, Registry

    registry = Registry(registry_uri(args))
    if args.action == "list":
        rows = []
        for name in [args.name] if args.name else registry.models():
            by_version: dict[int, list[str]] = {}
            for alias, version in registry.aliases(name).items():
                by_version.setdefault(version, []).append(alias)
            for version in registry.versions(name):
                manifest = registry.manifest(name, version)
                aliases = ",".join(sorted(by_version.get(version, [])))
                metrics = manifest.get("metrics", {})
                rows.append({"model": name, "version": version, "kind": manifest.get("kind", ""), "aliases": aliases,
                             "test_accuracy": score(metrics, "test_accuracy"),
                             "test_macro_f1": score(metrics, "test_macro_f1"),
                             "val_perplexity": score(metrics, "val_perplexity", ".1f"),
                             "created": manifest["created"], "git_commit": (manifest.get("git_commit") or "")[:8]})
        print_table(rows)
    elif args.action == "show":
        manifest = registry.resolve(args.model)
        decision = registry.decision(manifest["name"], manifest["version"])
        print(json.dumps({**manifest, **({"promotion": decision} if decision else {})}, indent=2))
    elif args.action == "promote":
        manifest = registry.resolve(args.model)
        registry.set_alias(manifest["name"], args.alias, manifest["version"])
        print(f"{manifest['name']}@{args.alias} -> version {manifest['version']}")
    elif args.action == "rollback":
        ref = ModelRef.parse(args.model)
        alias = ref.alias if ref.alias and "@" in args.model else "champion"
        print(f"{ref.name}@{alias} -> version {registry.rollback(ref.name, alias)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptpipe", description="Pre-train, fine-tune, evaluate and register a "
                                     "GPT text classifier.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run the retrain flow (DVC stages, then registration) in this checkout")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one param (repeatable); written to params.yaml like `dvc exp run -S`")
    run.add_argument("--push", action="store_true", help="dvc push the stages' outputs and run records to the remote")
    run.add_argument("--isolate", action="store_true",
                     help="work in a git worktree of HEAD under .gptpipe/runs/ (runs at once share the DVC cache)")
    run.set_defaults(handler=cmd_run)

    predict = verbs.add_parser("predict", help="label texts with a registered model, as JSON lines")
    predict.add_argument("--model", required=True, help="NAME, NAME@ALIAS (champion, latest, ...) or NAME:VERSION")
    predict.add_argument("texts", nargs="*", metavar="TEXT")
    predict.add_argument("--input", help="a .txt (one text per line), CSV, TSV, JSONL or Parquet file")
    predict.add_argument("--text-column", default="text", help="text column of a tabular --input")
    predict.add_argument("--output", help="write the --input table with label and prob_<label> columns added "
                         "(.csv, .tsv, .jsonl or .parquet) instead of JSON lines")
    predict.add_argument("--registry", help="registry URI (default: registry.uri in params.yaml)")
    predict.set_defaults(handler=cmd_predict)

    export = verbs.add_parser("export", help="write a registered classifier as a Hugging Face folder or ONNX")
    export.add_argument("--model", required=True, help="NAME, NAME@ALIAS (champion, latest, ...) or NAME:VERSION")
    export.add_argument("--format", required=True, metavar="hf|onnx",
                        help="hf: the backbone in its family's transformers layout plus the head; onnx: the whole "
                        "classifier, ids and mask in, probabilities out")
    export.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier export)")
    export.add_argument("--registry", help="registry URI (default: registry.uri in params.yaml)")
    export.set_defaults(handler=cmd_export)

    generate = verbs.add_parser("generate", help="sample text from a pre-trained checkpoint")
    generate.add_argument("--model", default=str(layout.PRETRAINED),
                          help="a checkpoint folder or a registered foundation model (NAME@ALIAS, NAME:VERSION)")
    generate.add_argument("prompts", nargs="*", metavar="PROMPT")
    generate.add_argument("--max-new-tokens", type=int, default=60)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=40)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--registry", help="registry URI (default: registry.uri in params.yaml)")
    generate.set_defaults(handler=cmd_generate)

    foundation = verbs.add_parser("foundation", help="pre-train a broad foundation model on a large corpus")
    foundation.add_argument("--set", action="append", default=[], metavar="foundation.KEY=VALUE",
                            help="override one param (repeatable), e.g. foundation.corpus.paths='[corpus/*.parquet]'")
    foundation.add_argument("--out", default=str(layout.FOUNDATION), help="checkpoint folder to write")
    foundation.add_argument("--register", action="store_true",
                            help="also register it in registry.uri as foundation.name")
    foundation.set_defaults(handler=cmd_foundation)

    notify = verbs.add_parser("notify", help="announce new data: starts the retrain/on-new-data deployment")
    notify.add_argument("name", nargs="?", default="labeled", help="which data changed (default: labeled)")
    notify.add_argument("--path", help="where the new labeled data is: the run reads it instead of "
                        "data.labeled.path")
    notify.set_defaults(handler=cmd_notify)

    team = verbs.add_parser("team-setup", help="once per Prefect server: work pools and shared result storage")
    team.add_argument("--results", required=True, metavar="URI",
                      help="where flow results and persisted state live: s3://bucket/prefix (a folder only when "
                      "every worker runs on one machine)")
    team.set_defaults(handler=cmd_team_setup)

    registry = verbs.add_parser("registry", help="list, show, promote or roll back registered models")
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="versions with their aliases and test scores")
    listing.add_argument("name", nargs="?")
    show = actions.add_parser("show", help="one version's manifest")
    show.add_argument("model", help="NAME[@ALIAS|:VERSION]")
    promote = actions.add_parser("promote", help="point an alias (default champion) at a version")
    promote.add_argument("model", help="NAME:VERSION or NAME@ALIAS")
    promote.add_argument("--alias", default="champion")
    rollback = actions.add_parser("rollback", help="move an alias (default champion) back to where it was before")
    rollback.add_argument("model", help="NAME or NAME@ALIAS")
    for sub in (listing, show, promote, rollback):
        sub.add_argument("--registry", help="registry URI (default: registry.uri in params.yaml)")
    registry.set_defaults(handler=cmd_registry)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)
        exit_on_input_error(lambda: args.handler(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left early (`gptpipe registry show ... | head`): end quietly with a shell tool's status;
        # stdout goes to /dev/null so that the interpreter's last flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGPIPE) from None


if __name__ == "__main__":
    main()
