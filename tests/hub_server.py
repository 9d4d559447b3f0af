"""A loopback stand-in for the Hugging Face Hub: the resolve protocol huggingface_hub speaks.

``/{repo}/resolve/{revision}/{path}`` answers HEAD and GET with ``X-Repo-Commit``,
``ETag`` and ``Content-Length``; a missing file is a 404 with ``X-Error-Code:
EntryNotFound``. Files are served from ``root/{repo}/{path}``; every request is logged, so
a test can tell a download from a cache hit.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from pathlib import Path
from typing import Iterator, List

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _handler(root: Path, log: List[str]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _answer(self, body: bool) -> None:
            path = self.path.split("?", 1)[0].lstrip("/")
            repo, sep, rest = path.partition("/resolve/")
            _, _, file = rest.partition("/")
            log.append(f"{self.command} {path}")
            target = root / repo / file
            if not sep or not target.is_file():
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if sep else "RepoNotFound")
                self.send_header("X-Error-Message", "Entry not found")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = target.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's names)
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

    return Handler


@contextlib.contextmanager
def serve_hub(root) -> Iterator[tuple]:
    """Serve ``root`` as the Hub until the block ends; yields (endpoint URL, request log)."""
    log: List[str] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), log))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
