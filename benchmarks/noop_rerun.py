"""A `gptpipe run` with nothing to do against `dvc repro`'s own no-op, in the same project and the same minutes:
a tiny-config project (the tests' tiny params and support tickets) run once, then both reruns in turn, with a
temporary Prefect server as on a fresh clone (no PREFECT_API_URL). Prints JSON: median seconds of each, their
ratio, where the rerun's time goes (phases from its log's timestamps), what loading the flow imports costs, how
long the temporary server takes to answer on its own, and the load average (other work on the machine slows
everything here).

    python benchmarks/noop_rerun.py [--repeats 3]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_PARAMS, make_project  # noqa: E402  (the tests' tiny project)

BIN = Path(sys.executable).parent
# Log lines that end each phase of a no-op `gptpipe run`, in order; a phase runs from the line before.
PHASES = {
    "start_to_flow_run (imports, temporary server)": r"Beginning flow run",
    "flow_run_to_sources (stage order, status check of the pipeline)": r"Running stage 'sources'",
    "sources (dvc repro of the stage that reruns every time)": r"stage sources: ran",
    "other_stages (skipped as up to date)": r"Task run 'evaluate' - Finished",
    "register_and_artifacts": r"Flow run '[^']+' - Finished",
}
IMPORTS = ["prefect", "dvc.repo", "components.register", "polars", "pyarrow", "boto3"]


def timed(command: list[str], project: Path, env: dict) -> tuple[float, float, str]:
    """When the command started, its seconds and its output."""
    started = time.time()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return started, time.time() - started, done.stdout + done.stderr


def phases(started: float, seconds: float, log: str) -> dict:
    """Seconds between the lines that end each phase; the rest is the exit (last logs sent, server stopped)."""
    day = datetime.fromtimestamp(started).date()
    marks = [started]
    for pattern in PHASES.values():
        line = next(line for line in log.splitlines() if re.search(pattern, line))
        clock = datetime.strptime(line[:12], "%H:%M:%S.%f").time()
        marks.append(datetime.combine(day, clock).timestamp())
    marks.append(started + seconds)
    return {name: round(end - begin, 2) for name, begin, end in
            zip([*PHASES, "exit (last logs sent, server stopped)"], marks[:-1], marks[1:], strict=True)}


def import_seconds(env: dict) -> dict:
    """Cumulative import time of the flow module's heaviest parts (python -X importtime), and of all of it."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flows.retrain"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    found = {}
    for line in done.stderr.splitlines():
        fields = [field.strip() for field in line.removeprefix("import time:").split("|")]
        if len(fields) == 3 and fields[1].isdigit() and fields[2] in [*IMPORTS, "flows.retrain"]:
            found.setdefault(fields[2], round(int(fields[1]) / 1e6, 2))
    return found


def server_ready_seconds(env: dict) -> float:
    code = ("import time; from flows.temporary_server import TemporaryServer; started = time.monotonic(); "
            "TemporaryServer().wait_until_up(300); print(time.monotonic() - started)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return round(float(done.stdout.split()[-1]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="noop-rerun-"))
    project = make_project(work / "project", TINY_PARAMS)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PREFECT_HOME": str(work / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    gptpipe, dvc = [str(BIN / "gptpipe"), "run"], [str(BIN / "dvc"), "repro"]
    _, first_seconds, _ = timed(gptpipe, project, env)
    dvc_runs, gptpipe_runs = [], []
    for _ in range(args.repeats):
        dvc_runs.append(timed(dvc, project, env)[1])
        started, seconds, log = timed(gptpipe, project, env)
        if "stages run: none (all up to date)" not in log:
            raise RuntimeError(f"the rerun ran stages:\n{log[-3000:]}")
        gptpipe_runs.append((seconds, phases(started, seconds, log)))
    median = statistics.median(seconds for seconds, _ in gptpipe_runs)
    typical = min(gptpipe_runs, key=lambda run: abs(run[0] - median))
    print(json.dumps({
        "dvc_repro_noop_s": round(statistics.median(dvc_runs), 2),
        "gptpipe_run_noop_s": round(median, 2),
        "ratio_to_dvc_repro": round(median / statistics.median(dvc_runs), 2),
        "runs_s": {"dvc_repro": [round(s, 2) for s in dvc_runs],
                   "gptpipe_run": [round(s, 2) for s, _ in gptpipe_runs]},
        "first_run_s": round(first_seconds, 1),
        "phases_of_the_median_run_s": typical[1],
        "import_flows_retrain_s": import_seconds(env),
        "temporary_server_alone_s": server_ready_seconds(env),
        "load_average_1_5_15": [round(load, 2) for load in os.getloadavg()],
        "cpus": os.cpu_count(),
    }, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
