"""Applying OCI layer tars onto a tree: whiteouts, opaque dirs, metadata, and every escape."""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_as_user
from treeutil import diff_snapshots, make_tree, set_tree_mtimes, snapshot_tree, whiteout

from pytest_layers import layertar
from pytest_layers.errors import UnsafeEntryError
from pytest_layers.layertar import apply_layer_tar, write_layer_tar

T = 1_600_000_000


def build_tar(*entries: tuple[Any, ...]) -> bytes:
    """Entries: (name, "file", data) | (name, "dir") | (name, "symlink", target) |
    (name, "hardlink", target) | (name, "fifo") | (name, "chardev", major, minor), with an
    optional trailing dict of TarInfo attributes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in entries:
            extra: dict[str, Any] = entry[-1] if isinstance(entry[-1], dict) else {}
            name, kind, *args = entry[:-1] if extra else entry
            ti = tarfile.TarInfo(name)
            ti.mtime = T
            data = None
            if kind == "file":
                data = args[0] if args else b""
                ti.size = len(data)
            elif kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, args[0]
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, args[0]
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif kind == "chardev":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, args[0], args[1]
            for key, value in extra.items():
                setattr(ti, key, value)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


class Sandbox:
    """A root to apply into, with a canary beside it and a record of everything outside it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.root.mkdir()
        self.canary = base / "canary"
        self.canary.write_text("canary\n")
        self.tmp_marker = f"layertar-escape-{uuid.uuid4().hex}"
        self.before = self.outside()

    def outside(self) -> dict[str, Any]:
        return {
            k: v for k, v in snapshot_tree(self.base, exclude=["root"], dir_mtimes=False).items()
        }

    def apply(self, data: bytes) -> Any:
        return apply_layer_tar(io.BytesIO(data), self.root)

    def assert_untouched_outside(self) -> None:
        assert self.canary.read_text() == "canary\n"
        assert diff_snapshots(self.before, self.outside()) == []
        assert not Path("/tmp", self.tmp_marker).exists()


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = Sandbox(tmp_path)
    yield sandbox
    sandbox.assert_untouched_outside()


def rejected(box: Sandbox, data: bytes, entry: str) -> UnsafeEntryError:
    with pytest.raises(UnsafeEntryError) as info:
        box.apply(data)
    assert info.value.entry == entry
    assert entry in str(info.value)
    return info.value


# -- round trip ----------------------------------------------------------------------------------


def rich_tree(root: Path) -> Path:
    long_dir = "d" * 110
    make_tree(
        root,
        {
            "etc/os-release": "ID=demo\n",
            "etc/app.conf": ("file", "x=1\n", 0o640),
            "bin/su": ("file", b"\x7fELF" + bytes(5000), 0o4755),
            "bin/sg": ("file", b"sg", 0o2755),
            "bin/su-again": ("hardlink", "bin/su"),
            "tmp": None,
            "lib": ("symlink", "/usr/lib"),
            "usr/lib/rel": ("symlink", "../../etc/os-release"),
            "run/fifo": ("fifo",),
            f"{long_dir}/{'n' * 150}": "long",
            "ünïcödé/✓": "u",
            "empty": "",
        },
    )
    (root / os.fsdecode(b"raw-\xff\xfe")).write_bytes(b"raw")
    os.chmod(root / "tmp", 0o1777)
    os.setxattr(root / "etc/app.conf", "user.comment", b"\x00\xff binary")
    os.setxattr(root / "tmp", "user.dir", b"on a dir")
    set_tree_mtimes(root, T)
    os.utime(root / "etc/os-release", (T, T - 1000))
    os.utime(root / "lib", (T, T - 7), follow_symlinks=False)
    return root


def round_trip(tmp_path: Path, layer: Path, *, compress: bool = False) -> None:
    buf = io.BytesIO()
    write_layer_tar(layer, buf, flavor="overlay")
    data = gzip.compress(buf.getvalue()) if compress else buf.getvalue()
    out = tmp_path / "out"
    out.mkdir()
    stats = apply_layer_tar(io.BytesIO(data), out)
    assert stats.warnings == []
    assert diff_snapshots(snapshot_tree(layer), snapshot_tree(out)) == []


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    round_trip(tmp_path, rich_tree(tmp_path / "layer"))


def test_round_trip_gzip(tmp_path: Path) -> None:
    round_trip(tmp_path, rich_tree(tmp_path / "layer"), compress=True)


@pytest.mark.requires_root
def test_round_trip_devices_owners_and_capabilities(tmp_path: Path) -> None:
    layer = make_tree(
        tmp_path / "layer",
        {"dev/null": ("chardev", 1, 3), "dev/loop0": ("blockdev", 7, 0), "bin/ping": "x"},
    )
    os.chown(layer / "dev/null", 1234, 5678)
    os.chown(layer / "bin/ping", 1000, 1000)
    os.chmod(layer / "bin/ping", 0o6755)  # setuid survives only if chmod follows chown
    os.setxattr(layer / "bin/ping", "security.capability", bytes.fromhex("01000002" + "00" * 16))
    set_tree_mtimes(layer, T)
    round_trip(tmp_path, layer)
    assert stat.S_IMODE((tmp_path / "out/bin/ping").stat().st_mode) == 0o6755


def test_apply_from_a_non_seekable_stream(tmp_path: Path) -> None:
    layer = rich_tree(tmp_path / "layer")
    buf = io.BytesIO()
    write_layer_tar(layer, buf, flavor="overlay")
    read_fd, write_fd = os.pipe()
    data = buf.getvalue()
    import threading

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as w:
            w.write(data)

    thread = threading.Thread(target=feed)
    thread.start()
    out = tmp_path / "out"
    out.mkdir()
    with os.fdopen(read_fd, "rb") as r:
        apply_layer_tar(r, out)
    thread.join()
    assert diff_snapshots(snapshot_tree(layer), snapshot_tree(out)) == []


def test_apply_from_a_path(tmp_path: Path) -> None:
    archive = tmp_path / "layer.tar"
    archive.write_bytes(build_tar(("a", "dir"), ("a/b", "file", b"hi")))
    (tmp_path / "out").mkdir()
    stats = apply_layer_tar(archive, tmp_path / "out")
    assert (tmp_path / "out/a/b").read_bytes() == b"hi"
    assert (stats.files, stats.dirs, stats.entries) == (1, 1, 2)


# -- replacing what is there ----------------------------------------------------------------------


def test_file_replaces_directory_tree(box: Sandbox) -> None:
    make_tree(box.root, {"x/deep/f": "old"})
    box.apply(build_tar(("x", "file", b"now a file")))
    assert (box.root / "x").read_bytes() == b"now a file"


def test_directory_over_directory_updates_metadata_keeps_content(box: Sandbox) -> None:
    make_tree(box.root, {"d/keep": "k"})
    box.apply(build_tar(("d", "dir", {"mode": 0o700, "mtime": T - 50})))
    assert (box.root / "d/keep").read_text() == "k"
    st = (box.root / "d").stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert int(st.st_mtime) == T - 50


def test_directory_replaces_file_and_symlink(box: Sandbox) -> None:
    make_tree(box.root, {"f": "file", "l": ("symlink", "/elsewhere")})
    box.apply(build_tar(("f", "dir"), ("l", "dir"), ("l/x", "file", b"1")))
    assert (box.root / "f").is_dir()
    assert not (box.root / "l").is_symlink()
    assert (box.root / "l/x").read_bytes() == b"1"


def test_final_symlink_is_replaced_not_followed(box: Sandbox) -> None:
    os.symlink("../canary", box.root / "link")
    box.apply(build_tar(("link", "file", b"overwritten?")))
    assert (box.root / "link").read_bytes() == b"overwritten?"
    assert not (box.root / "link").is_symlink()


def test_hardlink_to_a_lower_file(box: Sandbox) -> None:
    make_tree(box.root, {"lower/f": "data"})
    stats = box.apply(build_tar(("new", "hardlink", "lower/f")))
    assert (box.root / "new").stat().st_ino == (box.root / "lower/f").stat().st_ino
    assert stats.hardlinks == 1


def test_symlink_mtime_restored_without_following(box: Sandbox) -> None:
    make_tree(box.root, {"target": "t"})
    os.utime(box.root / "target", (T + 99, T + 99))
    box.apply(build_tar(("l", "symlink", "target", {"mtime": T - 5})))
    assert int(os.lstat(box.root / "l").st_mtime) == T - 5
    assert int((box.root / "target").stat().st_mtime) == T + 99


# -- whiteouts ------------------------------------------------------------------------------------


def test_whiteout_deletes_file_and_whole_tree(box: Sandbox) -> None:
    make_tree(box.root, {"etc/gone": "x", "etc/keep": "k", "var/cache/a/b": "c"})
    stats = box.apply(build_tar(("etc/.wh.gone", "file"), (".wh.var", "file")))
    assert sorted(p.name for p in box.root.iterdir()) == ["etc"]
    assert os.listdir(box.root / "etc") == ["keep"]
    assert stats.whiteouts == 2


def test_whiteout_of_a_symlink_removes_the_link_not_the_target(box: Sandbox) -> None:
    make_tree(box.root, {"data/f": "x", "link": ("symlink", "data")})
    box.apply(build_tar((".wh.link", "file")))
    assert not os.path.lexists(box.root / "link")
    assert (box.root / "data/f").read_text() == "x"


def test_whiteout_through_absolute_symlink_stays_inside(box: Sandbox) -> None:
    make_tree(box.root, {"tmp/victim": "x", "evil": ("symlink", "/tmp")})
    box.apply(build_tar((f"evil/.wh.{box.tmp_marker}", "file"), ("evil/.wh.victim", "file")))
    assert not (box.root / "tmp/victim").exists()


def test_whiteout_never_hides_an_entry_of_its_own_layer(box: Sandbox) -> None:
    make_tree(box.root, {"f": "lower", "g": "lower"})
    box.apply(
        build_tar(
            ("f", "file", b"mine"), (".wh.f", "file"), (".wh.g", "file"), ("g", "file", b"g2")
        )
    )
    assert (box.root / "f").read_bytes() == b"mine"
    assert (box.root / "g").read_bytes() == b"g2"


def test_whiteout_of_dir_keeps_own_children(box: Sandbox) -> None:
    make_tree(box.root, {"d/lower": "x"})
    box.apply(build_tar(("d/mine", "file", b"m"), (".wh.d", "file")))
    assert os.listdir(box.root / "d") == ["mine"]


def test_a_directory_the_layer_changes_without_naming_keeps_its_mtime(box: Sandbox) -> None:
    # A layer that deletes, replaces or adds a child need not carry a header for the directory
    # (umoci leaves it out when its mtime looks unchanged): the tar then says nothing about
    # the directory's metadata, so it keeps the lower layer's mtime, as umoci unpacks it, and
    # not the moment of the apply.
    make_tree(box.root, {"etc/gone": "x", "etc/lnk": ("symlink", "x"), "opt/app/keep": "k"})
    set_tree_mtimes(box.root, T - 5000)
    os.utime(box.root, (T - 6000, T - 6000))
    box.apply(
        build_tar(
            ("etc/.wh.gone", "file"),
            ("etc/lnk", "symlink", "/etc/x"),
            ("opt/app/.wh..wh..opq", "file"),
            ("opt/app/fresh", "file", b"f"),
            ("top", "file", b"t"),
        )
    )
    assert sorted(os.listdir(box.root / "opt/app")) == ["fresh"]
    assert [os.lstat(box.root / d).st_mtime for d in ("etc", "opt", "opt/app")] == [T - 5000] * 3
    assert box.root.lstat().st_mtime == T - 6000


@pytest.mark.parametrize("target", ["a", "../../x"], ids=["loop", "climbs-out"])
def test_a_changed_directory_made_unreachable_later_in_the_tar_is_no_error(
    box: Sandbox, target: str
) -> None:
    # The layer writes a/x through the lower symlink a -> real, then replaces a itself with a
    # symlink that loops or climbs out (kept as a link, never followed). Every entry applies
    # safely; putting real's mtime back must not resolve a again and call the layer unsafe.
    make_tree(box.root, {"real/old": "o", "a": ("symlink", "real")})
    set_tree_mtimes(box.root, T - 5000)
    box.apply(build_tar(("a/x", "file", b"1"), ("a", "symlink", target)))
    assert os.readlink(box.root / "a") == target
    assert (box.root / "real/x").read_bytes() == b"1"


def test_opaque_directory_hides_lower_children(box: Sandbox) -> None:
    make_tree(box.root, {"d/a": "1", "d/sub/b": "2", "other": "3"})
    stats = box.apply(build_tar(("d", "dir"), ("d/.wh..wh..opq", "file"), ("d/c", "file", b"c")))
    assert os.listdir(box.root / "d") == ["c"]
    assert (box.root / "other").exists()
    assert stats.opaque_dirs == 1


def test_opaque_marker_after_own_entries_does_not_delete_them(box: Sandbox) -> None:
    make_tree(box.root, {"d/lower": "1", "d/sub/lower": "2", "d/sub/mine": "old"})
    box.apply(
        build_tar(
            ("d", "dir"),
            ("d/new", "file", b"n"),
            ("d/sub", "dir"),
            ("d/sub/mine", "file", b"m"),
            ("d/.wh..wh..opq", "file"),
        )
    )
    assert sorted(os.listdir(box.root / "d")) == ["new", "sub"]
    assert os.listdir(box.root / "d/sub") == ["mine"]
    assert (box.root / "d/sub/mine").read_bytes() == b"m"


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "d/.wh.."])
def test_invalid_whiteout_names_rejected(box: Sandbox, name: str) -> None:
    make_tree(box.root, {"d/f": "x"})
    before = snapshot_tree(box.root)
    err = rejected(box, build_tar((name, "file")), name)
    assert "not a valid whiteout name" in str(err)
    assert snapshot_tree(box.root) == before


# -- escapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../canary", "/abs", "a/../../canary", "./../canary", "a/b/../../../x"]
)
def test_entry_names_outside_root_rejected(box: Sandbox, name: str) -> None:
    rejected(box, build_tar((name, "file", b"pwned")), name)
    assert os.listdir(box.root) == []


def test_dotdot_inside_root_is_allowed(box: Sandbox) -> None:
    box.apply(build_tar(("a/../b", "file", b"ok")))
    assert (box.root / "b").read_bytes() == b"ok"


def test_absolute_symlink_written_through_lands_inside(box: Sandbox) -> None:
    make_tree(box.root, {"usr/lib": None, "lib": ("symlink", "/usr/lib")})
    box.apply(build_tar(("lib/libc.so", "file", b"libc")))
    assert (box.root / "usr/lib/libc.so").read_bytes() == b"libc"


def test_two_layer_escape_with_absolute_symlink_lands_inside(box: Sandbox) -> None:
    box.apply(build_tar(("evil", "symlink", "/tmp")))
    box.apply(build_tar((f"evil/{box.tmp_marker}", "file", b"x")))
    assert (box.root / "tmp" / box.tmp_marker).read_bytes() == b"x"


def test_two_layer_escape_with_relative_symlink_rejected(box: Sandbox) -> None:
    box.apply(build_tar(("evil", "symlink", "../../../../../../../../tmp")))
    name = f"evil/{box.tmp_marker}"
    err = rejected(box, build_tar((name, "file", b"x")), name)
    assert "climbs above the root" in str(err)


def test_two_layer_escape_to_canary_dir_rejected(box: Sandbox) -> None:
    box.apply(build_tar(("up", "symlink", "..")))
    rejected(box, build_tar(("up/canary", "file", b"pwned")), "up/canary")
    rejected(box, build_tar(("up/.wh.canary", "file")), "up/.wh.canary")


def test_dotdot_symlink_chain_inside_root(box: Sandbox) -> None:
    make_tree(box.root, {"sub/deeper": None})
    box.apply(build_tar(("l2", "symlink", "sub/deeper"), ("l1", "symlink", "l2/../..")))
    box.apply(build_tar(("l1/x", "file", b"at root")))
    assert (box.root / "x").read_bytes() == b"at root"


def test_dotdot_symlink_chain_climbing_out_rejected(box: Sandbox) -> None:
    make_tree(box.root, {"sub": None})
    box.apply(build_tar(("c2", "symlink", "sub"), ("c1", "symlink", "c2/../..")))
    rejected(box, build_tar(("c1/x", "file", b"x")), "c1/x")


def test_symlink_loop_rejected(box: Sandbox) -> None:
    box.apply(build_tar(("a", "symlink", "b"), ("b", "symlink", "a")))
    err = rejected(box, build_tar(("a/x", "file", b"x")), "a/x")
    assert "too many levels" in str(err)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("../canary", "climbs out"),
        ("nonexistent", "does not exist"),
        ("up/canary", "climbs above the root"),
        ("/etc/passwd-not-in-root", "does not exist"),
    ],
)
def test_hardlink_outside_or_missing_rejected(box: Sandbox, target: str, why: str) -> None:
    os.symlink("..", box.root / "up")
    err = rejected(box, build_tar(("link", "hardlink", target)), "link")
    assert why in str(err)
    assert not os.path.lexists(box.root / "link")


def test_hardlink_through_absolute_symlink_stays_inside(box: Sandbox) -> None:
    make_tree(box.root, {"real/f": "x", "abs": ("symlink", "/real")})
    box.apply(build_tar(("link", "hardlink", "abs/f")))
    assert (box.root / "link").stat().st_ino == (box.root / "real/f").stat().st_ino


# -- unprivileged ---------------------------------------------------------------------------------


@pytest.mark.requires_user
def test_as_ordinary_user_devices_skipped_with_warning(user_tmp_path: Path) -> None:
    archive = user_tmp_path / "layer.tar"
    archive.write_bytes(
        build_tar(
            ("null", "chardev", 1, 3),
            ("wh", "chardev", 0, 0),
            ("owned", "file", b"x", {"uid": 0, "gid": 0}),
            ("ro", "dir", {"mode": 0o555}),
            ("ro/child", "file", b"c"),
        )
    )
    os.chmod(archive, 0o644)
    code = (
        "import sys, pathlib; from pytest_layers.layertar import apply_layer_tar\n"
        "root = pathlib.Path(sys.argv[2]); root.mkdir()\n"
        "s = apply_layer_tar(pathlib.Path(sys.argv[1]), root)\n"
        "print(s.devices, '|'.join(s.warnings))\n"
    )
    proc = run_as_user(
        [sys.executable, "-c", code, str(archive), str(user_tmp_path / "root")],
        cwd="/work/main" if Path("/work/main").exists() else None,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    devices, warnings = proc.stdout.strip().split(" ", 1)
    assert devices == "1"  # the 0/0 whiteout device is allowed
    assert "'null': device 1/3 not created" in warnings
    root = user_tmp_path / "root"
    assert stat.S_ISCHR(os.lstat(root / "wh").st_mode)
    assert not os.path.lexists(root / "null")
    assert (root / "ro/child").read_bytes() == b"c"
    assert stat.S_IMODE((root / "ro").stat().st_mode) == 0o555


def test_whiteout_helper_makes_overlay_whiteouts(tmp_path: Path) -> None:
    # treeutil.whiteout is what other suites use to fake overlay upper dirs.
    path = whiteout(tmp_path / "w")
    st = os.lstat(path)
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0


# -- standalone: a layer applied as its own diff ---------------------------------------------


def test_standalone_applies_a_layer_that_only_adds(tmp_path: Path) -> None:
    data = build_tar(
        ("app", "dir"),
        ("app/bin", "file", b"x"),
        ("app/again", "hardlink", "app/bin"),
        ("app/rel", "symlink", "bin"),
    )
    out = tmp_path / "out"
    out.mkdir()
    stats = apply_layer_tar(io.BytesIO(data), out, standalone=True)
    assert stats.files == 1
    assert stats.hardlinks == 1
    assert stats.symlinks == 1
    assert os.stat(out / "app/bin").st_ino == os.stat(out / "app/again").st_ino
    assert sorted(p.name for p in (out / "app").iterdir()) == ["again", "bin", "rel"]


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ((("etc", "dir"), ("etc/.wh.os", "file", b"")), "a whiteout"),
        ((("etc", "dir"), ("etc/.wh..wh..opq", "file", b"")), "a whiteout"),
        ((("etc/new", "file", b"x"),), "parent directory is not in the layer"),
        ((("d", "dir"), ("d/h", "hardlink", "etc/os")), "hardlink target is not in the layer"),
        ((("l", "symlink", "etc"), ("l/f", "file", b"x")), "a symlink lies on its path"),
    ],
    ids=["whiteout", "opaque", "implicit-parent", "hardlink-below", "symlink-path"],
)
def test_standalone_refuses_what_depends_on_the_layers_below(
    tmp_path: Path, entries: tuple[tuple[Any, ...], ...], why: str
) -> None:
    """Each of these gives a different tree on a view of the parents than on an empty dir;
    the importer catches NeedsLowerLayers and applies the layer on a view instead."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(layertar.NeedsLowerLayers, match=why):
        apply_layer_tar(io.BytesIO(build_tar(*entries)), out, standalone=True)
    # The same tar applied the ordinary way is no error (it is a valid layer).
    (tmp_path / "merged").mkdir()
    make_tree(tmp_path / "merged", {"etc/os": "debian\n"})
    apply_layer_tar(io.BytesIO(build_tar(*entries)), tmp_path / "merged")
