"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1 (point HF_ENDPOINT at `url`): it answers the calls
huggingface_hub's snapshot_download makes for a model repository, from files published into it, with the fields
and headers the library checks (huggingface_hub/_snapshot_download.py and file_download.py)."""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"
API = re.compile(rf"/api/models/{REPO}/(?P<call>revision|tree)/(?P<revision>[^/]+)")
RESOLVE = re.compile(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)")
LFS_SUFFIXES = (".safetensors", ".bin")  # stored with Git LFS on the Hub: ETag is the content's sha256


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content, which the Hub sends as the ETag of a file kept in git itself."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    def __init__(self):
        self.branches: dict[str, dict[str, str]] = {}  # repository -> branch -> commit
        self.commits: dict[str, dict[str, bytes]] = {}  # commit -> file path -> content
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), HubRequests)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, repo: str, folder: Path, branch: str = "main") -> str:
        """Commit the folder's files (as they are now) to `branch` of `repo`; returns the commit's sha."""
        files = {file.name: file.read_bytes() for file in sorted(folder.iterdir()) if file.is_file()}
        commit = hashlib.sha1(json.dumps({name: git_blob_id(data) for name, data in files.items()}).encode() +
                              repo.encode()).hexdigest()
        self.commits[commit] = files
        self.branches.setdefault(repo, {})[branch] = commit
        return commit

    def environment(self, cache: Path) -> dict[str, str]:
        """What a process needs to download from the stand-in into its own huggingface_hub cache."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1"}

    def resolve(self, repo: str, revision: str) -> str | None:
        branches = self.branches.get(repo, {})
        return branches.get(revision) or (revision if revision in branches.values() else None)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HubRequests(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def do_GET(self) -> None:
        self.answer(body=True)

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def answer(self, body: bool) -> None:
        hub: HubStandIn = self.server.hub
        path = unquote(urlsplit(self.path).path)
        match = API.fullmatch(path) or RESOLVE.fullmatch(path)
        if not match:
            return self.send(404, {"X-Error-Code": "EntryNotFound"}, b"")
        repo = match["repo"]
        if repo not in hub.branches:  # as the Hub answers a repository that does not exist (or is private)
            return self.send(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                             b'{"error": "Repository not found"}')
        commit = hub.resolve(repo, match["revision"])
        if commit is None:
            return self.send(404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}')
        files = hub.commits[commit]
        if "call" in match.groupdict():
            if match["call"] == "revision":
                info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                        "siblings": [{"rfilename": name} for name in files]}
            else:  # the recursive listing of every file at the commit, on one page (no Link header)
                info = [{"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data),
                         **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                            if name.endswith(LFS_SUFFIXES) else {})} for name, data in files.items()]
            return self.send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        if match["path"] not in files:
            return self.send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"", body)
        data = files[match["path"]]
        etag = hashlib.sha256(data).hexdigest() if match["path"].endswith(LFS_SUFFIXES) else git_blob_id(data)
        self.send(200, {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Content-Type": "application/octet-stream"},
                  data, body)

    def send(self, status: int, headers: dict[str, str], data: bytes, body: bool = True) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # quiet: pytest shows failures, not every request
        pass
