"""The connection to the S3 API server dies in the middle of a registration: no half-visible version, and a
retry once the store is reachable again completes."""

import socket
import threading
import time

import pytest

from components.errors import InputError
from components.registry import Registry


class CuttableProxy:
    """A TCP forwarder to the S3 server that can drop every connection at once, as a dying server does."""

    def __init__(self, target_port: int, cut_after_bytes: int | None = None):
        self.target_port, self.cut_after_bytes = target_port, cut_after_bytes
        self.forwarded = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

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
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        try:
            while data := source.recv(65536):
                if upload:
                    self.forwarded += len(data)
                    if self.cut_after_bytes is not None and self.forwarded > self.cut_after_bytes:
                        self.drop()
                        return
                sink.sendall(data)
        except OSError:
            pass

    def drop(self) -> None:
        self.cut.set()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.sockets.clear()
        self.forwarded = 0
        self.cut_after_bytes = None
        self.cut.clear()


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40_000)  # 10 MB: the cut lands mid-upload
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_registration_interrupted_mid_upload_leaves_no_version_and_retry_works(s3_server, bucket, model_folder,
                                                                              monkeypatch):
    direct = Registry(f"s3://{bucket}/models")
    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]), cut_after_bytes=3_000_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    through_proxy = Registry(f"s3://{bucket}/models")
    started = time.monotonic()
    with pytest.raises(InputError, match="cannot upload"):
        through_proxy.register("news", model_folder, {"metrics": {"test_accuracy": 1, "test_macro_f1": 1}})
    assert time.monotonic() - started < 60  # bounded retries and timeouts, not minutes of hanging
    assert direct.versions("news") == []
    proxy.restore()
    manifest = through_proxy.register("news", model_folder, {"metrics": {"test_accuracy": 1, "test_macro_f1": 1}})
    assert manifest["version"] == 1 and direct.versions("news") == [1]
    copy = direct.fetch(direct.resolve("news@latest"))
    assert (copy / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
