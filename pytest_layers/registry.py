"""Pull and push images over the OCI distribution API, and the remote build cache.

A pull reads the manifest and config (small, size-limited, digest-checked), then hands the
import to :func:`oci.import_image` through a source whose layer blobs are HTTP streams: each blob
streams through the importer's hashers and decompressor into the store's staging area, and a
layer becomes visible only after its blob digest and its DiffID matched. Layers the store holds
already are never downloaded. A push exports the image to the store's staging area (gzip layers,
deterministic bytes, so two machines that built the same layer upload the same blob), then for
each blob asks the registry first (HEAD), mounts it from another repository of the same registry
where we saw it before, and otherwise uploads it in bounded chunks streamed from the file.

HTTP goes through urllib3 (the optional extra ``pytest-layers[registry]``), imported only when a
registry is used; see docs/how-to/registry.md for why urllib3 and for the credential lookup.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import os
import queue
import re
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pytest_layers import _ocispec, oci
from pytest_layers._fmt import human_size, short_digest
from pytest_layers.errors import (
    InvalidImageError,
    LayersError,
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    RegistryUnreachableError,
)
from pytest_layers.imageref import ImageRef, is_loopback

if TYPE_CHECKING:
    from pytest_layers.backends.base import Backend
    from pytest_layers.store import Store

__all__ = [
    "Options",
    "Client",
    "PullResult",
    "PushResult",
    "RemoteCache",
    "find_credentials",
    "image_digest",
    "pull",
    "push",
    "cache_tag",
]

INSTALL_HINT = "pip install 'pytest-layers[registry]'"
_ACCEPT = ", ".join(
    [
        oci.MEDIA_TYPE_MANIFEST,
        oci.MEDIA_TYPE_INDEX,
        _ocispec._DOCKER_MANIFEST,
        _ocispec._DOCKER_MANIFEST_LIST,
    ]
)
_MANIFEST_LIMIT = 4 << 20  # the distribution spec lets registries refuse bigger manifests
_UPLOAD_CHUNK = 64 << 20  # one PATCH; the file streams through it, memory stays ~1 MiB
_READ = 1 << 20


@dataclass(frozen=True)
class Options:
    """How to reach registries: extra CA file, hosts allowed over plain HTTP, timeouts."""

    ca_file: str | None = None
    insecure: tuple[str, ...] = ()
    timeout: float = 30.0
    offline: bool = False


def _urllib3() -> Any:
    try:
        import urllib3
    except ImportError:
        raise RegistryError(
            "", "", f"registries need the urllib3 HTTP client: {INSTALL_HINT}"
        ) from None
    return urllib3


# --------------------------------------------------------------------------------------------
# credentials


def _auth_files() -> list[Path]:
    """Where container tools keep credentials, in the order podman and skopeo read them."""
    files: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    docker = os.environ.get("DOCKER_CONFIG")
    files.append(
        Path(docker) / "config.json" if docker else Path.home() / ".docker" / "config.json"
    )
    return files


def _key_host(key: str) -> str:
    # Docker writes "https://index.docker.io/v1/", podman writes "host[:port][/repo]".
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def _helper(name: str, host: str) -> tuple[str, str] | None:
    """Ask ``docker-credential-NAME get`` (the docker credential-helper protocol)."""
    exe = shutil.which(f"docker-credential-{name}")
    try:
        if exe is None:
            raise FileNotFoundError(name)
        proc = subprocess.run(
            [exe, "get"], input=host, capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        raise RegistryAuthError(
            host,
            "",
            f"the credential helper docker-credential-{name} named in the docker config is "
            "not on PATH (or cannot be run); install it or remove it from the config",
        ) from None
    if proc.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        data = json.loads(proc.stdout)
        user, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(
            host, "", f"docker-credential-{name} answered something that is not credentials"
        ) from None
    return user, secret


def find_credentials(host: str) -> tuple[str, str] | None:
    """``(user, secret)`` for ``host`` the way podman, skopeo and docker find them, or None.

    Files, first hit wins: ``$REGISTRY_AUTH_FILE``, ``${XDG_RUNTIME_DIR}/containers/auth.json``,
    ``$DOCKER_CONFIG/config.json`` (or ``~/.docker/config.json``). In each, a ``credHelpers``
    entry for the host, then ``auths`` (``auth`` is base64 ``user:secret``), then ``credsStore``.
    """
    hosts = {host, "index.docker.io", "registry-1.docker.io"} if host == "docker.io" else {host}
    for path in _auth_files():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        helpers = data.get("credHelpers") or {}
        for key, name in helpers.items() if isinstance(helpers, dict) else ():
            if _key_host(str(key)) in hosts:
                found = _helper(str(name), host)
                if found:
                    return found
        auths = data.get("auths") or {}
        for key, entry in auths.items() if isinstance(auths, dict) else ():
            if _key_host(str(key)) not in hosts or not isinstance(entry, dict):
                continue
            if entry.get("auth"):
                try:
                    user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    continue
                return user, secret
            if entry.get("username") and entry.get("password"):
                return str(entry["username"]), str(entry["password"])
        store = data.get("credsStore")
        if isinstance(store, str) and store:
            found = _helper(store, host)
            if found:
                return found
    return None


# --------------------------------------------------------------------------------------------
# the HTTP client


_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


def _sanitize(text: str) -> str:
    # Registry error bodies are shown to users: one line, bounded, no tokens echoed back.
    text = re.sub(r"(?i)(bearer|basic)\s+\S+", r"\1 ***", " ".join(text.split()))
    return text[:200]


class _Stream:
    """A blob download as a file: bounded by the descriptor's size, network errors as
    :class:`RegistryUnreachableError` (an OSError with an errno, so importers re-raise it)."""

    def __init__(self, resp: Any, client: Client, repo: str, what: str, limit: int | None):
        self._resp = resp
        self._client = client
        self._repo = repo
        self._what = what
        self._limit = limit
        self._seen = 0

    def read(self, n: int = -1) -> bytes:
        urllib3 = _urllib3()
        try:
            data: bytes = self._resp.read(_READ if n is None or n < 0 else n)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RegistryUnreachableError(
                self._client.host,
                self._repo,
                f"the connection broke while reading {self._what} ({type(exc).__name__}); "
                "nothing was stored, run again when the registry is back",
                errno.ECONNRESET,
            ) from None
        self._seen += len(data)
        if self._limit is not None and self._seen > self._limit:
            raise InvalidImageError(
                self._what,
                f"the registry sent more than the {self._limit} bytes its descriptor says; "
                "refused (nothing was stored)",
            )
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._resp.release_conn()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bounded:
    """``n`` bytes of a file from its current offset, read in 1 MiB blocks (an upload body)."""

    def __init__(self, f: IO[bytes], n: int) -> None:
        self._f = f
        self._left = n

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._f.read(min(size, _READ))
        self._left -= len(data)
        return data


class Client:
    """One registry host: scheme probing, credentials, bearer tokens, errors in words."""

    def __init__(self, host: str, opts: Options | None = None) -> None:
        self.host = host
        self.opts = opts or Options()
        self._pool: Any = None
        self._base: str | None = None
        self._scheme: str | None = None  # "basic" or "bearer", from the registry's challenge
        self._challenge: dict[str, str] = {}
        self._tokens: dict[str, str] = {}
        self._creds: tuple[str, str] | None = None
        self._creds_known = False
        self.requests: list[str] = []  # "METHOD path status", for the report and tests

    # -- connection

    def _manager(self) -> Any:
        if self._pool is None:
            urllib3 = _urllib3()
            ctx = ssl.create_default_context()  # the system store; honours SSL_CERT_FILE
            if self.opts.ca_file:
                try:
                    ctx.load_verify_locations(cafile=self.opts.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    raise RegistryError(
                        self.host, "", f"cannot load the CA file {self.opts.ca_file}: {exc}"
                    ) from None
            self._pool = urllib3.PoolManager(
                ssl_context=ctx,
                timeout=urllib3.Timeout(connect=self.opts.timeout, read=self.opts.timeout),
                retries=False,
                maxsize=4,
                blocksize=_READ,
            )
        return self._pool

    def _plain_allowed(self) -> bool:
        name = self.host.rsplit(":", 1)[0]
        return (
            is_loopback(self.host) or self.host in self.opts.insecure or name in self.opts.insecure
        )

    def _raw(self, method: str, url: str, **kw: Any) -> Any:
        urllib3 = _urllib3()
        if self.opts.offline:
            raise RegistryUnreachableError(
                self.host, "", "--layers-offline is set: no network access", errno.ENETUNREACH
            )
        try:
            resp = self._manager().request(method, url, redirect=False, **kw)
        except urllib3.exceptions.SSLError:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            m = re.search(r"\[Errno -?\d+\] ([^)\]'\"]+)", str(exc))
            why = m.group(1).strip() if m else type(exc).__name__
            raise RegistryUnreachableError(
                self.host, "", f"cannot reach the registry: {why}", errno.ECONNREFUSED
            ) from None
        self.requests.append(f"{method} {urllib.parse.urlsplit(url).path} {resp.status}")
        return resp

    def base(self) -> str:
        """``https://HOST`` (or ``http://HOST`` where plain HTTP is allowed and TLS is not
        spoken), found with one ``GET /v2/``."""
        if self._base is not None:
            return self._base
        urllib3 = _urllib3()
        try:
            resp = self._raw("GET", f"https://{self.host}/v2/")
            self._base = f"https://{self.host}"
        except urllib3.exceptions.SSLError as exc:
            text = str(exc)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                raise RegistryError(
                    self.host,
                    "",
                    "TLS certificate not trusted (unknown CA or wrong host name); trust the "
                    "registry's CA with --layers-registry-ca=PATH (pytest-layers "
                    "--registry-ca PATH) or SSL_CERT_FILE=PATH",
                    errno.EPROTO,
                ) from None
            if not self._plain_allowed():
                raise RegistryError(
                    self.host,
                    "",
                    f"TLS handshake failed ({_sanitize(text)}); plain HTTP is used only for "
                    "loopback hosts and hosts listed in ini layers_insecure_registries",
                    errno.EPROTO,
                ) from None
            resp = self._raw("GET", f"http://{self.host}/v2/")
            self._base = f"http://{self.host}"
        if resp.status == 401:
            self._learn(resp)
        resp.drain_conn()
        resp.release_conn()
        return self._base

    # -- authentication

    def _credentials(self) -> tuple[str, str] | None:
        if not self._creds_known:
            self._creds = find_credentials(self.host)
            self._creds_known = True
        return self._creds

    def _learn(self, resp: Any) -> None:
        header = resp.headers.get("WWW-Authenticate", "")
        scheme = header.split(" ", 1)[0].lower()
        if scheme in ("basic", "bearer"):
            self._scheme = scheme
            self._challenge = dict(_CHALLENGE_RE.findall(header))

    def _token(self, scopes: Sequence[str], repo: str) -> str:
        key = " ".join(scopes)
        if key in self._tokens:
            return self._tokens[key]
        realm = self._challenge.get("realm")
        if not realm:
            raise RegistryAuthError(self.host, repo, "bearer challenge without a realm")
        query = [("scope", s) for s in scopes]
        if self._challenge.get("service"):
            query.insert(0, ("service", self._challenge["service"]))
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {}
        creds = self._credentials()
        if creds:
            headers["Authorization"] = (
                "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            )
        urllib3 = _urllib3()
        try:
            resp = self._manager().request("GET", url, headers=headers, redirect=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RegistryUnreachableError(
                self.host, repo, f"cannot reach the token service ({type(exc).__name__})"
            ) from None
        if resp.status in (401, 403):
            raise RegistryAuthError(
                self.host,
                repo,
                f"not logged in to {self.host}: the token service refused "
                f"{'the stored credentials' if creds else 'anonymous access'} (HTTP "
                f"{resp.status}); log in with `podman login {self.host}` or `docker login "
                f"{self.host}`",
            )
        if resp.status != 200:
            raise RegistryError(self.host, repo, f"token service answered HTTP {resp.status}")
        try:
            data = json.loads(resp.data[: 1 << 20])
            token: str = str(data.get("token") or data["access_token"])  # never logged
        except (ValueError, KeyError, TypeError):
            raise RegistryAuthError(self.host, repo, "token service sent no token") from None
        self._tokens[key] = token
        return token

    def _authorization(self, scopes: Sequence[str], repo: str) -> str | None:
        if self._scheme == "basic":
            creds = self._credentials()
            if creds:
                return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return None
        if self._scheme == "bearer":
            return "Bearer " + self._token(scopes, repo)
        return None

    # -- requests

    def request(
        self,
        method: str,
        path: str,
        *,
        repo: str,
        push: bool = False,
        extra_scopes: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        body: Any = None,
        stream: bool = False,
    ) -> Any:
        """One request with the authorization this registry wants; one retry after a 401
        that taught us the scheme. ``path`` is absolute or a URL from a Location header."""
        url = path if "://" in path else self.base() + path
        scopes = [f"repository:{repo}:{'pull,push' if push else 'pull'}", *extra_scopes]
        resp = None
        for attempt in range(2):
            sent = dict(headers or {})
            auth = self._authorization(scopes, repo)
            if auth and urllib.parse.urlsplit(url).netloc == self.host:
                sent["Authorization"] = auth
            resp = self._raw(method, url, headers=sent, body=body, preload_content=not stream)
            if resp.status != 401 or attempt:
                break
            known = self._scheme
            self._learn(resp)
            if self._scheme is None:
                break
            if auth is not None and known == self._scheme:
                if self._scheme != "bearer":
                    break  # the credentials were refused: check() says so
                self._tokens.pop(" ".join(scopes), None)  # an expired token: ask again
            if self._scheme == "basic" and self._credentials() is None:
                break
            resp.drain_conn()
            if hasattr(body, "seek"):
                body.seek(0)
        return resp

    def check(self, resp: Any, repo: str, what: str, ok: Sequence[int] = (200,)) -> Any:
        """``resp`` when its status is in ``ok``; otherwise the error, in words."""
        if resp.status in ok:
            return resp
        detail = ""
        with contextlib.suppress(Exception):
            body = json.loads(resp.data[:65536])
            detail = "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in body.get("errors", [])[:2]
            )
        detail = f" ({_sanitize(detail)})" if detail else ""
        if resp.status == 401:
            creds = self._credentials()
            raise RegistryAuthError(
                self.host,
                repo,
                f"not logged in to {self.host}: HTTP 401 Unauthorized for {what}"
                f"{' (the stored credentials were refused)' if creds else ''}; log in with "
                f"`podman login {self.host}` or `docker login {self.host}`",
            )
        if resp.status == 403:
            raise RegistryAuthError(
                self.host, repo, f"HTTP 403 Forbidden for {what}: this account may not{detail}"
            )
        if resp.status == 404:
            raise RegistryNotFoundError(
                self.host, repo, f"no such {what} (HTTP 404 Not Found){detail}", errno.ENOENT
            )
        raise RegistryError(self.host, repo, f"HTTP {resp.status} for {what}{detail}")

    # -- the distribution API

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index, digest-checked."""
        resp = self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            repo=repo,
            headers={"Accept": _ACCEPT},
            stream=True,
        )
        try:
            self.check(resp, repo, f"image {self.host}/{repo}:{reference}")
            data = resp.read(_MANIFEST_LIMIT + 1)
        finally:
            resp.release_conn()
        if len(data) > _MANIFEST_LIMIT:
            raise InvalidImageError(f"manifest {reference}", "larger than 4 MiB; refused")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise InvalidImageError(
                f"manifest {reference}", f"the registry sent bytes with digest {digest}"
            )
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        with contextlib.suppress(ValueError, AttributeError):
            media = json.loads(data).get("mediaType") or media
        return data, media, digest

    def open_blob(self, repo: str, digest: str, size: int | None, what: str) -> _Stream:
        url = f"/v2/{repo}/blobs/{digest}"
        for _hop in range(5):
            resp = self.request("GET", url, repo=repo, stream=True)
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urllib.parse.urljoin(
                    self.base() + f"/v2/{repo}/blobs/", resp.headers["Location"]
                )
                resp.release_conn()
                continue
            break
        self.check(resp, repo, f"blob {digest} of {what}")
        length = resp.headers.get("Content-Length")
        if size is not None and length is not None and length.isdigit() and int(length) > size:
            resp.release_conn()
            raise InvalidImageError(
                what, f"the registry announces {length} bytes, the descriptor says {size}; refused"
            )
        return _Stream(resp, self, repo, what, size)

    def has_blob(self, repo: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo, push=True)
        resp.drain_conn()
        if resp.status == 404:
            return False
        self.check(resp, repo, f"blob {digest}")
        return True

    def _location(self, resp: Any, repo: str) -> str:
        loc = str(resp.headers.get("Location") or "")
        if not loc:
            raise RegistryError(self.host, repo, "upload answer without a Location header")
        return urllib.parse.urljoin(self.base() + "/", loc)

    def put_blob(
        self, repo: str, path: Path, digest: str, size: int, mount_from: Sequence[str] = ()
    ) -> str:
        """Make ``repo`` hold blob ``digest``: ``"exists"``, ``"mounted"`` or ``"sent"``."""
        if self.has_blob(repo, digest):
            return "exists"
        resp = None
        for other in mount_from:
            if other == repo:
                continue
            q = urllib.parse.urlencode({"mount": digest, "from": other})
            resp = self.request(
                "POST",
                f"/v2/{repo}/blobs/uploads/?{q}",
                repo=repo,
                push=True,
                extra_scopes=[f"repository:{other}:pull"],
            )
            resp.drain_conn()
            if resp.status == 201:
                return "mounted"
            if resp.status == 202:
                break  # the registry would not mount; it opened an upload instead
            resp = None
        if resp is None:
            resp = self.request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo, push=True)
            resp.drain_conn()
            self.check(resp, repo, f"upload of blob {digest}", ok=(202,))
        loc = self._location(resp, repo)
        minimum = resp.headers.get("OCI-Chunk-Min-Length", "0")
        chunk = max(int(minimum) if minimum.isdigit() else 0, _UPLOAD_CHUNK)
        offset = 0
        with open(path, "rb") as f:
            while offset < size:
                n = min(chunk, size - offset)
                resp = self.request(
                    "PATCH",
                    loc,
                    repo=repo,
                    push=True,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(n),
                        "Content-Range": f"{offset}-{offset + n - 1}",
                    },
                    body=_Bounded(f, n),
                )
                resp.drain_conn()
                self.check(resp, repo, f"upload of blob {digest}", ok=(202,))
                loc = self._location(resp, repo)
                offset += n
        sep = "&" if "?" in loc else "?"
        resp = self.request(
            "PUT",
            f"{loc}{sep}{urllib.parse.urlencode({'digest': digest})}",
            repo=repo,
            push=True,
            headers={"Content-Length": "0", "Content-Type": "application/octet-stream"},
            body=b"",
        )
        resp.drain_conn()
        self.check(resp, repo, f"upload of blob {digest}", ok=(201,))
        return "sent"

    def put_manifest(self, repo: str, reference: str, data: bytes, media: str) -> None:
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            repo=repo,
            push=True,
            headers={"Content-Type": media},
            body=data,
        )
        self.check(resp, repo, f"manifest {reference}", ok=(201,))


# --------------------------------------------------------------------------------------------
# pulling


class _RegistrySource(oci._Source):
    """An image in a registry, read the way :func:`oci.import_image` reads a layout: the
    manifest and config are fetched now (small), layer blobs stream on ``open``."""

    def __init__(self, client: Client, ref: ImageRef) -> None:
        self.path = Path(str(ref))
        self._tar = None
        self._members = {}
        self.client = client
        self.ref = ref
        self._files: dict[str, bytes] = {}
        self._sizes: dict[str, int | None] = {}
        self._what: dict[str, str] = {}
        data, media, digest = client.get_manifest(ref.repo, ref.reference)
        self.digest = digest
        if media in (oci.MEDIA_TYPE_INDEX, _ocispec._DOCKER_MANIFEST_LIST):
            data, media, digest = self._pick(data)
        self.manifest_digest = digest
        self._files[f"blobs/sha256/{digest.split(':', 1)[1]}"] = data
        manifest = oci._loads(data, f"manifest {digest}")
        if not isinstance(manifest, dict):
            raise InvalidImageError(f"manifest {digest}", "is not a JSON object")
        self.layer_digests: list[str] = []
        descs = [manifest.get("config"), *(manifest.get("layers") or [])]
        for i, desc in enumerate(descs):
            if not isinstance(desc, dict):
                continue
            name = oci._blob_name(desc.get("digest"), f"manifest {digest}")
            size = desc.get("size")
            self._sizes[name] = size if isinstance(size, int) and size >= 0 else None
            self._what[name] = f"layer {i} ({desc['digest']})" if i else "image config"
            if i:
                self.layer_digests.append(str(desc["digest"]))
        self._files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
        self._files["index.json"] = json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [{"mediaType": media, "digest": digest, "size": len(data)}],
            }
        ).encode()

    def _pick(self, data: bytes) -> tuple[bytes, str, str]:
        index = oci._loads(data, f"index {self.digest}")
        arch, _ = _ocispec._platform()
        mine = [
            m
            for m in (index.get("manifests") or [] if isinstance(index, dict) else [])
            if isinstance(m, dict)
            and (m.get("platform") or {}).get("os") in (None, "linux")
            and (m.get("platform") or {}).get("architecture") in (None, arch)
        ]
        if not mine:
            raise InvalidImageError(str(self.ref), f"the index has no image for linux/{arch}")
        child = str(mine[0].get("digest"))
        oci._parse_digest(child, f"index {self.digest}")
        return self.client.get_manifest(self.ref.repo, child)

    def close(self) -> None:
        pass

    def exists(self, name: str) -> bool:
        return name in self._files or name in self._sizes

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if name in self._files:
            yield io.BytesIO(self._files[name])
            return
        if name not in self._sizes:
            raise InvalidImageError(name, f"not part of {self.ref}")
        digest = name.split("/", 1)[1].replace("/", ":", 1)
        what = f"{self._what[name]} of {self.ref}"
        with self.client.open_blob(self.ref.repo, digest, self._sizes[name], what) as stream:
            yield stream  # type: ignore[misc]


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` stored: the import's result and the manifest digest it came from."""

    result: oci.ImportResult
    digest: str


def _seen_path(store: Store, host: str, digest: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host)
    return store.root / "registry" / "seen" / safe / digest.split(":", 1)[-1]


def _remember(store: Store, host: str, repo: str, digests: Sequence[str]) -> None:
    """Note which repositories of ``host`` hold which blobs, for cross-repository mounts."""
    for digest in digests:
        path = _seen_path(store, host, digest)
        with contextlib.suppress(OSError):
            if repo in path.read_text().split():
                continue
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(repo + "\n")


def _seen_in(store: Store, host: str, digest: str) -> list[str]:
    try:
        return _seen_path(store, host, digest).read_text().split()
    except OSError:
        return []


def image_digest(ref: ImageRef, opts: Options | None = None) -> str:
    """The digest of the manifest (or index) that ``ref`` names now: one request."""
    client = Client(ref.host, opts)
    return client.get_manifest(ref.repo, ref.reference)[2]


def pull(
    store: Store,
    ref: ImageRef,
    *,
    name: str | None = None,
    opts: Options | None = None,
    backend: Backend | None = None,
    progress: oci.Progress | None = None,
    client: Client | None = None,
    source: _RegistrySource | None = None,
) -> PullResult:
    """Import the image ``ref`` from its registry into ``store``; see the module docstring."""
    client = client or Client(ref.host, opts)
    src = source or _RegistrySource(client, ref)
    result = oci.import_image(
        store,
        src,
        name=name,
        backend=backend,
        progress=progress,
    )
    _remember(store, ref.host, ref.repo, src.layer_digests)
    return PullResult(result=result, digest=src.digest)


# --------------------------------------------------------------------------------------------
# pushing


@dataclass(frozen=True)
class PushResult:
    manifest_digest: str
    diff_ids: list[str]
    sent: int  # blobs uploaded
    existed: int  # blobs the registry had
    mounted: int  # blobs mounted from another repository
    size: int  # bytes uploaded


def push(
    store: Store,
    chain_id: str,
    dest: ImageRef,
    *,
    opts: Options | None = None,
    progress: oci.Progress | None = None,
    client: Client | None = None,
) -> PushResult:
    """Push the image whose top layer is ``chain_id`` to ``dest`` (``docker://...:TAG``)."""
    client = client or Client(dest.host, opts)
    client.base()  # fail on an unreachable or untrusted registry before exporting anything
    counts = {"sent": 0, "exists": 0, "mounted": 0}
    sent_bytes = 0
    with store.staging() as staging:
        layout = staging / "image"
        exported = oci.export_image(
            store, chain_id, layout, format="oci", tar=False, gzip_layers=True
        )
        blobs = layout / "blobs" / "sha256"
        manifest_hex = exported.manifest_digest.split(":", 1)[1]
        data = (blobs / manifest_hex).read_bytes()
        manifest = json.loads(data)
        descs = [*manifest["layers"], manifest["config"]]
        for n, desc in enumerate(descs, 1):
            digest = desc["digest"]
            started = time.monotonic()
            how = client.put_blob(
                dest.repo,
                blobs / digest.split(":", 1)[1],
                digest,
                int(desc["size"]),
                mount_from=_seen_in(store, dest.host, digest),
            )
            counts[how] += 1
            if how == "sent":
                sent_bytes += int(desc["size"])
            if progress is not None:
                kind = "config" if n == len(descs) else f"layer {n}/{len(descs) - 1}"
                progress(
                    f"{kind} {short_digest(digest)} {human_size(int(desc['size']))} {how} "
                    f"{time.monotonic() - started:.2f}s"
                )
        client.put_manifest(dest.repo, dest.reference, data, oci.MEDIA_TYPE_MANIFEST)
        _remember(store, dest.host, dest.repo, [d["digest"] for d in descs])
    return PushResult(
        manifest_digest=exported.manifest_digest,
        diff_ids=exported.diff_ids,
        sent=counts["sent"],
        existed=counts["exists"],
        mounted=counts["mounted"],
        size=sent_bytes,
    )


# --------------------------------------------------------------------------------------------
# the remote build cache


def cache_tag(key: str) -> str:
    """The tag under which the image of build-cache ``key`` lives in a cache repository: one
    immutable tag per key (BuildKit's single mutable cache ref is what concurrent jobs fight
    over; here two jobs that race on a key publish the same layers)."""
    return f"layer-{key}"


@dataclass
class _Pushed:
    layers: int = 0
    sent: int = 0
    existed: int = 0
    mounted: int = 0
    size: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class RemoteCache:
    """``--layers-cache-from`` / ``--layers-cache-to`` for one session (one process).

    :meth:`lookup` asks each ``from`` repository, in order, for the tag of a key (one request;
    a 404 is a miss) and pulls the hit through :func:`pull`, so a tampered or truncated blob is
    refused before anything becomes visible. :meth:`schedule` pushes a layer built here to the
    ``to`` repository from one background thread as the session goes: jobs of a fleet that
    start later in the same minute already find it, and no test waits for the upload.
    :meth:`finish` waits for the queue at the end of the session, bounded by ``wait``.
    """

    def __init__(
        self,
        store: Store,
        sources: Sequence[ImageRef],
        dest: ImageRef | None,
        opts: Options | None = None,
        *,
        backend: Backend | None = None,
        wait: float = 300.0,
    ) -> None:
        self.store = store
        self.sources = list(sources)
        self.dest = dest
        self.opts = opts or Options(timeout=15.0)
        self.backend = backend
        self.wait = wait
        self.down: dict[str, str] = {}  # host -> why it is not used any more
        self.pushed = _Pushed()
        self._clients: dict[str, Client] = {}
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _client(self, host: str) -> Client:
        if host not in self._clients:
            self._clients[host] = Client(host, self.opts)
        return self._clients[host]

    @staticmethod
    def _repo(ref: ImageRef) -> str:
        return f"docker://{ref.host}/{ref.repo}"

    def probe(self) -> list[str]:
        """One ``GET /v2/`` per registry; each unusable one is one line (for the header) and
        is skipped for the rest of the session."""
        lines = []
        seen: set[str] = set()
        for ref in [*self.sources, *([self.dest] if self.dest else [])]:
            if ref.host in seen:
                continue
            seen.add(ref.host)
            try:
                self._client(ref.host).base()
            except RegistryError as exc:
                self.down[ref.host] = str(exc)
                lines.append(f"layers: remote cache {self._repo(ref)} not used: {exc}")
        return lines

    def lookup(self, key: str, parent: str | None) -> tuple[str | None, str, float]:
        """``(chain id, where from, seconds)`` of a hit, pulled into the store, or
        ``(None, why not, 0)``; ``why not`` is empty for a plain miss."""
        notes = []
        for src in self.sources:
            if src.host in self.down:
                continue
            ref = src.with_tag(cache_tag(key))
            started = time.monotonic()
            client = self._client(src.host)
            try:
                try:
                    source = _RegistrySource(client, ref)
                except RegistryNotFoundError:
                    continue  # a miss
                pulled = pull(self.store, ref, client=client, source=source, backend=self.backend)
            except RegistryUnreachableError as exc:
                self.down[src.host] = str(exc)
                notes.append(f"{self._repo(src)} unreachable")
                continue
            except (LayersError, OSError) as exc:
                notes.append(f"{self._repo(src)} refused: {exc}")
                continue
            top = pulled.result.chain_id
            below = pulled.result.chain_ids[-2] if len(pulled.result.chain_ids) > 1 else None
            if below != parent:
                notes.append(f"{self._repo(src)} holds a layer on another parent (ignored)")
                continue
            return top, self._repo(src), time.monotonic() - started
        return None, "; ".join(notes), 0.0

    def schedule(self, chain_id: str, key: str) -> None:
        """Push ``chain_id``'s image as the tag of ``key``, in the background."""
        if self.dest is None or self.dest.host in self.down:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._worker, name="pytest-layers cache push", daemon=True
                )
                self._thread.start()
        self._queue.put((chain_id, key))

    def _worker(self) -> None:
        while (item := self._queue.get()) is not None:
            chain_id, key = item
            dest = self.dest
            if dest is None or dest.host in self.down:
                continue
            started = time.monotonic()
            try:
                result = push(
                    self.store,
                    chain_id,
                    dest.with_tag(cache_tag(key)),
                    client=self._client(dest.host),
                )
            except Exception as exc:  # a failed push is reported at session end, never raised
                if isinstance(exc, RegistryUnreachableError):
                    self.down[dest.host] = str(exc)
                self.pushed.errors.append(f"{short_digest(chain_id)}: {exc}")
                continue
            p = self.pushed
            p.layers += 1
            p.sent += result.sent
            p.existed += result.existed
            p.mounted += result.mounted
            p.size += result.size
            p.seconds += time.monotonic() - started

    def finish(self) -> list[str]:
        """Wait (at most ``wait`` seconds) for pending pushes; one line saying what happened."""
        if self._thread is None or self.dest is None:
            return []
        self._queue.put(None)
        self._thread.join(self.wait)
        p = self.pushed
        where = self._repo(self.dest)
        lines = []
        if p.layers:
            lines.append(
                f"layers: pushed {p.layers} image(s) to the cache {where} in {p.seconds:.1f}s: "
                f"{p.sent} blobs sent ({human_size(p.size)}), {p.existed} already there, "
                f"{p.mounted} mounted"
            )
        for error in p.errors[:3]:
            lines.append(f"layers: cache push to {where} failed: {error}")
        if self._thread.is_alive():
            lines.append(
                f"layers: cache push to {where} still running after {self.wait:.0f}s; "
                "abandoned (the next session that builds those layers pushes them)"
            )
        return lines
