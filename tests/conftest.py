"""Shared fixtures: tiny params, a real S3 API server and a real Prefect server on 127.0.0.1."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from components.params import Params, to_yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The test oracles (transformers) are on this process' path only, not the stages' (see the Makefile).
sys.path.append(str(Path(sys.prefix) / "oracles"))
# A Prefect server's first start migrates a new database: on two busy cores that can take over a minute.
SERVER_START_TIMEOUT = 120
FOUNDATION = Path("models/foundation")
SHARED_FOLDER = "GPTPIPE_TEST_RUN_FOLDER"
# Registry downloads are cached per user; keep the suite's apart from the user's own.
os.environ["GPTPIPE_CACHE"] = tempfile.mkdtemp(prefix="gptpipe-test-cache-")

# Small enough for seconds on two cores, big enough to train something real.
TINY_PARAMS = {
    "data": {"labeled": {"path": "labeled.csv"}},
    "tokenizer": {"vocab_size": 320},
    "model": {"n_layer": 2, "n_head": 2, "d_model": 16, "context_length": 32},
    "pretrain": {"init_from": "scratch", "batch_size": 4, "max_steps": 6, "warmup_steps": 1, "val_every_n_steps": 3,
                 "val_batches": 2, "checkpoint_every_n_steps": 3, "precision": "32-true"},
    "finetune": {"epochs": 1, "batch_size": 8, "precision": "32-true"},
    "evaluate": {"baselines": ["tfidf_logreg", "zero_shot"], "zero_shot_text_tokens": 8},
}

TOPICS = {
    "billing": ["invoice", "refund", "charge", "payment", "card", "subscription", "price"],
    "auth": ["password", "login", "account", "token", "reset", "locked", "two-factor"],
    "bug": ["crash", "error", "button", "page", "freeze", "broken", "stack"],
}


def support_tickets(rows_per_label: int = 40, seed: int = 0) -> list[dict]:
    """Distinct synthetic support tickets whose words give away their label."""
    import random

    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        for i in range(rows_per_label):
            body = " ".join(rng.choice(words) for _ in range(12))
            rows.append({"text": f"Ticket {i}: my {body} issue needs help", "label": label})
    return rows


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end modules first: each takes minutes and runs whole on one test process (--dist=loadfile), so
    started last they would keep one process busy long after the other has run out of work."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = SERVER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 API server; sets the standard AWS variables so boto3 and DVC talk to it."""
    port = free_port()
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(endpoint, process)
    except (TimeoutError, RuntimeError):
        stop(process)
        raise
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_MAX_ATTEMPTS": "2"})
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stop(process)


@pytest.fixture
def bucket(s3_server: str, request) -> str:
    import boto3

    name = f"test-{request.node.name.lower().replace('_', '-').replace('[', '-').replace(']', '')}"[:60]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def pytest_configure(config: pytest.Config) -> None:
    """The main process names a folder that every test process of the run (pytest-xdist workers inherit the
    environment) shares: the Prefect server is recorded there."""
    if not hasattr(config, "workerinput"):
        os.environ[SHARED_FOLDER] = tempfile.mkdtemp(prefix="gptpipe-test-run-")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # a worker: the main process stops the shared server after every worker has finished
    shared = Path(os.environ.pop(SHARED_FOLDER))
    record = shared / "prefect-server.json"
    if record.exists():
        group = json.loads(record.read_text())["pid"]  # the server leads its own process group
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            server = psutil.Process(group)
            os.killpg(group, signal.SIGTERM)
            with contextlib.suppress(psutil.TimeoutExpired):
                server.wait(timeout=15)  # reaps it too when this process started it (no pytest-xdist)
            os.killpg(group, signal.SIGKILL)  # whatever of its group is left
    shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One real Prefect server for the whole test run: the first test process that needs it starts it, the
    others use it, and the main process stops it at the end (pytest_sessionfinish)."""
    from filelock import FileLock

    shared = Path(os.environ[SHARED_FOLDER])
    record = shared / "prefect-server.json"
    with FileLock(shared / "prefect-server.lock"):
        if not record.exists():
            record.write_text(json.dumps(start_prefect_server(shared / "prefect-home")))
    return json.loads(record.read_text())["api"]


def start_prefect_server(home: Path) -> dict:
    home.mkdir()
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           # Cancelled runs' subflows are cancelled by this service; its default 20 s loop slows the tests.
           "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS": "5"}
    with (home / "server.log").open("w") as log:
        process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(f"{api}/health", process)
    except (TimeoutError, RuntimeError):
        stop(process)
        raise
    return {"api": api, "pid": process.pid}


def make_project(target: Path, params: dict, rows: list[dict] | None = None) -> Path:
    """A fresh checkout of the project (git + DVC) with the given params.yaml and a labeled CSV."""
    import polars as pl

    ignore = shutil.ignore_patterns(".venv", ".git", "data", "models", "registry", ".gptpipe", "__pycache__",
                                    "*.egg-info", ".pytest_cache", ".ruff_cache", "storage", "site", "tmp", "cache",
                                    "dvc.lock")
    shutil.copytree(ROOT, target, ignore=ignore)
    shutil.copytree(ROOT / FOUNDATION, target / FOUNDATION)  # shipped in git, as a clone has it
    for generated in (target / "reports").glob("*.*"):
        generated.unlink()
    # Every key written out: DVC requires each param a stage lists to be present in params.yaml.
    (target / "params.yaml").write_text(to_yaml(Params.model_validate(params)))
    pl.DataFrame(rows or support_tickets()).write_csv(target / "labeled.csv")
    # As the Makefile's install step names it: DVC's site cache by its absolute path (queued experiments need it).
    (target / ".dvc/config.local").write_text(f"[core]\n    site_cache_dir = {target / '.dvc/site'}\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=target, check=True, env=env)
    return target


def repro(project: Path, env: dict, *stages: str) -> str:
    """`dvc repro STAGE...` in the project (every stage when none is named); its output, which names the stages run."""
    done = subprocess.run(["dvc", "repro", *stages], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def gptpipe(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "gptpipe"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})})


def processes_in(project: Path) -> list:
    """The processes working in `project` (their current folder is in it)."""
    found = []
    for process in psutil.process_iter(["cwd"]):
        if process.info["cwd"] and process.info["cwd"].startswith(str(project)):
            found.append(process)
    return found


@pytest.fixture
def tokenized(tmp_path):
    """A real tokenized corpus from the tiny support tickets."""
    project = make_project(tmp_path / "project", TINY_PARAMS)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    for stage in ("ingest", "tokenize"):
        subprocess.run(["dvc", "repro", stage], cwd=project, check=True, env=env, capture_output=True)
    return project, env


class CuttableProxy:
    """A TCP forwarder to the S3 server that can drop every connection at once, as a dying server does, refuse
    chosen requests, or lose the answer to a chosen request after the server acted on it."""

    def __init__(self, target_port: int, cut_after_bytes: int | None = None):
        self.target_port, self.cut_after_bytes = target_port, cut_after_bytes
        self.forwarded = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = []
        self.refused: list[tuple[bytes, ...]] = []
        self.answers_to_lose: list[tuple[bytes, ...]] = []
        self.lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def refuse(self, *markers: bytes) -> None:
        """Close the connection of every request whose head holds all `markers`, before the server sees it."""
        self.refused.append(markers)

    def lose_answer(self, *markers: bytes) -> None:
        """Pass the next request whose head holds all `markers` to the server, then close the connection in place
        of its success answer: the write happened, the client never hears of it."""
        self.answers_to_lose.append(markers)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            losing = threading.Event()  # this connection's request in flight is one whose answer is to be lost
            threading.Thread(target=self._pipe, args=(client, upstream, True, losing), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False, losing), daemon=True).start()

    def _matches(self, rules: list[tuple[bytes, ...]], data: bytes) -> tuple[bytes, ...] | None:
        return next((markers for markers in rules if all(marker in data for marker in markers)), None)

    def _pipe(self, source: socket.socket, sink: socket.socket, upload: bool, losing: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                if upload:
                    self.forwarded += len(data)
                    if self.cut_after_bytes is not None and self.forwarded > self.cut_after_bytes:
                        self.drop()
                        return
                    if self._matches(self.refused, data):
                        self._close(source, sink)
                        return
                    if markers := self._matches(self.answers_to_lose, data):
                        self.answers_to_lose.remove(markers)
                        losing.set()
                # the success answer, not a 100 Continue, though one may share its read with the answer
                elif losing.is_set() and re.search(rb"(?:^|\r\n)HTTP/1\.[01] 2", data):
                    self.lost += 1
                    self._close(source, sink)
                    return
                sink.sendall(data)
        except OSError:
            pass

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def drop(self) -> None:
        self.cut.set()
        self._close(*self.sockets)

    def restore(self) -> None:
        self.sockets.clear()
        self.forwarded = 0
        self.cut_after_bytes = None
        self.refused.clear()
        self.answers_to_lose.clear()
        self.cut.clear()


class SilentStore:
    """An S3 endpoint that accepts connections and never answers, as a store that hangs does; `contacted` is set
    once a client has connected."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.contacted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(connection)
            self.contacted.set()

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()
