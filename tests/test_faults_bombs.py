"""Faults, group 8: hostile images given to ``pytest-layers import`` and ``oci_image()``.

Each test is an attack on the importer with an image crafted here: special files where the
layout has files (a FIFO would block ``open`` forever), malformed or deeply nested JSON,
decompression and header bombs, sparse files of huge apparent size, names and xattrs the
kernel refuses, more layers than overlayfs stacks. Every one must end in a single-line error
naming the culprit, with a canary outside the store unchanged, nothing stored under the
image's name, nothing left in the store's ``tmp/`` and the store verifying clean.

The bombs run once more under a 2 GiB address-space limit with the store on a 1 GiB tmpfs
(mounted here, always unmounted), and report the peak memory and disk they took.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_util import child_env, our_mounts_under, out, unmount_all_under

from pytest_layers import _dirfd, _linux, _tarheader, layertar, oci
from pytest_layers.errors import InvalidLayerError, UnsafeEntryError
from pytest_layers.store import Store

pytestmark = [pytest.mark.faults, pytest.mark.slow]

GiB = 1 << 30


# ---- building hostile images ----------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def member(name: str, data: bytes = b"", **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    """A tar member: a regular file holding ``data`` unless ``fields`` say otherwise."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(ti, key, value)
    if ti.type != tarfile.REGTYPE:
        ti.size = 0
    return ti, data


def tar_of(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def raw_header(name: bytes, typeflag: bytes, size: int) -> bytes:
    """One ustar header block claiming ``size`` bytes of data (tarfile would refuse to write
    an entry whose data it does not have)."""
    ti = tarfile.TarInfo(name.decode())
    ti.type = typeflag
    ti.size = size
    return ti.tobuf(format=tarfile.GNU_FORMAT)


def oci_layout(
    dest: Path,
    blobs: list[bytes],
    *,
    diff_ids: list[str] | None = None,
    media: str = oci.MEDIA_TYPE_LAYER,
) -> Path:
    """An OCI layout directory with one image of ``blobs`` (uncompressed unless ``media`` says
    gzip; ``diff_ids`` default to the blobs' own digests)."""
    store = dest / "blobs/sha256"
    store.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (store / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    layers = [{"mediaType": media, **put(b)} for b in blobs]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(b) for b in blobs]},
    }
    cdesc = {"mediaType": oci.MEDIA_TYPE_CONFIG, **put(json.dumps(config).encode())}
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_MANIFEST,
        "config": cdesc,
        "layers": layers,
    }
    mdesc = {"mediaType": oci.MEDIA_TYPE_MANIFEST, **put(json.dumps(manifest).encode())}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dest


def docker_dir(dest: Path, layer: bytes) -> Path:
    """An unpacked docker-archive (``manifest.json``, ``config.json``, one layer)."""
    dest.mkdir(parents=True)
    config = {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "layer.tar").write_bytes(layer)
    entry = {"Config": "config.json", "RepoTags": ["x:1"], "Layers": ["layer.tar"]}
    (dest / "manifest.json").write_text(json.dumps([entry]))
    return dest


def tar_dir(src: Path, dest: Path, replace: dict[str, tuple[tarfile.TarInfo, bytes]]) -> Path:
    """``src`` as a tar, with the members named in ``replace`` swapped for crafted ones."""
    with tarfile.open(dest, "w") as tf:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            if rel in replace:
                ti, data = replace.pop(rel)
                tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
            elif path.is_file():
                tf.add(path, rel)
        for ti, data in replace.values():
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return dest


GOOD = tar_of(member("etc", type=tarfile.DIRTYPE, mode=0o755), member("etc/ok", b"ok\n"))


def gzip_bomb(uncompressed: int) -> bytes:
    """A gzip stream of ``uncompressed`` zero bytes, about 1000 times smaller: one member of
    64 MiB of zeros, repeated (a multi-member gzip is still one gzip file)."""
    piece = 64 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    one = b"".join(comp.compress(bytes(1 << 20)) for _ in range(piece >> 20)) + comp.flush()
    return one * (uncompressed // piece)


def gzip_header_bomb(dest: Path, size: int) -> Path:
    """An image whose gzip layer starts with a GNU long name of ``size`` real bytes (what
    tarfile would read into memory whole), made of repeated 64 MiB gzip members; its DiffID is
    right, so only the header limit can stop it."""
    piece = 64 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = b"".join(comp.compress(b"a" * (1 << 20)) for _ in range(piece >> 20)) + comp.flush()
    header = raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, size)
    diff = hashlib.sha256(header)
    for _ in range(size >> 20):
        diff.update(b"a" * (1 << 20))
    blob = gzip.compress(header) + body * (size // piece)
    return oci_layout(
        dest, [blob], diff_ids=["sha256:" + diff.hexdigest()], media=oci.MEDIA_TYPE_LAYER_GZIP
    )


def sparse_tar(tmp: Path, size: int, fmt: str) -> bytes:
    """GNU tar's sparse archive of a ``size``-byte file that is all hole but 8 bytes."""
    work = tmp / f"sparse-{fmt}"
    work.mkdir()
    big = work / "big"
    with open(big, "wb") as f:
        f.write(b"HEAD")
        f.truncate(size)
        f.seek(size - 4)
        f.write(b"TAIL")
    subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-cf", "out.tar", "big"], cwd=work, check=True
    )
    big.unlink()
    return (work / "out.tar").read_bytes()


# ---- the attack harness ---------------------------------------------------------------------


def run_import(
    store: Path,
    image: Path,
    *args: str,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, sys.executable, "-m", "pytest_layers.cli", "--store", str(store)]
    return subprocess.run(
        [*cmd, "import", str(image), "--name", "bad", *args],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> str:
    assert proc.returncode == 1, out(proc)
    assert "Traceback" not in proc.stderr, out(proc)
    lines = proc.stderr.strip().splitlines()
    # Progress lines for the layers that went through, then the error: one line.
    assert all(line.startswith("pytest-layers: layer ") for line in lines[:-1]), out(proc)
    assert lines[-1].startswith("pytest-layers: error: "), out(proc)
    assert needle in lines[-1], out(proc)
    assert len(lines[-1]) < 1000, out(proc)
    return lines[-1]


def assert_nothing_kept(store: Path) -> None:
    opened = Store(store)
    assert opened.get_name("bad") is None
    assert list((store / "tmp").iterdir()) == []
    assert opened.layers() == []
    assert opened.verify() == []


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "canary"
    path.write_text("untouched\n")
    yield path
    assert path.read_text() == "untouched\n"


def attack(tmp_path: Path, image: Path, needle: str, *args: str) -> str:
    """Import ``image``: a one-line error holding ``needle``, and nothing kept."""
    store = tmp_path / "store"
    Store(store)
    proc = run_import(store, image, *args)
    line = assert_one_line_error(proc, needle)
    assert_nothing_kept(store)
    return line


# ---- special files where the image has files (a FIFO used to hang import forever) ----------


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _swap_for_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


SPECIAL: dict[str, tuple[Callable[[Path], Path], str]] = {
    "docker-config-fifo": (
        lambda d: (_fifo(docker_dir(d, GOOD) / "config.json"), d)[1],
        "config.json: is a FIFO",
    ),
    "docker-config-dir": (
        lambda d: (_swap_for_dir(docker_dir(d, GOOD) / "config.json"), d)[1],
        "config.json: is a directory",
    ),
    "docker-layer-fifo": (
        lambda d: (_fifo(docker_dir(d, GOOD) / "layer.tar"), d)[1],
        "layer.tar: is a FIFO",
    ),
    "oci-index-fifo": (
        lambda d: (_fifo(oci_layout(d, [GOOD]) / "index.json"), d)[1],
        "index.json: is a FIFO",
    ),
    "oci-blob-fifo": (
        lambda d: (_fifo(oci_layout(d, [GOOD]) / "blobs/sha256" / sha(GOOD)[7:]), d)[1],
        "is a FIFO",
    ),
    "image-path-fifo": (lambda d: (_fifo(d), d)[1], "is a FIFO"),
    "docker-tar-config-dir": (
        lambda d: tar_dir(
            docker_dir(d, GOOD),
            d.with_suffix(".tar"),
            {"config.json": member("config.json", type=tarfile.DIRTYPE)},
        ),
        "config.json: is a directory in the image tar",
    ),
    "docker-tar-config-fifo": (
        lambda d: tar_dir(
            docker_dir(d, GOOD),
            d.with_suffix(".tar"),
            {"config.json": member("config.json", type=tarfile.FIFOTYPE)},
        ),
        "config.json: is a FIFO in the image tar",
    ),
    "oci-tar-blob-link-loop": (
        lambda d: tar_dir(
            oci_layout(d, [GOOD]),
            d.with_suffix(".tar"),
            {
                f"blobs/sha256/{sha(GOOD)[7:]}": member(
                    f"blobs/sha256/{sha(GOOD)[7:]}", type=tarfile.SYMTYPE, linkname="loop"
                ),
                "blobs/sha256/loop": member(
                    "blobs/sha256/loop", type=tarfile.SYMTYPE, linkname=sha(GOOD)[7:]
                ),
            },
        ),
        "links in the image tar loop",
    ),
}


@pytest.mark.parametrize("case", list(SPECIAL))
def test_special_files_in_an_image_are_refused_not_opened(
    case: str, tmp_path: Path, canary: Path
) -> None:
    make, needle = SPECIAL[case]
    image = make(tmp_path / "image")
    attack(tmp_path, image, needle)


def test_oci_image_id_of_a_fifo_config_does_not_hang(tmp_path: Path) -> None:
    """What ``oci_image()`` asks first, in the session's own process."""
    image = docker_dir(tmp_path / "image", GOOD)
    _fifo(image / "config.json")
    with pytest.raises(oci.InvalidImageError, match=r"config\.json: is a FIFO"):
        oci.image_id(image)


# ---- malformed metadata ---------------------------------------------------------------------


def _rewrite_index(d: Path, index: Any) -> Path:
    oci_layout(d, [GOOD])
    (d / "index.json").write_text(json.dumps(index) if not isinstance(index, str) else index)
    return d


def _manifest_list(d: Path) -> Path:
    oci_layout(d, [GOOD])
    data = b"[1, 2, 3]"
    (d / "blobs/sha256" / sha(data)[7:]).write_bytes(data)
    desc = {"mediaType": oci.MEDIA_TYPE_MANIFEST, "digest": sha(data), "size": len(data)}
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return d


def _docker_entry(d: Path, entry: Any) -> Path:
    docker_dir(d, GOOD)
    (d / "manifest.json").write_text(json.dumps([entry]))
    return d


METADATA: dict[str, tuple[Callable[[Path], Path], str]] = {
    "deep-json-index": (
        lambda d: _rewrite_index(d, "[" * 200_000 + "]" * 200_000),
        "index.json: JSON nested too deeply",
    ),
    "index-is-a-list": (lambda d: _rewrite_index(d, [1]), "index.json: has no 'manifests' list"),
    "annotations-not-an-object": (
        lambda d: _rewrite_index(d, {"manifests": [{"annotations": ["x"]}]}),
        "'annotations': is not a JSON object",
    ),
    "manifest-is-a-list": (_manifest_list, "is not a JSON object"),
    "docker-entry-not-an-object": (lambda d: _docker_entry(d, "x"), "manifest.json [0]"),
    "docker-repotags-not-a-list": (
        lambda d: _docker_entry(d, {"Config": "config.json", "RepoTags": 5, "Layers": []}),
        "RepoTags is not a list",
    ),
    "sha512-diff-ids": (
        lambda d: oci_layout(d, [GOOD], diff_ids=["sha512:" + "ab" * 64]),
        "sha512 DiffIDs are not supported",
    ),
    "600-layers": (
        lambda d: oci_layout(d, [tar_of(member(f"f{i}", b"%d" % i)) for i in range(600)]),
        "has 600 layers, but the kernel stacks at most 500",
    ),
}


@pytest.mark.parametrize("case", list(METADATA))
def test_malformed_metadata_is_one_line_and_stores_nothing(
    case: str, tmp_path: Path, canary: Path
) -> None:
    make, needle = METADATA[case]
    image = make(tmp_path / "image")
    attack(tmp_path, image, needle)


# ---- hostile layer content ------------------------------------------------------------------


def _pax_size_beyond_data() -> bytes:
    ti, _ = member("big")
    ti.pax_headers = {"size": "999999"}
    head = tar_of((ti, b""))[: 3 * 512]  # PAX header + its records + the ustar header
    return head + b"x" * 4096 + b"\0" * 1024


def _gnu_longname_bomb() -> bytes:
    return raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, 2 * GiB) + b"a" * 8192


def _pax_bomb() -> bytes:
    return raw_header(b"PaxHeader/x", tarfile.XHDTYPE, 2 * GiB) + b"9" * 8192


def _pax_global_bombs() -> bytes:
    """1100 global headers of 1 KB each, each before a file: every one small, together more
    than 1 MiB (tarfile keeps them all)."""
    out = []
    for i in range(1100):
        one = _tarheader._pax_record(b"comment%d" % i, b"c" * 1000)
        out.append(raw_header(b"pax_global_header", tarfile.XGLTYPE, len(one)))
        out.append(one.ljust(1024, b"\0"))
        out.append(raw_header(b"f%d" % i, tarfile.REGTYPE, 0))
    return b"".join(out) + b"\0" * 1024


def _header_run() -> bytes:
    """1000 small PAX headers in a row: tarfile recursed once per header."""
    one = _tarheader._pax_record(b"comment", b"c")
    block = raw_header(b"PaxHeader/x", tarfile.XHDTYPE, len(one)) + one.ljust(512, b"\0")
    return block * 1000 + raw_header(b"f", tarfile.REGTYPE, 0) + b"\0" * 1024


def _sparse_map_bomb() -> bytes:
    ti, _ = member("GNUSparseFile.0/f")
    ti.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "f",
        "GNU.sparse.realsize": "1024",
    }
    ti.size = 512
    return tar_of((ti, b"999999999999\n".ljust(512, b"\0")))


def _xattrs(name: str, values: dict[str, bytes]) -> bytes:
    ti, data = member(name, b"x")
    ti.pax_headers = {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in values.items()
    }
    return tar_of((ti, data))


CONTENT: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "name-component-over-255-bytes": (
        lambda t: tar_of(member("d/" + "n" * 300)),
        "a name component of 300 bytes",
    ),
    "xattr-of-70-KB": (
        lambda t: _xattrs("f", {"user.big": b"v" * 70_000}),
        "xattr user.big holds 70000 bytes",
    ),
    "pax-size-beyond-the-data": (lambda t: _pax_size_beyond_data(), "'big'"),
    "gnu-long-name-of-2-GiB": (lambda t: _gnu_longname_bomb(), "its GNU long name: 2147483648"),
    "pax-header-of-2-GiB": (lambda t: _pax_bomb(), "its PAX extended header: 2147483648"),
    "pax-global-headers-over-1-MiB": (lambda t: _pax_global_bombs(), "the PAX global headers"),
    "gnu-sparse-map-bomb": (lambda t: _sparse_map_bomb(), "its GNU sparse map"),
    "extended-header-run": (lambda t: _header_run(), "more than 16 extended headers in a row"),
    "sparse-16-GiB-gnu": (
        lambda t: sparse_tar(t, 16 * GiB, "gnu"),
        "'big': the layer's files up to this one (a sparse file counts at its full size)",
    ),
    "sparse-16-GiB-pax": (
        lambda t: sparse_tar(t, 16 * GiB, "posix"),
        "(a sparse file counts at its full size): 17179869184 bytes",
    ),
}


@pytest.mark.parametrize("case", list(CONTENT))
def test_hostile_layer_content_is_one_line_and_stores_nothing(
    case: str, tmp_path: Path, canary: Path
) -> None:
    make, needle = CONTENT[case]
    layer = make(tmp_path)
    image = oci_layout(tmp_path / "image", [layer])
    line = attack(tmp_path, image, needle)
    assert "layer 1 (" in line


@pytest.mark.requires_root
def test_malformed_security_capability_is_one_line(tmp_path: Path, canary: Path) -> None:
    layer = _xattrs("x", {"security.capability": b"\x01\x02junk"})
    image = oci_layout(tmp_path / "image", [layer])
    attack(tmp_path, image, "'x': xattr security.capability cannot be set")


def _store_keeps_or_refuses(tmp_path: Path, layer: bytes, needle: str) -> None:
    """Filesystems differ in what they allow (ext4: 65,000 links, 4 KiB of xattrs per file;
    tmpfs: far more): the import either stores the whole layer or fails in one line."""
    image = oci_layout(tmp_path / "image", [layer])
    store = tmp_path / "store"
    Store(store)
    proc = run_import(store, image, timeout=600)
    if proc.returncode == 0:
        opened = Store(store)
        assert opened.get_name("bad") is not None
        assert opened.verify() == []
        return
    assert_one_line_error(proc, needle)
    assert_nothing_kept(store)


@pytest.mark.slow
def test_66000_hardlinks_to_one_file(tmp_path: Path, canary: Path) -> None:
    links = [member(f"l{i}", type=tarfile.LNKTYPE, linkname="f") for i in range(66_000)]
    layer = tar_of(member("f", b"x"), *links, fmt=tarfile.GNU_FORMAT)
    _store_keeps_or_refuses(tmp_path, layer, "the most this filesystem allows for one file")


def test_200_xattrs_on_one_file(tmp_path: Path, canary: Path) -> None:
    layer = _xattrs("f", {f"user.x{i:03d}": b"v" * 40 for i in range(200)})
    _store_keeps_or_refuses(tmp_path, layer, "'f': xattr user.x")


def test_hardlink_limit_is_a_one_line_error(tmp_path: Path, monkeypatch: Any) -> None:
    """EMLINK from the kernel, whatever the filesystem: the applier names the entry."""
    real_link = os.link

    def link(*args: Any, **kwargs: Any) -> None:
        if str(args[1]).startswith("l"):
            raise OSError(31, "Too many links")  # EMLINK
        real_link(*args, **kwargs)

    monkeypatch.setattr(os, "link", link)
    layer = tar_of(member("f", b"x"), member("l1", type=tarfile.LNKTYPE, linkname="f"))
    (tmp_path / "root").mkdir()
    with pytest.raises(UnsafeEntryError, match="'l1': hardlink to 'f', which already has 1"):
        layertar.apply_layer_tar(io.BytesIO(layer), tmp_path / "root")


@pytest.mark.requires_user
def test_device_nodes_an_ordinary_user_cannot_make_fail_the_import(
    user_tmp_path: Path,
) -> None:
    """They used to be dropped with a warning, and the incomplete layer stored (and cached by
    ``oci_image()``) under the image's identity."""
    from conftest import run_as_user

    layer = tar_of(
        member("dev", type=tarfile.DIRTYPE, mode=0o755),
        member("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
    )
    image = oci_layout(user_tmp_path / "image", [GOOD, layer])
    store = user_tmp_path / "store"
    proc = run_as_user(
        [sys.executable, "-m", "pytest_layers.cli", "--store", str(store), "import", str(image)],
        env={"PYTHONPATH": str(Path(oci.__file__).parent.parent)},
    )
    assert_one_line_error(proc, "'dev/null': device node 1/3 cannot be created")
    top = layertar.chain_ids([sha(GOOD), sha(layer)])[-1]
    assert not (store / "layers" / top[7:]).exists()


# ---- deep layers and few file descriptors ---------------------------------------------------


def _deep_layer(depth: int) -> bytes:
    members = []
    path = ""
    for _ in range(depth):
        path += "d/"
        members.append(member(path.rstrip("/"), type=tarfile.DIRTYPE, mode=0o755))
    members.append(member(path + "leaf", b"deep\n"))
    return tar_of(*members)


@pytest.mark.requires_overlay
@pytest.mark.parametrize("nofile", [None, 64], ids=["default", "ulimit-n-64"])
def test_layer_deeper_than_path_max_imports(tmp_path: Path, nofile: int | None) -> None:
    """3000 levels of ``d/`` is 6 KB of path: apply, commit and the mtimes must all go through
    directory fds; with ``ulimit -n 64`` too."""
    layer = _deep_layer(3000)
    image = oci_layout(tmp_path / "image", [GOOD, layer])
    store = tmp_path / "store"
    prefix = ("prlimit", f"--nofile={nofile}:{nofile}", "--") if nofile else ()
    proc = run_import(store, image, prefix=prefix, timeout=600)
    assert proc.returncode == 0, out(proc)
    with Store(store) as opened:
        assert opened.verify() == []
        top = opened.resolve("bad")
        tree = opened.layer_dir(top)
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(3000):
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        st = os.stat("leaf", dir_fd=fd)
        assert st.st_mtime == 1_600_000_000  # the image's own mtime, not the clamp
    finally:
        os.close(fd)


# ---- sparse files are applied with their holes ----------------------------------------------


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_16_GiB_file_applies_as_holes(tmp_path: Path, fmt: str) -> None:
    """With the size limit raised, the 16 GiB file is written as 8 bytes of data and holes:
    the applier never reads (or writes) the zeros."""
    tar = sparse_tar(tmp_path, 16 * GiB, fmt)
    root = tmp_path / "root"
    root.mkdir()
    stats = layertar.apply_layer_tar(
        io.BytesIO(tar), root, limits=layertar.Limits(max_layer_size=32 * GiB)
    )
    st = os.stat(root / "big")
    assert st.st_size == 16 * GiB
    assert st.st_blocks * 512 <= 1 << 20
    with open(root / "big", "rb") as f:
        assert f.read(4) == b"HEAD"
        f.seek(16 * GiB - 4)
        assert f.read() == b"TAIL"
    assert stats.files == 1
    with pytest.raises(InvalidLayerError, match="a sparse file counts at its full size"):
        layertar.apply_layer_tar(io.BytesIO(tar), tmp_path / "root")


# ---- decompression bombs --------------------------------------------------------------------


def test_gzip_bomb_stops_at_the_ratio_limit(tmp_path: Path, canary: Path) -> None:
    bomb = gzip_bomb(2 * GiB)  # ~2 MB
    image = oci_layout(
        tmp_path / "image", [bomb], diff_ids=[sha(b"x")], media=oci.MEDIA_TYPE_LAYER_GZIP
    )
    attack(tmp_path, image, "a ratio above the limit of 100:1")


def test_gzip_bomb_stops_at_the_size_limit(tmp_path: Path, canary: Path) -> None:
    bomb = gzip_bomb(2 * GiB)
    image = oci_layout(
        tmp_path / "image", [bomb], diff_ids=[sha(b"x")], media=oci.MEDIA_TYPE_LAYER_GZIP
    )
    line = attack(
        tmp_path, image, "more than 67108864 bytes", "--max-layer-size", "64M", "--max-ratio", "1"
    )
    assert "--max-layer-size" in line


def test_limits_come_from_flags_then_environment(tmp_path: Path) -> None:
    env = {"PYTEST_LAYERS_MAX_LAYER_SIZE": "2G", "PYTEST_LAYERS_MAX_HEADER": "64k"}
    limits = layertar.Limits.from_env(env, max_layer_size=None, max_ratio=7)
    assert limits == layertar.Limits(max_layer_size=2 * GiB, max_ratio=7, max_header=64 << 10)
    with pytest.raises(ValueError, match="PYTEST_LAYERS_MAX_RATIO: 'lots' is not a size"):
        layertar.Limits.from_env({"PYTEST_LAYERS_MAX_RATIO": "lots"})
    # A raised header limit lets a big (but honest) long name through.
    name = "d/" + "/".join("n" * 200 for _ in range(20))
    layer = tar_of(member(name, b"x"), fmt=tarfile.GNU_FORMAT)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(InvalidLayerError, match="its GNU long name"):
        layertar.apply_layer_tar(io.BytesIO(layer), root, limits=layertar.Limits(max_header=512))
    layertar.apply_layer_tar(io.BytesIO(layer), root)
    # The name alone is 4,000 bytes: with tmp_path in front it may pass PATH_MAX.
    fd = _dirfd.open_path(os.fspath(root / name), os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        assert f.read() == b"x"


def test_progress_line_shows_the_uncompressed_size(tmp_path: Path) -> None:
    payload = tar_of(member("zeros", bytes(3 << 20)))
    image = oci_layout(
        tmp_path / "image",
        [gzip.compress(payload)],
        diff_ids=[sha(payload)],
        media=oci.MEDIA_TYPE_LAYER_GZIP,
    )
    proc = run_import(tmp_path / "store", image)
    assert proc.returncode == 0, out(proc)
    assert "-> 3.0 MiB uncompressed" in proc.stderr, out(proc)


# ---- every bomb under a 2 GiB memory limit and a 1 GiB disk ---------------------------------

BOMB_IMAGES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...], str]] = {
    # name: (image maker, extra import args, what the one-line error says)
    "gzip-bomb": (
        lambda t: oci_layout(
            t / "img", [gzip_bomb(8 * GiB)], diff_ids=[sha(b"x")], media=oci.MEDIA_TYPE_LAYER_GZIP
        ),
        (),
        "a ratio above the limit",
    ),
    "gzip-bomb-ratio-raised": (
        lambda t: oci_layout(
            t / "img", [gzip_bomb(8 * GiB)], diff_ids=[sha(b"x")], media=oci.MEDIA_TYPE_LAYER_GZIP
        ),
        ("--max-ratio", "100000"),
        "no space left on device while writing image",
    ),
    "gnu-long-name": (lambda t: oci_layout(t / "img", [_gnu_longname_bomb()]), (), "GNU long"),
    "gzip-gnu-long-name-2-GiB": (
        lambda t: gzip_header_bomb(t / "img", 2 * GiB),
        (),
        "a ratio above the limit",
    ),
    "gzip-gnu-long-name-512-MiB-ratio-raised": (
        lambda t: gzip_header_bomb(t / "img", 512 << 20),
        ("--max-ratio", "100000"),
        "its GNU long name: 536870912 bytes",
    ),
    "pax-header": (lambda t: oci_layout(t / "img", [_pax_bomb()]), (), "PAX extended header"),
    "sparse-16-GiB": (
        lambda t: oci_layout(t / "img", [sparse_tar(t, 16 * GiB, "posix")]),
        (),
        "a sparse file counts at its full size",
    ),
}

_MEASURE = """
import resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stdout)
sys.exit(proc.returncode)
"""


@pytest.fixture
def one_gib_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 GiB tmpfs for the store, unmounted whatever happens."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    _linux.mount("tmpfs", mnt, "tmpfs", 0, f"size={GiB},mode=0755")
    try:
        yield mnt
    finally:
        unmount_all_under(mnt)
        assert our_mounts_under(mnt) == []


def _peak_use(fs: Path, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.02):
        st = os.statvfs(fs)
        peak[0] = max(peak[0], (st.f_blocks - st.f_bfree) * st.f_frsize)


@pytest.mark.slow
@pytest.mark.requires_root
@pytest.mark.parametrize("bomb", list(BOMB_IMAGES))
def test_bombs_are_bounded_under_2_GiB_of_memory_and_1_GiB_of_disk(
    bomb: str, tmp_path: Path, one_gib_fs: Path, canary: Path
) -> None:
    make, args, needle = BOMB_IMAGES[bomb]
    image = make(tmp_path)
    store = one_gib_fs / "store"
    Store(store)
    peak = [0]
    stop = threading.Event()
    watcher = threading.Thread(target=_peak_use, args=(one_gib_fs, stop, peak))
    watcher.start()
    try:
        proc = run_import(store, image, *args, prefix=(sys.executable, "-c", _MEASURE), timeout=600)
    finally:
        stop.set()
        watcher.join()
    maxrss = int(proc.stdout.split("MAXRSS_KB")[-1].split()[0]) * 1024
    assert_one_line_error(proc, needle)
    assert_nothing_kept(store)
    print(f"\nBOMB {bomb}: peak RSS {maxrss >> 20} MiB, peak disk {peak[0] >> 20} MiB")
    assert maxrss < 512 << 20
