"""Servers and shard builders for the data pipeline tests."""
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size=(80, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class RoutesServer:
    """Serves fixed byte strings by path (404 otherwise), optionally slowly."""

    def __init__(self, routes: dict, delay: float = 0.0):
        routes_ = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if delay:
                    time.sleep(delay)
                body = routes_.get(self.path)
                if body is None:
                    self.send_error(404, "File not found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SilentServer:
    """Accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except OSError:
                return

    def close(self):
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


def write_tar(path, samples, truncate_to=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:truncate_to] if truncate_to else data)


def read_shards(folder):
    """{key: {ext: bytes}} over all tars, with duplicates counted."""
    seen, counts = {}, {}
    for t in sorted(folder.glob("*.tar")):
        with tarfile.open(t) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                seen.setdefault(key, {})[ext] = tar.extractfile(m).read()
                counts[(key, ext)] = counts.get((key, ext), 0) + 1
    return seen, counts
