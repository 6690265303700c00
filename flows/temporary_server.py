"""The temporary Prefect server of a `gptpipe run` without PREFECT_API_URL, started before the flow's modules load
so that the two start-ups overlap. Prefect would start the same server (uvicorn serving
prefect.server.api.server:create_app, the UI off) only when the flow first calls its API, and load the whole
server package into this process too, to start it: together most of a run that has nothing to do.

Nothing here imports Prefect: that is what it runs alongside.
"""

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request

# What Prefect's own temporary server (prefect.server.api.server.SubprocessASGIServer) runs with.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
STOP_SECONDS = 5.0


class TemporaryServer:
    """A Prefect API on a free port of 127.0.0.1, for this process and what it starts (PREFECT_API_URL), stopped
    at exit after Prefect has sent its last logs (exit handlers run last registered first, and Prefect registers
    its own after this one). PREFECT_UI_URL is emptied: no UI is served, so the run's log and lineage link to
    none."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, **SERVER_ENV})
        os.environ.update({"PREFECT_API_URL": self.api_url, "PREFECT_UI_URL": ""})
        atexit.register(self.stop)

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:g} s (set "
                                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher)") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
