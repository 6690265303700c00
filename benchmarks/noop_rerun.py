"""A `gptpipe run` with nothing to do against `dvc repro`'s own no-op, in the same project and the same minutes:
a tiny-config project (the tests' tiny params and support tickets) run once, then both reruns in turn, as on a
fresh clone (no PREFECT_API_URL: the rerun's quick check finds nothing to do, and no Prefect server starts).
Prints JSON: median seconds of each, their ratio, where the rerun's time goes (the quick check's parts, timed
one by one), and the load average (other work on the machine slows everything here).

    python benchmarks/noop_rerun.py [--repeats 3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_PARAMS, make_project  # noqa: E402  (the tests' tiny project)

BIN = Path(sys.executable).parent
# The parts of the quick check a local no-op `gptpipe run` makes (flows/up_to_date.py), each timed in turn.
PARTS = """
import json, time
from pathlib import Path
marks = [time.monotonic()]
from components.params import PARAMS_FILE, load_params
from components.register import registered_unchanged
from flows.stages import PipelineStatus, reproduce, stage_order
marks.append(time.monotonic())
params, here = load_params(PARAMS_FILE), Path(".")
order = stage_order(here)
marks.append(time.monotonic())
reproduce(here, "sources", lambda line: None, params.team, single=True)
marks.append(time.monotonic())
PipelineStatus(here)
marks.append(time.monotonic())
assert registered_unchanged(params, here)
marks.append(time.monotonic())
names = ["imports", "params_and_stage_order", "sources_stage", "status_check", "registry_check"]
print(json.dumps({name: round(b - a, 2) for name, a, b in zip(names, marks, marks[1:])}))
"""


def timed(command: list[str], project: Path, env: dict) -> tuple[float, str]:
    """The command's seconds and its output."""
    started = time.monotonic()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.monotonic() - started, done.stdout + done.stderr


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
    first_seconds, _ = timed(gptpipe, project, env)
    dvc_runs, gptpipe_runs = [], []
    for _ in range(args.repeats):
        dvc_runs.append(timed(dvc, project, env)[0])
        seconds, log = timed(gptpipe, project, env)
        if "no flow run started" not in log:
            raise RuntimeError(f"the rerun was not found to have nothing to do:\n{log[-3000:]}")
        gptpipe_runs.append(seconds)
    parts = json.loads(timed([sys.executable, "-c", PARTS], project, {**env, "PYTHONPATH": str(ROOT)})[1])
    median, dvc_median = statistics.median(gptpipe_runs), statistics.median(dvc_runs)
    print(json.dumps({
        "dvc_repro_noop_s": round(dvc_median, 2),
        "gptpipe_run_noop_s": round(median, 2),
        "ratio_to_dvc_repro": round(median / dvc_median, 2),
        "runs_s": {"dvc_repro": [round(s, 2) for s in dvc_runs], "gptpipe_run": [round(s, 2) for s in gptpipe_runs]},
        "first_run_s": round(first_seconds, 1),
        "quick_check_parts_s": parts,
        "load_average_1_5_15": [round(load, 2) for load in os.getloadavg()],
        "cpus": os.cpu_count(),
    }, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
