"""Credentials, TLS and the token flow, against docker-registry with htpasswd basic auth behind
TLS (a CA and certificate made here with openssl) and with a bearer-token realm served by a
small token server of our own; credentials found the way podman, skopeo and docker find them;
every failure one line in words; no secret in any output or in the store."""

from __future__ import annotations

import base64
import http.server
import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from treeutil import build_layer, make_tree

from pytest_layers import registry
from pytest_layers.store import Store
from tests.registry_util import RegistryServer, free_port, running

pytestmark = [pytest.mark.requires_tool("docker-registry", "openssl", "htpasswd")]

USER, SECRET = "ci-bot", "s3cret-Pa55-never-printed"


def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        openssl(
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN={ca}"),
            cwd=d,
        )
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr"),
        *("-subj", "/CN=127.0.0.1"),
        cwd=d,
    )
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl(
        *("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", "srv.crt", "-days", "2", "-extfile", "ext"),
        cwd=d,
    )
    return d


@pytest.fixture(scope="module")
def tls_basic(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    root = tmp_path_factory.mktemp("tls-registry")
    proc = subprocess.run(
        ["htpasswd", "-Bbn", USER, SECRET], capture_output=True, text=True, check=True
    )
    (root / "htpasswd").write_text(proc.stdout)
    auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
    with running(root / "r", auth=auth, tls=(pki / "srv.crt", pki / "srv.key")) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Path:
    s = Store(tmp_path / "store")
    tree = make_tree(tmp_path / "tree", {"etc/os-release": "ID=auth\n", "bin/x": "x\n"})
    build_layer(s, None, tree, "base")
    return tmp_path / "store"


def auth_file(tmp_path: Path, host: str, user: str = USER, secret: str = SECRET) -> Path:
    path = tmp_path / "auth.json"
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE",)}
    full["DOCKER_CONFIG"] = "/nonexistent"
    full["XDG_RUNTIME_DIR"] = "/nonexistent"
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pytest_layers.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full,
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("pytest-layers: error: "), proc.stderr
    return lines[-1]


def no_secret_anywhere(store: Path, *outputs: str) -> None:
    for out in outputs:
        assert SECRET not in out
        assert base64.b64encode(f"{USER}:{SECRET}".encode()).decode() not in out
    for dirpath, _dirs, files in os.walk(store):
        for name in files:
            path = Path(dirpath) / name
            if stat.S_ISREG(path.lstat().st_mode):
                assert SECRET.encode() not in path.read_bytes(), path


# ---- TLS + basic auth -----------------------------------------------------------------------


def test_unknown_ca_is_one_line_saying_how_to_trust_it(
    tls_basic: RegistryServer, store: Path, pki: Path, tmp_path: Path
) -> None:
    url = tls_basic.url("team/app", "v1")
    line = error_line(cli("--store", str(store), "push", "base", url))
    assert "TLS certificate not trusted" in line
    assert "--registry-ca" in line
    # Another CA is no better.
    line = error_line(
        cli("--store", str(store), "push", "base", url, "--registry-ca", str(pki / "other-ca.crt"))
    )
    assert "TLS certificate not trusted" in line


def test_not_logged_in_is_401_in_words(
    tls_basic: RegistryServer, store: Path, pki: Path, tmp_path: Path
) -> None:
    url = tls_basic.url("team/app", "v1")
    proc = cli("--store", str(store), "push", "base", url, "--registry-ca", str(pki / "ca.crt"))
    line = error_line(proc)
    assert f"not logged in to {tls_basic.host}" in line
    assert "401" in line
    wrong = auth_file(tmp_path, tls_basic.host, secret="wrong")
    proc = cli(
        *("--store", str(store), "push", "base", url, "--registry-ca", str(pki / "ca.crt")),
        env={"REGISTRY_AUTH_FILE": str(wrong)},
    )
    line = error_line(proc)
    assert "credentials were refused" in line
    assert "wrong" not in line


def test_basic_auth_over_tls_push_and_pull(
    tls_basic: RegistryServer, store: Path, pki: Path, tmp_path: Path
) -> None:
    url = tls_basic.url("team/app", "v1")
    env = {"REGISTRY_AUTH_FILE": str(auth_file(tmp_path, tls_basic.host))}
    pushed = cli(
        *("--store", str(store), "push", "base", url, "--registry-ca", str(pki / "ca.crt")),
        env=env,
    )
    assert pushed.returncode == 0, pushed.stderr
    # SSL_CERT_FILE is honoured as well as --registry-ca.
    other = tmp_path / "other"
    pulled = cli(
        "--store",
        str(other),
        "pull",
        url,
        "--name",
        "x",
        env={**env, "SSL_CERT_FILE": str(pki / "ca.crt")},
    )
    assert pulled.returncode == 0, pulled.stderr
    assert Store(other).get_name("x") == Store(store).get_name("base")
    no_secret_anywhere(other, pushed.stdout, pushed.stderr, pulled.stdout, pulled.stderr)
    no_secret_anywhere(store)


def test_plain_http_only_for_loopback_or_listed_hosts() -> None:
    client = registry.Client("registry.example:5000")
    assert not client._plain_allowed()
    listed = registry.Client(
        "registry.example:5000", registry.Options(insecure=("registry.example",))
    )
    assert listed._plain_allowed()
    assert registry.Client("127.0.0.1:5000")._plain_allowed()


# ---- credential lookup ----------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_credentials_lookup_order(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = clean_env
    host = "reg.example:5000"
    assert registry.find_credentials(host) is None
    docker = tmp / "home/.docker"
    docker.mkdir(parents=True)
    (docker / "config.json").write_text(
        json.dumps({"auths": {f"https://{host}/v1/": {"auth": base64.b64encode(b"d:1").decode()}}})
    )
    assert registry.find_credentials(host) == ("d", "1")
    xdg = tmp / "xdg"
    (xdg / "containers").mkdir(parents=True)
    (xdg / "containers/auth.json").write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"x:2").decode()}}})
    )
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert registry.find_credentials(host) == ("x", "2")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(tmp, host, "r", "3")))
    assert registry.find_credentials(host) == ("r", "3")
    assert registry.find_credentials("other.example") is None


def test_credential_helpers(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = clean_env
    bindir = tmp / "bin"
    bindir.mkdir()
    for name, user in (("fake", "helper-user"), ("store", "store-user")):
        helper = bindir / f"docker-credential-{name}"
        helper.write_text(
            "#!/bin/sh\n"
            '[ "$1" = get ] || exit 2\n'
            "read host\n"
            f'[ "$host" = reg.example ] || {{ echo "credentials not found"; exit 1; }}\n'
            f'echo \'{{"ServerURL":"reg.example","Username":"{user}","Secret":"pw-{name}"}}\'\n'
        )
        helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    config = tmp / "dockercfg"
    config.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    (config / "config.json").write_text(json.dumps({"credsStore": "store"}))
    assert registry.find_credentials("reg.example") == ("store-user", "pw-store")
    assert registry.find_credentials("nope.example") is None
    (config / "config.json").write_text(
        json.dumps({"credsStore": "store", "credHelpers": {"reg.example": "fake"}})
    )
    assert registry.find_credentials("reg.example") == ("helper-user", "pw-fake")
    (config / "config.json").write_text(json.dumps({"credsStore": "missing"}))
    with pytest.raises(registry.RegistryAuthError, match="docker-credential-missing"):
        registry.find_credentials("reg.example")


# ---- bearer tokens --------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The distribution spec's token endpoint: Basic credentials in, a signed JWT out."""

    def __init__(self, pki: Path, service: str) -> None:
        self.pki = pki
        self.service = service
        self.port = free_port()
        self.asked: list[str] = []
        der = subprocess.run(
            ["openssl", "x509", "-in", str(pki / "token.crt"), "-outform", "DER"],
            capture_output=True,
            check=True,
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                want = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
                if self.headers.get("Authorization") != want:
                    self.send_response(401)
                    self.end_headers()
                    return
                scopes = query.get("scope", [])
                server.asked.extend(scopes)
                body = json.dumps({"token": server.token(scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {
            "iss": "test-issuer",
            "sub": USER,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.pki / "token.key")],
            input=signing.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing}.{_b64url(sig)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def token_registry(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", "token.key", "-out", "token.crt", "-subj", "/CN=token-signer"),
        cwd=pki,
    )
    tokens = TokenServer(pki, "test-registry")
    auth = (
        "auth:\n  token:\n"
        f"    realm: http://127.0.0.1:{tokens.port}/token\n"
        "    service: test-registry\n    issuer: test-issuer\n"
        f"    rootcertbundle: {pki / 'token.crt'}\n"
    )
    try:
        with running(tmp_path_factory.mktemp("token-registry"), auth=auth) as server:
            yield server, tokens
    finally:
        tokens.stop()


def test_bearer_token_flow(token_registry: Any, store: Path, tmp_path: Path) -> None:
    server, tokens = token_registry
    url = server.url("team/tok", "v1")
    line = error_line(cli("--store", str(store), "push", "base", url))
    assert f"not logged in to {server.host}" in line
    assert "token service refused anonymous access" in line
    env = {"REGISTRY_AUTH_FILE": str(auth_file(tmp_path, server.host))}
    pushed = cli("--store", str(store), "push", "base", url, env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "repository:team/tok:pull,push" in tokens.asked
    # Cross-repository mount asks for pull on the source repository in the same token.
    mounted = cli("--store", str(store), "push", "base", server.url("team/tok2", "v1"), env=env)
    assert mounted.returncode == 0, mounted.stderr
    assert "mounted" in mounted.stdout
    assert "repository:team/tok:pull" in tokens.asked
    other = tmp_path / "other"
    pulled = cli("--store", str(other), "pull", url, "--name", "x", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert Store(other).get_name("x") == Store(store).get_name("base")
    no_secret_anywhere(other, pushed.stdout, pushed.stderr, pulled.stdout, pulled.stderr)
