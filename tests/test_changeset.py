"""Unit tests of changeset.py: Change, ImageView, the change lists' rules, write_layer details.

The end-to-end round trip of every layer edge case is in test_edge_cases.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import resource
import socket
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from treeutil import make_tree, set_tree_mtimes, whiteout

from pytest_layers import _changelist, _dirfd, changeset, layertar, namespaces
from pytest_layers.changeset import Change, Entry, ImageView
from pytest_layers.errors import InvalidLayerError

EPOCH = layertar.DEFAULT_EPOCH


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    old = os.umask(0o022)
    yield
    os.umask(old)


def strs(entries: list[Entry]) -> list[str]:
    return [str(c) for c in changeset.to_changes(entries)]


def layer(path: Path, spec: dict[str, object]) -> Path:
    make_tree(path, spec)
    set_tree_mtimes(path, EPOCH)
    return path


# --------------------------------------------------------------------------------------------
# Change


def test_change_str_repr_and_order() -> None:
    c = Change("A", "/etc/app.conf")
    assert str(c) == "A /etc/app.conf"
    assert repr(c) == "Change('A', '/etc/app.conf')"
    assert (c.kind, c.path) == ("A", "/etc/app.conf")
    assert c == Change(kind="A", path="/etc/app.conf")
    assert len({c, Change("A", "/etc/app.conf")}) == 1
    # Sorted by path, not by kind.
    got = sorted([Change("D", "/b"), Change("A", "/a/b"), Change("C", "/a")])
    assert [str(x) for x in got] == ["C /a", "A /a/b", "D /b"]


@pytest.mark.parametrize(("kind", "path"), [("X", "/a"), ("A", "a"), ("a", "/a")])
def test_change_rejects_bad_values(kind: str, path: str) -> None:
    with pytest.raises(ValueError, match="Change"):
        Change(kind, path)


def test_change_is_frozen() -> None:
    c = Change("C", "/x")
    with pytest.raises(AttributeError):
        c.kind = "A"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# ImageView


def test_imageview_overlay_flavor(tmp_path: Path) -> None:
    bottom = layer(
        tmp_path / "l0",
        {
            "a": None,
            "a/x": "x0",
            "a/y": "y0",
            "d": None,
            "d/sub": None,
            "d/sub/z": "z",
            "f": None,
            "f/child": "c",
            "o": None,
            "o/old": "old",
            "keep": "k0",
        },
    )
    middle = tmp_path / "l1"
    make_tree(middle, {"a": None, "a/x": "x1", "a/new": "n", "f": "now a file"})
    whiteout(middle / "a/y")
    whiteout(middle / "d")
    top = tmp_path / "l2"
    make_tree(top, {"o": None, "o/fresh": "f", "d": None, "d/again": "g"})
    os.setxattr(top / "o", "user.overlay.opaque", b"y")
    view = ImageView([top, middle, bottom], "overlay")

    assert view.listdir("") == ["a", "d", "f", "keep", "o"]
    assert view.listdir("a") == ["new", "x"]
    assert view.lookup("a/x") == middle / "a/x"
    assert view.lookup("keep") == bottom / "keep"
    assert view.lookup("a/y") is None  # whiteout
    assert view.lstat("a/y") is None
    # d was deleted in l1 and made again in l2: only l2's child is visible.
    assert view.listdir("d") == ["again"]
    assert view.lookup("d/sub") is None
    # f became a file in l1: the lower directory's children are gone.
    assert view.lookup("f/child") is None
    assert view.listdir("f") == []
    st = view.lstat("f")
    assert st is not None
    assert stat.S_ISREG(st.st_mode)
    # o is opaque in l2.
    assert view.listdir("o") == ["fresh"]
    assert view.lookup("o/old") is None
    assert view.lookup("nope") is None
    assert view.lookup("nope/deeper") is None


def test_imageview_marker_flavor(tmp_path: Path) -> None:
    bottom = layer(tmp_path / "l0", {"a": None, "a/x": "x0", "a/y": "y0", "o": None, "o/old": "1"})
    top = tmp_path / "l1"
    # .wh.x with x in the same layer: deleted below, recreated here.
    make_tree(
        top,
        {
            "a": None,
            "a/.wh.y": "",
            "a/.wh.x": "",
            "a/x": "x1",
            "o": None,
            "o/.wh..wh..opq": "",
            "o/fresh": "f",
        },
    )
    view = ImageView([top, bottom], "marker")
    assert view.listdir("a") == ["x"]
    assert view.lookup("a/x") == top / "a/x"
    assert view.lookup("a/y") is None
    assert view.lookup("a/.wh.y") is None
    assert view.listdir("o") == ["fresh"]
    assert view.lookup("o/old") is None


def test_imageview_caches_lookups_and_listings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec: dict[str, object] = {"d": None}
    spec.update({f"d/f{i}": str(i) for i in range(50)})
    bottom = layer(tmp_path / "l0", spec)
    top = layer(tmp_path / "l1", {"d": None, "d/f0": "new"})
    calls: list[str] = []
    real_scandir, real_lstat, real_stat = os.scandir, os.lstat, os.stat

    def scandir(path: object) -> object:
        calls.append("scandir")
        return real_scandir(path)  # type: ignore[call-overload]

    def lstat(path: object, **kw: object) -> object:
        calls.append("lstat")
        return real_lstat(path, **kw)  # type: ignore[arg-type]

    def stat_(path: object, **kw: object) -> object:
        calls.append("lstat")  # the view stats names relative to directory fds
        return real_stat(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "stat", stat_)

    # A couple of lookups cost a couple of lstat calls, no directory listing.
    view = ImageView([top, bottom], "overlay")
    assert view.lookup("d/f3") == bottom / "d/f3"
    assert view.lookup("d/f0") == top / "d/f0"
    assert "scandir" not in calls
    assert len(calls) <= 6

    # Many lookups list each layer directory once; repeating them costs no system call.
    view = ImageView([top, bottom], "overlay")
    for i in range(50):
        assert view.lstat(f"d/f{i}") is not None
    assert calls.count("scandir") <= 2
    before = len(calls)
    for _ in range(2):
        for i in range(50):
            assert view.lstat(f"d/f{i}") is not None
        assert len(view.listdir("d")) == 50
    assert len(calls) == before


def test_imageview_empty_image() -> None:
    view = ImageView([], "overlay")
    assert view.listdir("") == []
    assert view.lookup("") is None
    assert view.lookup("etc") is None


def test_imageview_rejects_unknown_flavor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flavor"):
        ImageView([tmp_path], "aufs")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# change lists


def _copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def test_since_ns_reads_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec: dict[str, object] = {"d": None}
    spec.update({f"d/f{i:03}": f"content {i:03}" for i in range(300)})
    base = layer(tmp_path / "base", spec)
    tree = tmp_path / "tree"
    _copy(base, tree)
    since = changeset.ctime_mark(tmp_path)
    (tree / "d/f007").write_text("CONTENT 007")  # same size
    compared: list[str] = []
    real = _changelist._same_content

    def recording(a: int, b: int, size: int, *stats: os.stat_result, **kw: Any) -> bool:
        compared.append(os.path.relpath(os.readlink(f"/proc/self/fd/{a}"), tree))
        return real(a, b, size, *stats, **kw)

    monkeypatch.setattr(_changelist, "_same_content", recording)
    view = ImageView([base], "overlay")
    assert strs(changeset.changes_from_tree(tree, view, since_ns=since)) == ["C /d", "C /d/f007"]
    assert compared == ["d/f007"]
    compared.clear()
    assert strs(changeset.changes_from_tree(tree, view)) == ["C /d", "C /d/f007"]
    assert len(compared) == 300  # the exact mode does read everything


def test_since_ns_catches_a_directory_renamed_over_another(tmp_path: Path) -> None:
    spec = {
        "x": None,
        "x/f": "1111",
        "x/sub": None,
        "x/sub/g": "g1",
        "y": None,
        "y/f": "22",
        "y/sub": None,
        "y/sub/g": "g2",
    }
    base = layer(tmp_path / "base", spec)
    tree = tmp_path / "tree"
    _copy(base, tree)
    since = changeset.ctime_mark(tmp_path)
    subprocess.run(["rm", "-rf", str(tree / "x")], check=True)
    os.rename(tree / "y", tree / "x")  # x/sub/g keeps its old ctime but is y's content
    view = ImageView([base], "overlay")
    exact = changeset.changes_from_tree(tree, view)
    assert strs(exact) == ["C /x", "C /x/f", "C /x/sub", "C /x/sub/g", "D /y"]
    assert changeset.changes_from_tree(tree, view, since_ns=since) == exact


def test_exclude_hides_init_layer_paths(tmp_path: Path) -> None:
    base = layer(tmp_path / "base", {"etc": None, "etc/hosts": "h", "etc/os": "o"})
    tree = tmp_path / "tree"
    _copy(base, tree)
    (tree / "etc/hostname").write_text("web-1\n")  # init layer file
    (tree / "etc/hosts").write_text("changed by init\n")
    (tree / "run").mkdir()
    (tree / "run/init-only").write_text("x")
    (tree / "etc/os").unlink()  # a real change
    view = ImageView([base], "overlay")
    exclude = ["etc/hostname", "/etc/hosts", "run/"]
    got = changeset.changes_from_tree(tree, view, exclude=exclude)
    assert strs(got) == ["C /etc", "D /etc/os"]

    upper = tmp_path / "upper"
    make_tree(upper, {"etc": None, "etc/hostname": "web-1\n", "run": None, "run/x": "x"})
    whiteout(upper / "etc/hosts")  # the test deleted an init-layer file: still not ours
    whiteout(upper / "etc/os")
    assert strs(changeset.changes_from_upper(upper, view, exclude=exclude)) == [
        "C /etc",
        "D /etc/os",
    ]


def test_upper_fuse_marker_whiteouts_and_stray_whiteouts(tmp_path: Path) -> None:
    base = layer(tmp_path / "base", {"etc": None, "etc/a": "a", "etc/b": "b"})
    view = ImageView([base], "overlay")
    upper = tmp_path / "upper"
    make_tree(upper, {"etc": None, "etc/.wh.a": ""})
    whiteout(upper / "etc/never-existed")  # nothing to delete: not a change
    os.utime(upper / "etc", (EPOCH, EPOCH))
    assert strs(changeset.changes_from_upper(upper, view, upper_flavor="fuse")) == [
        "C /etc",
        "D /etc/a",
    ]
    with pytest.raises(ValueError, match="upper flavor"):
        changeset.changes_from_upper(upper, view, upper_flavor="tree")


def test_imported_mtimes_above_epoch_are_not_changes(tmp_path: Path) -> None:
    # Imported layers keep their own (late) mtimes; an untouched copy of them is no change,
    # a touched one is (the layer will store the clamped mtime).
    base = tmp_path / "base"
    make_tree(base, {"etc": None, "etc/a": "a", "etc/b": "b"})
    set_tree_mtimes(base, 1_700_000_000)
    tree = tmp_path / "tree"
    _copy(base, tree)
    os.utime(tree / "etc/b", (1_700_000_100, 1_700_000_100))
    view = ImageView([base], "overlay")
    assert strs(changeset.changes_from_tree(tree, view)) == ["C /etc", "C /etc/b"]


def test_entry_is_immutable_and_builds_its_source_on_demand(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    rooted = Entry("f", "A", root=tmp_path)
    assert rooted.source == tmp_path / "f"
    assert rooted == Entry("f", "A", root=os.fspath(tmp_path))
    assert rooted != Entry("f", "A", tmp_path / "f")  # same place, said differently
    assert pickle.loads(pickle.dumps(rooted)) == rooted
    assert len({rooted, Entry("f", "A", root=tmp_path)}) == 1
    with pytest.raises(AttributeError, match="immutable"):
        rooted.kind = "C"  # type: ignore[misc]
    assert Entry("f", "D", root=tmp_path).source is None
    fd = changeset.open_source(rooted)
    try:
        assert stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="deletion"):
        changeset.open_source(Entry("f", "D", None))


def test_to_changes_sorts_by_path_string() -> None:
    entries = [Entry("a/b", "A", Path("/x")), Entry("a-b", "D", None), Entry("a", "C", Path("/"))]
    assert [str(c) for c in changeset.to_changes(entries)] == ["C /a", "D /a-b", "A /a/b"]


def test_ctime_mark_precedes_later_changes(tmp_path: Path) -> None:
    mark = changeset.ctime_mark(tmp_path)
    assert os.listdir(tmp_path) == []
    (tmp_path / "later").write_text("x")
    assert os.lstat(tmp_path / "later").st_ctime_ns >= mark


# --------------------------------------------------------------------------------------------
# write_layer


def _entries_for(tree: Path, base: Path) -> list[Entry]:
    return changeset.changes_from_tree(tree, ImageView([base], "overlay"))


def test_write_layer_rejects_wh_names(tmp_path: Path) -> None:
    base = layer(tmp_path / "base", {"etc": None})
    tree = tmp_path / "tree"
    _copy(base, tree)
    (tree / "etc/.wh.sneaky").write_text("x")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidLayerError, match=r"etc/\.wh\.sneaky.*cannot be committed"):
        changeset.write_layer(_entries_for(tree, base), dest, flavor="overlay")


def test_write_layer_rejects_a_real_0_0_device(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    whiteout(src / "dev00")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidLayerError, match=r"dev00.*0/0"):
        changeset.write_layer([Entry("dev00", "A", src / "dev00")], dest, flavor="marker")


def test_write_layer_needs_an_empty_dest_and_ancestors(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "junk").touch()
    with pytest.raises(ValueError, match="empty"):
        changeset.write_layer([], dest, flavor="overlay")
    (dest / "junk").unlink()
    with pytest.raises(ValueError, match="parent directory 'a'"):
        changeset.write_layer([Entry("a/f", "A", tmp_path / "f")], dest, flavor="overlay")


def test_write_layer_clamps_mtimes_and_keeps_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = layer(tmp_path / "base", {"d": None})
    tree = tmp_path / "tree"
    _copy(base, tree)
    (tree / "d/old").write_text("o")
    os.utime(tree / "d/old", (1000, 1000))
    (tree / "d/new").write_text("n")  # mtime now: after the epoch
    os.symlink("old", tree / "d/link")
    os.utime(tree / "d/link", (2_000_000_000, 2_000_000_000), follow_symlinks=False)
    (tree / "d/sub").mkdir()
    (tree / "d/sub/x").write_text("x")
    os.chmod(tree / "d/sub", 0o555)  # read-only dir: its child must still get written
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1500000000")
    dest = tmp_path / "dest"
    dest.mkdir()
    changeset.write_layer(_entries_for(tree, base), dest, flavor="overlay")
    m = {p: os.lstat(dest / p).st_mtime for p in ("d", "d/old", "d/new", "d/link", "d/sub")}
    assert m == {
        "d": 1_500_000_000,
        "d/old": 1000,
        "d/new": 1_500_000_000,
        "d/link": 1_500_000_000,
        "d/sub": 1_500_000_000,
    }
    assert stat.S_IMODE(os.lstat(dest / "d/sub").st_mode) == 0o555
    assert (dest / "d/sub/x").read_text() == "x"
    os.chmod(dest / "d/sub", 0o755)  # let tmp_path cleanup in


def test_write_layer_marker_whiteouts_stats_hardlinks_sockets(tmp_path: Path) -> None:
    base = layer(tmp_path / "base", {"d": None, "d/gone": "g", "d/tree": None, "d/tree/x": "x"})
    tree = tmp_path / "tree"
    _copy(base, tree)
    (tree / "d/gone").unlink()
    subprocess.run(["rm", "-rf", str(tree / "d/tree")], check=True)
    (tree / "d/data").write_bytes(b"0123456789")
    os.link(tree / "d/data", tree / "d/data2")
    os.symlink("data", tree / "d/sym")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "d/sock"))
    sock.close()
    entries = _entries_for(tree, base)
    assert "A /d/sock" in strs(entries)  # reported as a change, skipped in the layer
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = changeset.write_layer(entries, dest, flavor="marker")
    assert stats == changeset.LayerStats(files=3, size=10)
    assert sorted(os.listdir(dest / "d")) == [".wh.gone", ".wh.tree", "data", "data2", "sym"]
    wh = os.lstat(dest / "d/.wh.gone")
    assert stat.S_ISREG(wh.st_mode)
    assert wh.st_size == 0
    assert os.lstat(dest / "d/data").st_ino == os.lstat(dest / "d/data2").st_ino
    assert changeset.layer_changes(dest, ImageView([base], "overlay"), flavor="marker") == [
        c for c in changeset.to_changes(entries) if c.path != "/d/sock"
    ]


def test_write_layer_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 256 * 1024 * 1024
    with open(src / "sparse", "wb") as f:
        f.truncate(size)
        f.seek(100 * 1024 * 1024)
        f.write(b"data")
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = changeset.write_layer([Entry("sparse", "A", src / "sparse")], dest, flavor="overlay")
    assert stats.size == size
    st = os.lstat(dest / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 <= 1024 * 1024
    with open(dest / "sparse", "rb") as f:
        f.seek(100 * 1024 * 1024)
        assert f.read(4) == b"data"


# --------------------------------------------------------------------------------------------
# layer_changes


def test_layer_changes_of_a_foreign_opaque_dir(tmp_path: Path) -> None:
    base = layer(tmp_path / "base", {"d": None, "d/a": "a", "d/b": "b", "e": None, "e/x": "x"})
    lay = tmp_path / "lay"
    make_tree(lay, {"d": None, "d/b": "B", "d/new": "n", "e": None})
    os.setxattr(lay / "d", "user.overlay.opaque", b"y")
    whiteout(lay / "e/x")
    got = [
        str(c) for c in changeset.layer_changes(lay, ImageView([base], "overlay"), flavor="overlay")
    ]
    assert got == ["C /d", "D /d/a", "C /d/b", "A /d/new", "C /e", "D /e/x"]


# --------------------------------------------------------------------------------------------
# trees deeper than PATH_MAX

DEPTH = 2_500  # 5,000 bytes of "d/": beyond PATH_MAX (4096 bytes) wherever tmp_path is
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


@pytest.fixture
def deep_tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # pytest's own cleanup (shutil.rmtree) cannot reach entries beyond PATH_MAX.
    for child in tmp_path.iterdir():
        namespaces.remove_tree(child)


def chain(depth: int, name: str = "") -> str:
    rel = "/".join(["d"] * depth)
    return f"{rel}/{name}" if name else rel


def deep(
    root: Path,
    depth: int,
    bottom: Callable[[int], None],
    *,
    middle: Callable[[int], None] | None = None,
    mtime: int | None = EPOCH,
) -> None:
    """Make (or enter) ``root/d/.../d`` (``depth`` levels) through dir fds, call ``bottom``
    with the deepest one's fd (``middle`` half-way), and give every directory ``mtime`` on
    the way back up (``None``: leave the mtimes alone)."""
    root.mkdir(exist_ok=True)
    fd = os.open(root, _O_DIR)
    try:
        for level in range(depth):
            if level == depth // 2 and middle is not None:
                middle(fd)
            with contextlib.suppress(FileExistsError):
                os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        bottom(fd)
        for _ in range(depth + 1):
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            if _ == depth:
                break
            up = os.open("..", _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = up
    finally:
        os.close(fd)


def put(fd: int, name: str, data: bytes, mtime: int | None = EPOCH) -> None:
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
    try:
        os.write(out, data)
        if mtime is not None:
            os.utime(out, (mtime, mtime))
    finally:
        os.close(out)


def listing(root: Path) -> list[str]:
    """Every entry below ``root`` as find(1) sees it (find walks any depth): path, type,
    mode, owner, mtime, link count, size of non-directories, link target."""
    out = subprocess.run(
        ["find", str(root), "-mindepth", "1", "-printf", r"%P|%y|%m|%U:%G|%T@|%n|%s|%l\n"],
        check=True,
        capture_output=True,
        text=True,
        errors="surrogateescape",
    ).stdout
    lines = []
    for line in out.splitlines():
        fields = line.split("|")
        if fields[1] == "d":
            fields[5] = fields[6] = ""  # a directory's size and link count depend on the fs
        lines.append("|".join(fields))
    return sorted(lines)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def few_fds() -> Iterator[None]:
    # Well below the 2,500 fds a walk that kept every level open would need: proves the
    # walkers, the image view and write_layer keep a bounded number open.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(400, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _deep_upper_bottom(fd: int) -> None:
    put(fd, "leaf", b"bottom\n")
    os.setxattr(_dirfd.at(fd, "leaf"), "user.deep", b"value")
    os.link("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd)
    os.symlink("leaf", "link", dir_fd=fd)
    os.utime("link", (EPOCH, EPOCH), dir_fd=fd, follow_symlinks=False)
    os.mkfifo("fifo", 0o640, dir_fd=fd)
    os.utime("fifo", (EPOCH, EPOCH), dir_fd=fd)
    os.mkdir("ro", dir_fd=fd)
    ro = os.open("ro", _O_DIR, dir_fd=fd)
    try:
        put(ro, "x", b"x")
        os.utime(ro, (EPOCH, EPOCH))
        os.chmod(ro, 0o555)
    finally:
        os.close(ro)


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["overlay", "marker"])
@pytest.mark.usefixtures("few_fds")
def test_deep_upper_diff_write_layer_and_tar_round_trip(
    deep_tmp: Path, flavor: layertar.Flavor
) -> None:
    base = layer(deep_tmp / "base", {"etc": None, "etc/keep": "k"})
    upper = deep_tmp / "upper"
    deep(upper, DEPTH, _deep_upper_bottom, middle=lambda fd: put(fd, "mid", b"half way\n"))
    fds = open_fds()

    entries = changeset.changes_from_upper(upper, ImageView([base], flavor))
    bottom = ["fifo", "leaf", "leaf2", "link", "ro", "ro/x"]
    expected = [f"A /{chain(n)}" for n in range(1, DEPTH + 1)]
    expected += [f"A /{chain(DEPTH, name)}" for name in bottom] + [f"A /{chain(DEPTH // 2, 'mid')}"]
    assert strs(entries) == sorted(expected)
    by_path = {e.path: e for e in entries}
    leaf = by_path[chain(DEPTH, "leaf")]
    assert os.fspath(leaf.source) == os.path.join(upper, chain(DEPTH, "leaf"))
    fd = changeset.open_source(leaf, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        assert os.read(fd, 100) == b"bottom\n"
    finally:
        os.close(fd)

    dest = deep_tmp / "dest"
    dest.mkdir()
    stats = changeset.write_layer(entries, dest, flavor=flavor)
    assert stats == changeset.LayerStats(files=6, size=len(b"bottom\nhalf way\nx"))
    assert listing(dest) == listing(upper)
    assert changeset.kept_xattrs(dest / chain(DEPTH, "leaf")) == {"user.deep": b"value"}
    assert open_fds() == fds, "a file descriptor was left open"

    # Its canonical tar holds every entry at full length, as find(1) sees the upper dir.
    diff_id = layertar.layer_diff_id(dest, flavor=flavor)
    tar_path = deep_tmp / "layer.tar"
    with open(tar_path, "wb") as f:
        assert layertar.write_layer_tar(dest, f, flavor=flavor) == diff_id
    types = {tarfile.REGTYPE: "f", tarfile.LNKTYPE: "f", tarfile.DIRTYPE: "d"}
    types.update({tarfile.SYMTYPE: "l", tarfile.FIFOTYPE: "p"})
    with tarfile.open(tar_path) as tf:
        members = tf.getmembers()
        seen = {
            m.name: (types[m.type], f"{m.mode:o}", f"{m.uid}:{m.gid}", m.mtime, m.linkname)
            for m in members
        }
        leaf_member = tf.getmember(chain(DEPTH, "leaf"))
        assert tf.extractfile(leaf_member).read() == b"bottom\n"  # type: ignore[union-attr]
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split("/"))  # parents first
    want = {}
    for line in listing(upper):
        path, kind, mode, owner, mtime, _n, _size, target = line.split("|")
        want[path] = (kind, mode, owner, int(float(mtime)), target)
    want[chain(DEPTH, "leaf2")] = (*want[chain(DEPTH, "leaf2")][:4], chain(DEPTH, "leaf"))
    assert seen == want
    assert leaf_member.pax_headers["SCHILY.xattr.user.deep"] == "value"

    # An entry given by an explicit source path beyond PATH_MAX is read too.
    single = deep_tmp / "single"
    single.mkdir()
    explicit = Entry("copied", "A", Path(upper, chain(DEPTH, "leaf")))
    changeset.write_layer([explicit], single, flavor=flavor)
    assert (single / "copied").read_bytes() == b"bottom\n"
    assert changeset.kept_xattrs(single / "copied") == {"user.deep": b"value"}

    # The same tree read as a copy (changes_from_tree) makes the same layer.
    again = deep_tmp / "again"
    again.mkdir()
    changeset.write_layer(
        changeset.changes_from_tree(upper, ImageView([], flavor)), again, flavor=flavor
    )
    assert layertar.layer_diff_id(again, flavor=flavor) == diff_id
    assert open_fds() == fds, "a file descriptor was left open"


def _deep_image_bottom(fd: int) -> None:
    put(fd, "old", b"old\n")
    put(fd, "gone", b"gone\n")
    put(fd, "keep", b"keep\n")


@pytest.mark.slow
@pytest.mark.usefixtures("few_fds")
def test_deep_image_lookups_and_every_change_list(deep_tmp: Path) -> None:
    base = deep_tmp / "base"
    deep(base, DEPTH, _deep_image_bottom)
    view = ImageView([base], "overlay")
    bottom = chain(DEPTH)
    st = view.lstat(chain(DEPTH, "old"))
    assert st is not None
    assert st.st_size == 4
    assert view.lookup(chain(DEPTH, "keep")) == base / chain(DEPTH, "keep")
    assert view.lstat(chain(DEPTH, "nothing")) is None
    assert view.lstat(chain(DEPTH + 3)) is None
    assert view.listdir(bottom) == ["gone", "keep", "old"]
    view.close()
    layer_list = changeset.layer_changes(base, ImageView([], "overlay"), flavor="overlay")
    assert len(layer_list) == DEPTH + 3
    assert {c.kind for c in layer_list} == {"A"}

    expected = ["C /" + chain(n) for n in range(1, DEPTH + 1)] + [
        "D /" + chain(DEPTH, "gone"),
        "A /" + chain(DEPTH, "new"),
        "C /" + chain(DEPTH, "old"),
    ]

    # The copy backend's shape: a full copy, changed after the mark; both modes agree.
    tree = deep_tmp / "tree"
    deep(tree, DEPTH, _deep_image_bottom)
    assert listing(tree) == listing(base)
    since = changeset.ctime_mark(deep_tmp)

    def change(fd: int) -> None:
        put(fd, "old", b"OLD\n", mtime=None)  # same size: only the content says it changed
        os.unlink("gone", dir_fd=fd)
        put(fd, "new", b"new\n", mtime=None)

    deep(tree, DEPTH, change, mtime=None)
    fast = changeset.changes_from_tree(tree, view, since_ns=since)
    assert sorted(strs(fast)) == sorted(expected)
    assert strs(changeset.changes_from_tree(tree, ImageView([base], "overlay"))) == strs(fast)

    # The overlay shape: copied-up directories, a 0/0 whiteout, the changed and the new file.
    upper = deep_tmp / "upper"

    def upper_bottom(fd: int) -> None:
        put(fd, "old", b"OLD\n")
        put(fd, "new", b"new\n")
        os.mknod("gone", stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=fd)

    deep(upper, DEPTH, upper_bottom)
    assert strs(changeset.changes_from_upper(upper, ImageView([base], "overlay"))) == strs(fast)

    # Committed, the layer's own change list is the same, read through the deep image.
    dest = deep_tmp / "dest"
    dest.mkdir()
    changeset.write_layer(fast, dest, flavor="overlay")
    assert [str(c) for c in changeset.layer_changes(dest, view, flavor="overlay")] == strs(fast)


def test_dir_stack_refuses_a_directory_moved_under_the_walk(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    stack = _dirfd.DirStack(os.open(tmp_path, _O_DIR), keep=2)
    try:
        a = os.open("a", _O_DIR, dir_fd=stack.top)
        stack.push(a)
        stack.push(os.open("b", _O_DIR, dir_fd=a))  # the root's fd is closed now
        os.rename(tmp_path / "a", tmp_path / "elsewhere/a")
        os.close(stack.pop())
        with pytest.raises(OSError, match="moved while the tree was being read") as info:
            stack.pop()
        assert info.value.errno == errno.ESTALE
    finally:
        stack.close()
