"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

Each server gets a config of its own (filesystem storage in a temp dir, a free port, the access
log in a file so tests can count the requests it served), optionally htpasswd basic auth behind
TLS or a bearer-token realm. ``skopeo`` is the outside judge: helpers copy images in and out.
No pytest import: the fixtures in conftest.py wrap this.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
_LINE_RE = re.compile(r'"(GET|HEAD|POST|PATCH|PUT|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RegistryServer:
    """One running ``docker-registry``; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, root: Path, *, auth: str = "", tls: tuple[Path, Path] | None = None):
        self.root = root
        self.storage = root / "storage"
        self.log = root / "registry.log"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        root.mkdir(parents=True, exist_ok=True)
        tls_conf = ""
        if tls:
            tls_conf = f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
        self.config = root / "config.yml"
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n{tls_conf}"
            f"{auth}"
        )
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [REGISTRY, "serve", str(self.config)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
        )
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start within 30s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request served so far, from the access log."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = _LINE_RE.search(line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def blob_files(self) -> list[Path]:
        base = self.storage / "docker" / "registry" / "v2" / "blobs"
        return sorted(base.glob("sha256/*/*/data")) if base.exists() else []

    def url(self, repo: str, tag: str = "latest") -> str:
        return f"docker://{self.host}/{repo}:{tag}"


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def http_get(
    url: str, accept: str = "application/vnd.oci.image.manifest.v1+json"
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@contextlib.contextmanager
def running(root: Path, **kw: object) -> Iterator[RegistryServer]:
    server = RegistryServer(root, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def no_leftover_processes(server: RegistryServer) -> bool:
    return server.proc.poll() is not None and not os.path.exists(f"/proc/{server.proc.pid}")


class CuttingProxy:
    """Forwards GET/HEAD to a registry; the download of blob ``cut`` stops halfway and the
    connection drops, as when the registry goes down in the middle of a pull."""

    def __init__(self, upstream: str, cut: str) -> None:
        import http.server
        import threading

        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str) -> None:
                request = urllib.request.Request(
                    f"http://{upstream}{self.path}",
                    method=method,
                    headers={k: v for k, v in self.headers.items() if k.lower() == "accept"},
                )
                try:
                    resp = urllib.request.urlopen(request, timeout=30)
                except urllib.error.HTTPError as exc:
                    resp = exc
                body = resp.read()
                self.send_response(resp.status if hasattr(resp, "status") else resp.code)
                for key, value in resp.headers.items():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method == "HEAD":
                    return
                if cut in self.path:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_HEAD(self) -> None:
                self._forward("HEAD")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        del proxy

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
