"""One named test per layer edge case (docs/concepts/layers.md, whiteouts.md), end to end.

Every case runs the same round trip (``roundtrip``):

1. build the image: a base layer dir in the ``"overlay"`` flavor (mtimes at the clamp epoch, as
   a built layer has them), plus any further layers, and its merged tree;
2. make the new tree as a full copy of the merged tree (``cp -a``), then apply the operation;
3. compute the entries with ``changes_from_tree`` both exactly (``since_ns=None``) and with the
   copy backend's ctime shortcut, and check the exact ``docker diff`` list;
4. write the layer with ``write_layer`` in both flavors, produce the canonical tar of each
   (same digest), check every tar entry (names, types, modes, link targets, whiteouts), check
   ``layer_changes`` of the stored layer;
5. apply the tar onto a copy of the merged image with ``apply_layer_tar`` and require the result
   to equal the new tree (modes, owners, symlinks, hardlink groups, xattrs, clamped mtimes);
6. where the case concerns overlay upper dirs, feed a hand-built upper dir (what the kernel
   writes: 0/0 devices, ``user.overlay.opaque=y``, copied-up parents) to ``changes_from_upper``
   and require the same change list and the same diff_id.

``test_real_overlay_upper_matches_tree`` checks ``changes_from_upper`` against the real kernel.
The cross-backend suite (real mounts of every backend) lives in ``test_backend_*.py``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import stat
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from treeutil import Node, diff_snapshots, make_tree, set_tree_mtimes, snapshot_tree

from pytest_layers import changeset, layertar
from pytest_layers.changeset import Entry, ImageView
from pytest_layers.errors import UnsafeEntryError

ROOT = os.geteuid() == 0
EMPTY_TAR_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"

BASE: dict[str, Any] = {
    "etc": None,
    "etc/os-release": "ID=demo\n",
    "etc/app.conf": "debug=false\n",
    "usr": None,
    "usr/bin": None,
    "usr/bin/tool": ("file", "#!/bin/sh\necho tool\n", 0o755),
    "usr/lib": None,
    "usr/lib/a.so": "A" * 10,
    "usr/lib/b.so": "B" * 20,
    "usr/lib/sub": None,
    "usr/lib/sub/c": "C",
    "var": None,
    "var/log": None,
}


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---------------------------------------------------------------------------------------------
# harness


def cp_a(src: Path, dst: Path) -> None:
    """A full copy keeping hardlinks, modes, owners, mtimes and xattrs (the copy backend's job)."""
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


def clamped(snap: dict[str, Node]) -> dict[str, Node]:
    epoch = layertar.clamp_epoch()
    return {k: dataclasses.replace(v, mtime=min(v.mtime, epoch)) for k, v in snap.items()}


def tar_entries(data: bytes) -> dict[str, tuple[Any, ...]]:
    """Every member of a layer tar as name -> (type, ...), checking the canonical basics."""
    epoch = layertar.clamp_epoch()
    out: dict[str, tuple[Any, ...]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        assert tf.format == tarfile.PAX_FORMAT
        for m in tf.getmembers():
            assert m.name not in out, f"duplicate tar entry {m.name!r}"
            assert not m.name.startswith(("/", "./")), m.name
            assert not m.name.endswith("/"), m.name
            assert (m.uname, m.gname) == ("", ""), m.name
            assert m.mtime <= epoch, m.name
            if os.path.basename(m.name).startswith(".wh."):
                assert (m.type, m.mode, m.size, m.mtime, m.uid, m.gid) == (
                    tarfile.REGTYPE,
                    0o600,
                    0,
                    0,
                    0,
                    0,
                ), f"whiteout {m.name!r} is not an empty 0600 file with mtime 0"
                out[m.name] = ("whiteout",)
            elif m.isdir():
                out[m.name] = ("dir", m.mode)
            elif m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                content = f.read() if m.size <= 256 else m.size
                out[m.name] = ("file", m.mode, content)
            elif m.issym():
                out[m.name] = ("symlink", m.linkname)
            elif m.islnk():
                out[m.name] = ("link", m.linkname)
            elif m.isfifo():
                out[m.name] = ("fifo", m.mode)
            elif m.ischr() or m.isblk():
                out[m.name] = ("chr" if m.ischr() else "blk", m.mode, m.devmajor, m.devminor)
            else:
                raise AssertionError(f"unexpected tar member type {m.type!r} for {m.name!r}")
    names = list(out)
    assert names == sorted(names, key=lambda n: n.split("/")), "tar is not in canonical order"
    return out


@dataclasses.dataclass
class Image:
    view: ImageView
    merged: Path  # the image's merged tree, as the copy backend would copy it
    layers: list[Path]  # bottom first


def build_image(tmp: Path, spec: dict[str, Any], *more: Callable[[Path], None]) -> Image:
    """A base layer from ``spec`` plus one layer per ``more`` operation (built as commits are)."""
    base = tmp / "layers" / "0"
    make_tree(base, spec)
    set_tree_mtimes(base, layertar.clamp_epoch())
    merged = tmp / "image"
    cp_a(base, merged)
    layers = [base]
    for i, op in enumerate(more, 1):
        view = ImageView(list(reversed(layers)), "overlay")
        work = tmp / f"build-{i}"
        cp_a(merged, work)
        op(work)
        layer = tmp / "layers" / str(i)
        layer.mkdir()
        changeset.write_layer(changeset.changes_from_tree(work, view), layer, flavor="overlay")
        buf = io.BytesIO()
        layertar.write_layer_tar(layer, buf, flavor="overlay")
        layertar.apply_layer_tar(io.BytesIO(buf.getvalue()), merged)
        shutil.rmtree(work)
        layers.append(layer)
    return Image(ImageView(list(reversed(layers)), "overlay"), merged, layers)


class Upper:
    """Builds an upper dir by hand the way overlayfs would have written it for an operation."""

    def __init__(self, tree: Path, root: Path) -> None:
        self.tree = tree
        self.root = root
        root.mkdir()

    def _parents(self, rel: str) -> None:
        # Copy-up of a parent keeps the lower dir's metadata: finish() copies it from the tree.
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)

    def copy(self, rel: str) -> None:
        """Copy ``rel`` (a whole subtree for a directory) from the new tree into the upper."""
        self._parents(rel)
        cp_a(self.tree / rel, self.root / rel)

    def mkdir(self, rel: str) -> Path:
        self._parents(rel)
        (self.root / rel).mkdir()
        return self.root / rel

    def whiteout(self, rel: str, *, marker_file: bool = False) -> None:
        self._parents(rel)
        path = self.root / rel
        if marker_file:  # fuse-overlayfs without mknod rights
            (path.parent / f".wh.{path.name}").touch()
        else:
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def opaque(self, rel: str, how: str = "user.overlay.opaque") -> None:
        path = self.root / rel
        if how == "file":
            (path / ".wh..wh..opq").touch()
        else:
            os.setxattr(path, how, b"y")

    def finish(self) -> None:
        """Give every upper dir the new tree's metadata, children first, as the kernel's writes
        through the mount would have left them."""
        for dirpath, _dirs, _files in os.walk(self.root, topdown=False):
            rel = os.path.relpath(dirpath, self.root)
            if rel == ".":
                continue
            src = self.tree / rel
            if src.is_dir() and not src.is_symlink():
                st = os.lstat(src)
                if ROOT:
                    os.chown(dirpath, st.st_uid, st.st_gid)
                os.chmod(dirpath, stat.S_IMODE(st.st_mode))
                for name, value in changeset.kept_xattrs(src, st).items():
                    os.setxattr(dirpath, name, value)
                os.utime(dirpath, ns=(st.st_atime_ns, st.st_mtime_ns))


@dataclasses.dataclass
class Result:
    entries: list[Entry]
    changes: list[str]
    tar: dict[str, tuple[Any, ...]]
    diff_id: str
    layer: Path
    tree: Path
    applied: Path
    image: Image


def layer_tar(layer: Path, flavor: layertar.Flavor) -> tuple[bytes, str]:
    buf = io.BytesIO()
    digest = layertar.write_layer_tar(layer, buf, flavor=flavor)
    return buf.getvalue(), digest


def roundtrip(
    tmp: Path,
    op: Callable[[Path], None],
    expected: list[str],
    *,
    image: Image | None = None,
    upper: Callable[[Upper], None] | None = None,
    upper_flavor: str = "overlay",
) -> Result:
    """Run one edge case through every stage (see the module docstring)."""
    image = image or build_image(tmp, BASE)
    tree = tmp / "tree"
    cp_a(image.merged, tree)
    since = changeset.ctime_mark(tmp)
    op(tree)

    exact = changeset.changes_from_tree(tree, image.view, since_ns=None)
    fast = changeset.changes_from_tree(tree, image.view, since_ns=since)
    changes = [str(c) for c in changeset.to_changes(exact)]
    assert changes == expected
    assert fast == exact, "the ctime shortcut disagrees with the exact comparison"

    layer = tmp / "layer"
    layer.mkdir()
    changeset.write_layer(exact, layer, flavor="overlay")
    data, diff_id = layer_tar(layer, "overlay")
    assert changeset.layer_changes(layer, image.view, flavor="overlay") == changeset.to_changes(
        exact
    )
    marker = tmp / "layer-marker"
    marker.mkdir()
    changeset.write_layer(exact, marker, flavor="marker")
    assert layer_tar(marker, "marker") == (data, diff_id), "the two flavors give different tars"
    assert changeset.layer_changes(marker, image.view, flavor="marker") == changeset.to_changes(
        exact
    )

    applied = tmp / "applied"
    cp_a(image.merged, applied)
    layertar.apply_layer_tar(io.BytesIO(data), applied)
    want, got = clamped(snapshot_tree(tree)), clamped(snapshot_tree(applied))
    assert got == want, "\n".join(diff_snapshots(want, got))

    if upper is not None:
        up = Upper(tree, tmp / "upper")
        upper(up)
        up.finish()
        from_upper = changeset.changes_from_upper(up.root, image.view, upper_flavor=upper_flavor)
        assert [str(c) for c in changeset.to_changes(from_upper)] == expected
        up_layer = tmp / "layer-upper"
        up_layer.mkdir()
        changeset.write_layer(from_upper, up_layer, flavor="overlay")
        assert layer_tar(up_layer, "overlay")[1] == diff_id, "upper and tree give different tars"

    return Result(exact, changes, tar_entries(data), diff_id, layer, tree, applied, image)


def write(path: Path, content: str | bytes, mode: int | None = None) -> None:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    if mode is not None:
        os.chmod(path, mode)


# ---------------------------------------------------------------------------------------------
# the layer edge cases


def test_add_under_existing_dir(tmp_path: Path) -> None:
    r = roundtrip(
        tmp_path,
        lambda t: write(t / "etc/new.conf", "x=1\n"),
        ["C /etc", "A /etc/new.conf"],
        upper=lambda u: u.copy("etc/new.conf"),
    )
    assert r.tar == {"etc": ("dir", 0o755), "etc/new.conf": ("file", 0o644, b"x=1\n")}


def test_content_change_same_size_and_mtime_second(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        path = t / "etc/app.conf"
        before = os.lstat(path).st_mtime_ns
        write(path, "debug=fals3\n")  # same size
        os.utime(path, ns=(before, before + 1))  # same second: only the bytes tell
        assert os.lstat(path).st_size == len("debug=false\n")

    r = roundtrip(
        tmp_path, op, ["C /etc", "C /etc/app.conf"], upper=lambda u: u.copy("etc/app.conf")
    )
    assert r.tar == {"etc": ("dir", 0o755), "etc/app.conf": ("file", 0o644, b"debug=fals3\n")}


def test_chmod_only(tmp_path: Path) -> None:
    r = roundtrip(
        tmp_path,
        lambda t: os.chmod(t / "etc/app.conf", 0o600),
        ["C /etc", "C /etc/app.conf"],
        upper=lambda u: u.copy("etc/app.conf"),
    )
    assert r.tar == {"etc": ("dir", 0o755), "etc/app.conf": ("file", 0o600, b"debug=false\n")}


@pytest.mark.requires_root
def test_chown_only(tmp_path: Path) -> None:
    r = roundtrip(
        tmp_path,
        lambda t: os.chown(t / "usr/bin/tool", 1234, 4321),
        ["C /usr", "C /usr/bin", "C /usr/bin/tool"],
        upper=lambda u: u.copy("usr/bin/tool"),
    )
    assert r.tar["usr/bin/tool"][:2] == ("file", 0o755)
    with tarfile.open(fileobj=io.BytesIO(layer_tar(r.layer, "overlay")[0])) as tf:
        m = tf.getmember("usr/bin/tool")
        assert (m.uid, m.gid) == (1234, 4321)
    assert os.lstat(r.applied / "usr/bin/tool").st_uid == 1234


def test_delete_lower_file(tmp_path: Path) -> None:
    r = roundtrip(
        tmp_path,
        lambda t: (t / "etc/os-release").unlink(),
        ["C /etc", "D /etc/os-release"],
        upper=lambda u: u.whiteout("etc/os-release"),
    )
    assert r.tar == {"etc": ("dir", 0o755), "etc/.wh.os-release": ("whiteout",)}
    assert stat.S_ISCHR(os.lstat(r.layer / "etc/os-release").st_mode)


def test_delete_lower_tree(tmp_path: Path) -> None:
    r = roundtrip(
        tmp_path,
        lambda t: shutil.rmtree(t / "usr/lib"),
        ["C /usr", "D /usr/lib"],
        upper=lambda u: u.whiteout("usr/lib"),
    )
    # One whiteout for the tree: its children are implied.
    assert r.tar == {"usr": ("dir", 0o755), "usr/.wh.lib": ("whiteout",)}


def test_delete_then_recreate(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        (t / "etc/app.conf").unlink()
        write(t / "etc/app.conf", "debug=true\n", 0o640)

    r = roundtrip(
        tmp_path, op, ["C /etc", "C /etc/app.conf"], upper=lambda u: u.copy("etc/app.conf")
    )
    # Recreated: a plain entry replaces the lower file, no whiteout next to it.
    assert r.tar == {"etc": ("dir", 0o755), "etc/app.conf": ("file", 0o640, b"debug=true\n")}


def test_delete_then_recreate_identical_is_no_change(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        (t / "etc/app.conf").unlink()
        write(t / "etc/app.conf", "debug=false\n")  # same bytes and mode; mtime clamps equal

    r = roundtrip(tmp_path, op, [], upper=lambda u: u.copy("etc/app.conf"))
    assert r.tar == {}


def _opaque_op(t: Path) -> None:
    shutil.rmtree(t / "usr/lib")
    (t / "usr/lib").mkdir()
    write(t / "usr/lib/new.so", "N")
    write(t / "usr/lib/b.so", "B" * 20)  # put back as it was: not a change


_OPAQUE_CHANGES = [
    "C /usr",
    "C /usr/lib",
    "D /usr/lib/a.so",
    "A /usr/lib/new.so",
    "D /usr/lib/sub",
]
_OPAQUE_TAR = {
    "usr": ("dir", 0o755),
    "usr/lib": ("dir", 0o755),
    "usr/lib/.wh.a.so": ("whiteout",),
    "usr/lib/.wh.sub": ("whiteout",),
    "usr/lib/new.so": ("file", 0o644, b"N"),
}


def _opaque_upper(how: str, *, subdir: bool = False) -> Callable[[Upper], None]:
    def build(u: Upper) -> None:
        u.mkdir("usr/lib")
        u.opaque("usr/lib", how)
        u.copy("usr/lib/new.so")
        u.copy("usr/lib/b.so")
        if subdir:
            u.copy("usr/lib/sub")

    return build


def test_rm_rf_dir_and_mkdir_opaque(tmp_path: Path) -> None:
    r = roundtrip(tmp_path, _opaque_op, _OPAQUE_CHANGES, upper=_opaque_upper("user.overlay.opaque"))
    # Expanded into one whiteout per hidden lower child: no opaque marker in our layers.
    assert r.tar == _OPAQUE_TAR
    assert os.listxattr(r.layer / "usr/lib") == []


@pytest.mark.parametrize("how", ["user.fuseoverlayfs.opaque", "file", "trusted.overlay.opaque"])
def test_rm_rf_dir_and_mkdir_opaque_fuse_upper(tmp_path: Path, how: str) -> None:
    if how.startswith("trusted.") and not ROOT:
        pytest.skip("trusted.* xattrs need root")
    r = roundtrip(
        tmp_path, _opaque_op, _OPAQUE_CHANGES, upper=_opaque_upper(how), upper_flavor="fuse"
    )
    assert r.tar == _OPAQUE_TAR


def test_rm_rf_dir_and_mkdir_opaque_nested_subdir(tmp_path: Path) -> None:
    # A directory recreated inside an opaque one hides its lower children too.
    def op(t: Path) -> None:
        _opaque_op(t)
        (t / "usr/lib/sub").mkdir()
        write(t / "usr/lib/sub/d", "D")

    r = roundtrip(
        tmp_path,
        op,
        [
            "C /usr",
            "C /usr/lib",
            "D /usr/lib/a.so",
            "A /usr/lib/new.so",
            "C /usr/lib/sub",
            "D /usr/lib/sub/c",
            "A /usr/lib/sub/d",
        ],
        upper=_opaque_upper("user.overlay.opaque", subdir=True),
    )
    assert r.tar["usr/lib/sub/.wh.c"] == ("whiteout",)


def test_dir_to_file(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        shutil.rmtree(t / "usr/lib")
        write(t / "usr/lib", "now a file\n")

    r = roundtrip(tmp_path, op, ["C /usr", "C /usr/lib"], upper=lambda u: u.copy("usr/lib"))
    assert r.tar == {"usr": ("dir", 0o755), "usr/lib": ("file", 0o644, b"now a file\n")}


def test_file_to_dir(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        (t / "etc/app.conf").unlink()
        (t / "etc/app.conf").mkdir()
        write(t / "etc/app.conf/main", "m\n")

    def upper(u: Upper) -> None:
        u.copy("etc/app.conf")
        u.opaque("etc/app.conf")  # the kernel marks a dir made over a whiteout opaque

    r = roundtrip(tmp_path, op, ["C /etc", "C /etc/app.conf", "A /etc/app.conf/main"], upper=upper)
    assert r.tar == {
        "etc": ("dir", 0o755),
        "etc/app.conf": ("dir", 0o755),
        "etc/app.conf/main": ("file", 0o644, b"m\n"),
    }


def test_symlink_to_dir(tmp_path: Path) -> None:
    spec = {**BASE, "lib": ("symlink", "usr/lib")}

    def op(t: Path) -> None:
        (t / "lib").unlink()
        (t / "lib").mkdir()
        write(t / "lib/x", "x")

    r = roundtrip(
        tmp_path,
        op,
        ["C /lib", "A /lib/x"],
        image=build_image(tmp_path, spec),
        upper=lambda u: u.copy("lib"),
    )
    assert r.tar == {"lib": ("dir", 0o755), "lib/x": ("file", 0o644, b"x")}
    assert (r.applied / "usr/lib/a.so").is_file()  # the old target is untouched


def test_dir_to_symlink(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        shutil.rmtree(t / "usr/lib")
        os.symlink("/opt/lib", t / "usr/lib")

    r = roundtrip(tmp_path, op, ["C /usr", "C /usr/lib"], upper=lambda u: u.copy("usr/lib"))
    assert r.tar == {"usr": ("dir", 0o755), "usr/lib": ("symlink", "/opt/lib")}


def test_whiteout_of_symlink(tmp_path: Path) -> None:
    spec = {**BASE, "lib": ("symlink", "usr/lib"), "etc/alias": ("symlink", "/etc/app.conf")}

    def op(t: Path) -> None:
        (t / "lib").unlink()
        (t / "etc/alias").unlink()

    def upper(u: Upper) -> None:
        u.whiteout("lib")
        u.whiteout("etc/alias")

    r = roundtrip(
        tmp_path,
        op,
        ["C /etc", "D /etc/alias", "D /lib"],
        image=build_image(tmp_path, spec),
        upper=upper,
    )
    assert r.tar == {
        "etc": ("dir", 0o755),
        "etc/.wh.alias": ("whiteout",),
        ".wh.lib": ("whiteout",),
    }
    assert next(iter(r.tar)) == ".wh.lib"  # "." sorts before "e"
    # The links are gone, their targets are not.
    assert not os.path.lexists(r.applied / "lib")
    assert (r.applied / "usr/lib/sub/c").read_text() == "C"
    assert (r.applied / "etc/app.conf").read_text() == "debug=false\n"


def test_rename_lower_file(tmp_path: Path) -> None:
    def upper(u: Upper) -> None:
        u.copy("etc/app.conf.bak")
        u.whiteout("etc/app.conf")

    r = roundtrip(
        tmp_path,
        lambda t: os.rename(t / "etc/app.conf", t / "etc/app.conf.bak"),
        ["C /etc", "D /etc/app.conf", "A /etc/app.conf.bak"],
        upper=upper,
    )
    assert r.tar == {
        "etc": ("dir", 0o755),
        "etc/.wh.app.conf": ("whiteout",),
        "etc/app.conf.bak": ("file", 0o644, b"debug=false\n"),
    }


def test_rename_lower_dir(tmp_path: Path) -> None:
    # The renamed children keep their old ctimes: the ctime shortcut must still list them all.
    def upper(u: Upper) -> None:
        u.copy("usr/lib64")  # redirect_dir=off: mv falls back to copy + delete
        u.whiteout("usr/lib")

    r = roundtrip(
        tmp_path,
        lambda t: os.rename(t / "usr/lib", t / "usr/lib64"),
        [
            "C /usr",
            "D /usr/lib",
            "A /usr/lib64",
            "A /usr/lib64/a.so",
            "A /usr/lib64/b.so",
            "A /usr/lib64/sub",
            "A /usr/lib64/sub/c",
        ],
        upper=upper,
    )
    assert r.tar["usr/.wh.lib"] == ("whiteout",)
    assert r.tar["usr/lib64/sub/c"] == ("file", 0o644, b"C")


def test_hardlinks_inside_layer(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        write(t / "usr/bin/x", "same inode\n", 0o755)
        os.link(t / "usr/bin/x", t / "usr/bin/y")
        os.link(t / "usr/bin/x", t / "usr/bin/a")

    r = roundtrip(
        tmp_path,
        op,
        ["C /usr", "C /usr/bin", "A /usr/bin/a", "A /usr/bin/x", "A /usr/bin/y"],
        upper=lambda u: u.copy("usr/bin"),
    )
    # The first path in tar order carries the data, the others link to it; the unchanged
    # usr/bin/tool is not there.
    assert r.tar == {
        "usr": ("dir", 0o755),
        "usr/bin": ("dir", 0o755),
        "usr/bin/a": ("file", 0o755, b"same inode\n"),
        "usr/bin/x": ("link", "usr/bin/a"),
        "usr/bin/y": ("link", "usr/bin/a"),
    }
    ino = {os.lstat(r.layer / "usr/bin" / n).st_ino for n in ("a", "x", "y")}
    assert len(ino) == 1, "the stored layer split the hardlink group"


def test_hardlink_to_lower_file(tmp_path: Path) -> None:
    def upper(u: Upper) -> None:
        # overlay copies the lower file up, then links it.
        u.copy("etc/app.conf")
        os.link(u.root / "etc/app.conf", u.root / "etc/app.link")

    r = roundtrip(
        tmp_path,
        lambda t: os.link(t / "etc/app.conf", t / "etc/app.link"),
        ["C /etc", "C /etc/app.conf", "A /etc/app.link"],
        upper=upper,
    )
    # The unchanged lower file travels as the hardlink partner of the new name.
    assert r.tar == {
        "etc": ("dir", 0o755),
        "etc/app.conf": ("file", 0o644, b"debug=false\n"),
        "etc/app.link": ("link", "etc/app.conf"),
    }
    a, b = os.lstat(r.applied / "etc/app.conf"), os.lstat(r.applied / "etc/app.link")
    assert a.st_ino == b.st_ino


def test_absolute_symlink_written_through(tmp_path: Path) -> None:
    spec = {**BASE, "cfg": ("symlink", "/etc")}

    # Inside the rootfs, /cfg/new.conf is /etc/new.conf (the link resolves against the root):
    # the layer records the real path and leaves the link alone.
    r = roundtrip(
        tmp_path,
        lambda t: write(t / "etc/new.conf", "via link\n"),
        ["C /etc", "A /etc/new.conf"],
        image=build_image(tmp_path, spec),
        upper=lambda u: u.copy("etc/new.conf"),
    )
    assert r.tar == {"etc": ("dir", 0o755), "etc/new.conf": ("file", 0o644, b"via link\n")}
    # A layer that writes through the absolute link lands inside the root, not on the host.
    host_etc_before = sorted(os.listdir("/etc"))
    _apply_members(r.applied, [_file_member("cfg/through.conf", b"t\n")])
    assert (r.applied / "etc/through.conf").read_bytes() == b"t\n"
    assert sorted(os.listdir("/etc")) == host_etc_before


def _copy_all(*rels: str) -> Callable[[Upper], None]:
    def build(u: Upper) -> None:
        for rel in rels:
            u.copy(rel)

    return build


def test_dotdot_symlink_chains(tmp_path: Path) -> None:
    spec = {**BASE, "usr/lib/sub/up": ("symlink", "../..")}

    def op(t: Path) -> None:
        os.symlink("usr/lib/sub/up/bin/tool", t / "tool")  # .. inside the root
        os.symlink("../../../../../etc/os-release", t / "etc/deep")  # climbs above /: clamps
        os.symlink("up/../../lib", t / "usr/lib/sub/chain")

    r = roundtrip(
        tmp_path,
        op,
        [
            "C /etc",
            "A /etc/deep",
            "A /tool",
            "C /usr",
            "C /usr/lib",
            "C /usr/lib/sub",
            "A /usr/lib/sub/chain",
        ],
        image=build_image(tmp_path, spec),
        upper=_copy_all("tool", "etc/deep", "usr/lib/sub/chain"),
    )
    # Link targets are stored verbatim, never resolved.
    assert r.tar["tool"] == ("symlink", "usr/lib/sub/up/bin/tool")
    assert r.tar["etc/deep"] == ("symlink", "../../../../../etc/os-release")
    assert r.tar["usr/lib/sub/chain"] == ("symlink", "up/../../lib")
    # Writing through the chain resolves inside the root ...
    _apply_members(r.applied, [_file_member("usr/lib/sub/up/bin/through", b"1")])
    assert (r.applied / "usr/bin/through").read_bytes() == b"1"
    # ... and a chain whose '..' climbs above the root is refused, the outside untouched.
    outside = tmp_path / "outside"
    outside.mkdir()
    (r.applied / "var/esc").symlink_to("../../../outside")
    with pytest.raises(UnsafeEntryError) as err:
        _apply_members(r.applied, [_file_member("var/esc/pwned", b"x")])
    assert err.value.entry == "var/esc/pwned"
    assert list(outside.iterdir()) == []


def test_two_layer_symlink_escape(tmp_path: Path) -> None:
    host = tmp_path / "host-target"
    host.mkdir()

    def first(t: Path) -> None:  # layer 1: an absolute link naming a host directory
        os.symlink(str(host), t / "escape")

    image = build_image(tmp_path, BASE, first)

    # Layer 2 writes through it; inside the rootfs that is <root><host>/pwned.
    def op(t: Path) -> None:
        target = t / str(host).lstrip("/")
        target.mkdir(parents=True)
        write(target / "pwned", "inside\n")

    parts = str(host).lstrip("/").split("/")
    expected = sorted(
        [f"A /{'/'.join(parts[: i + 1])}" for i in range(len(parts))] + [f"A {host}/pwned"],
        key=lambda s: s[2:],
    )
    r = roundtrip(tmp_path, op, expected, image=image)
    assert r.tar[f"{str(host).lstrip('/')}/pwned"] == ("file", 0o644, b"inside\n")
    assert list(host.iterdir()) == []
    # A crafted second layer that names the link as a parent also stays inside the root.
    _apply_members(r.applied, [_file_member("escape/pwned2", b"x")])
    assert (r.applied / str(host).lstrip("/") / "pwned2").read_bytes() == b"x"
    assert list(host.iterdir()) == []


def test_fifo_node(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        (t / "run").mkdir()
        os.mkfifo(t / "run/fifo")
        os.chmod(t / "run/fifo", 0o620)  # past the umask

    r = roundtrip(tmp_path, op, ["A /run", "A /run/fifo"], upper=lambda u: u.copy("run"))
    assert r.tar == {"run": ("dir", 0o755), "run/fifo": ("fifo", 0o620)}
    assert stat.S_ISFIFO(os.lstat(r.applied / "run/fifo").st_mode)


@pytest.mark.requires_root
def test_device_nodes(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        (t / "dev").mkdir()
        os.mknod(t / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(t / "dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
        os.chmod(t / "dev/null", 0o666)  # past the umask
        os.chmod(t / "dev/loop0", 0o660)

    r = roundtrip(
        tmp_path, op, ["A /dev", "A /dev/loop0", "A /dev/null"], upper=lambda u: u.copy("dev")
    )
    assert r.tar == {
        "dev": ("dir", 0o755),
        "dev/loop0": ("blk", 0o660, 7, 0),
        "dev/null": ("chr", 0o666, 1, 3),
    }


def test_device_node_rdev_change(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("needs root to create device nodes")
    spec = {**BASE, "dev": None, "dev/tty9": ("chardev", 4, 9)}

    def op(t: Path) -> None:
        os.unlink(t / "dev/tty9")
        os.mknod(t / "dev/tty9", stat.S_IFCHR | 0o644, os.makedev(4, 10))

    r = roundtrip(
        tmp_path,
        op,
        ["C /dev", "C /dev/tty9"],
        image=build_image(tmp_path, spec),
        upper=lambda u: u.copy("dev/tty9"),
    )
    assert r.tar["dev/tty9"] == ("chr", 0o644, 4, 10)


def test_setuid_setgid_sticky_bits(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        os.chmod(t / "usr/bin/tool", 0o4755)
        write(t / "usr/bin/sg", "sg", 0o2755)
        (t / "tmp").mkdir()
        os.chmod(t / "tmp", 0o1777)

    def upper(u: Upper) -> None:
        u.copy("usr/bin/tool")
        u.copy("usr/bin/sg")
        u.copy("tmp")

    r = roundtrip(
        tmp_path,
        op,
        ["A /tmp", "C /usr", "C /usr/bin", "A /usr/bin/sg", "C /usr/bin/tool"],
        upper=upper,
    )
    assert r.tar["usr/bin/tool"][:2] == ("file", 0o4755)
    assert r.tar["usr/bin/sg"][:2] == ("file", 0o2755)
    assert r.tar["tmp"] == ("dir", 0o1777)
    assert stat.S_IMODE(os.lstat(r.layer / "usr/bin/tool").st_mode) == 0o4755


def test_user_xattrs(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        os.setxattr(t / "etc/app.conf", "user.origin", b"test")
        write(t / "etc/new", "n")
        os.setxattr(t / "etc/new", "user.mime_type", b"text/plain")
        if ROOT:  # a file capability: cap_net_bind_service+ep (VFS_CAP_REVISION_2)
            cap = bytes.fromhex("0100000200040000000000000000000000000000")
            os.setxattr(t / "usr/bin/tool", "security.capability", cap)

    def upper(u: Upper) -> None:
        u.copy("etc/app.conf")
        u.copy("etc/new")
        # Overlay's own bookkeeping on copied-up entries is not content.
        os.setxattr(u.root / "etc/app.conf", "user.overlay.origin", b"\x00\xfb")
        os.setxattr(u.root / "etc", "user.overlay.impure", b"y")
        if ROOT:
            u.copy("usr/bin/tool")

    expected = ["C /etc", "C /etc/app.conf", "A /etc/new"]
    if ROOT:
        expected += ["C /usr", "C /usr/bin", "C /usr/bin/tool"]
    r = roundtrip(tmp_path, op, expected, upper=upper)
    assert os.getxattr(r.applied / "etc/app.conf", "user.origin") == b"test"
    with tarfile.open(fileobj=io.BytesIO(layer_tar(r.layer, "overlay")[0])) as tf:
        pax = {m.name: m.pax_headers for m in tf.getmembers()}
    assert pax["etc/new"]["SCHILY.xattr.user.mime_type"] == "text/plain"
    assert not any("overlay" in k for hdrs in pax.values() for k in hdrs)
    if ROOT:
        assert "SCHILY.xattr.security.capability" in pax["usr/bin/tool"]


def test_user_xattrs_on_directory(tmp_path: Path) -> None:
    def upper(u: Upper) -> None:
        u.mkdir("var")
        os.setxattr(u.root / "var", "user.overlay.origin", b"\x00\xfb")

    r = roundtrip(
        tmp_path,
        lambda t: os.setxattr(t / "var", "user.dir", b"\x00\xff"),  # not UTF-8 on purpose
        ["C /var"],
        upper=upper,
    )
    assert r.tar == {"var": ("dir", 0o755)}
    assert os.getxattr(r.layer / "var", "user.dir") == b"\x00\xff"
    assert os.getxattr(r.applied / "var", "user.dir") == b"\x00\xff"


def test_empty_layer(tmp_path: Path) -> None:
    def op(t: Path) -> None:
        (t / "etc/app.conf").read_bytes()
        write(t / "etc/tmp", "gone soon")
        (t / "etc/tmp").unlink()
        os.utime(t / "etc/os-release")  # a touch: the mtime clamps back to the image's

    def upper(u: Upper) -> None:
        u.mkdir("etc")  # the copied-up parent of the file that came and went
        u.copy("etc/os-release")

    r = roundtrip(tmp_path, op, [], upper=upper)
    assert r.entries == []
    assert r.tar == {}
    assert os.listdir(r.layer) == []
    assert r.diff_id == EMPTY_TAR_DIFF_ID


def test_long_unicode_and_non_utf8_names(tmp_path: Path) -> None:
    long_name = "n" * 255
    deep = "/".join(["d" * 60] * 5)  # a path far beyond ustar's 100+155 bytes
    bad = os.fsdecode(b"bad-\xff\xfe.bin")

    def op(t: Path) -> None:
        write(t / "var" / long_name, "long")
        (t / "var" / deep).mkdir(parents=True)
        write(t / "var" / deep / "leaf", "deep")
        (t / "var/caf\u00e9").mkdir()
        write(t / "var/caf\u00e9/\u65e5\u672c\u8a9e.txt", "unicode")
        write(t / "var" / bad, "non-utf8")

    deep_parts = deep.split("/")
    expected = [
        "C /var",
        f"A /var/{bad}",
        "A /var/caf\u00e9",
        "A /var/caf\u00e9/\u65e5\u672c\u8a9e.txt",
    ]
    expected += [f"A /var/{'/'.join(deep_parts[: i + 1])}" for i in range(5)]
    expected += [f"A /var/{deep}/leaf", f"A /var/{long_name}"]
    expected.sort(key=lambda s: s[2:])
    r = roundtrip(tmp_path, op, expected, upper=lambda u: u.copy("var"))
    assert r.tar[f"var/{long_name}"] == ("file", 0o644, b"long")
    assert r.tar[f"var/{deep}/leaf"] == ("file", 0o644, b"deep")
    assert r.tar[f"var/{bad}"] == ("file", 0o644, b"non-utf8")
    assert (r.applied / "var" / bad).read_bytes() == b"non-utf8"


class _Tee(io.RawIOBase):
    """Read side of a pipe that keeps the first bytes for header checks."""

    def __init__(self, fd: int, keep: int) -> None:
        self.f = os.fdopen(fd, "rb", buffering=0)
        self.head = bytearray()
        self.keep = keep

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        if n and len(self.head) < self.keep:
            self.head += bytes(memoryview(b)[: min(n, self.keep - len(self.head))])
        return n or 0

    def close(self) -> None:
        self.f.close()
        super().close()


@pytest.mark.slow
def test_sparse_file_larger_than_8gib(tmp_path: Path) -> None:
    size = 9 * 1024**3 + 12345  # beyond ustar's 8 GiB size field: needs a PAX size record
    marks = {0: b"head", 5 * 1024**3: b"middle", size - 4: b"tail"}

    image = build_image(tmp_path, BASE)
    tree = tmp_path / "tree"
    cp_a(image.merged, tree)
    since = changeset.ctime_mark(tmp_path)
    big = tree / "var/big.img"
    with open(big, "wb") as f:
        f.truncate(size)
        for off, data in marks.items():
            f.seek(off)
            f.write(data)

    entries = changeset.changes_from_tree(tree, image.view, since_ns=since)
    assert entries == changeset.changes_from_tree(tree, image.view)
    assert [str(c) for c in changeset.to_changes(entries)] == ["C /var", "A /var/big.img"]
    layer = tmp_path / "layer"
    layer.mkdir()
    stats = changeset.write_layer(entries, layer, flavor="overlay")
    assert stats == changeset.LayerStats(files=1, size=size)
    stored = os.lstat(layer / "var/big.img")
    assert stored.st_size == size
    assert stored.st_blocks * 512 < 1024**2, "the copy lost the holes"

    # Stream the tar through a pipe into apply_layer_tar: no 9 GiB temporary file.
    applied = tmp_path / "applied"
    cp_a(image.merged, applied)
    rfd, wfd = os.pipe()
    digest: list[str] = []

    def produce() -> None:
        with os.fdopen(wfd, "wb") as out:
            digest.append(layertar.write_layer_tar(layer, out, flavor="overlay"))

    writer = threading.Thread(target=produce)
    writer.start()
    reader = _Tee(rfd, 64 * 1024)
    try:
        # 9 GiB is past the default limit for an untrusted layer (docs/reference/cli.md).
        big = layertar.Limits(max_layer_size=16 * 1024**3)
        layertar.apply_layer_tar(reader, applied, limits=big)  # type: ignore[arg-type]
    finally:
        reader.close()
        writer.join()
    assert len(digest) == 1
    assert digest[0].startswith("sha256:")
    with tarfile.open(fileobj=io.BytesIO(bytes(reader.head)), mode="r|") as tf:
        first, second = next(iter(tf)), tf.next()
        assert first.name == "var"
        assert second is not None
        assert second.name == "var/big.img"
        assert second.size == size
        assert second.pax_headers["size"] == str(size)
    out = applied / "var/big.img"
    assert out.stat().st_size == size
    assert out.stat().st_blocks * 512 < 64 * 1024**2, "apply did not keep the holes"
    with open(out, "rb") as f:
        for off, data in marks.items():
            f.seek(off)
            assert f.read(len(data)) == data


# ---------------------------------------------------------------------------------------------
# crafted tars for the write-through checks


def _file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _apply_members(root: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    layertar.apply_layer_tar(buf, root)


# ---------------------------------------------------------------------------------------------
# the real kernel


_REAL_CASES = {
    "opaque": "rm -rf usr/lib && mkdir usr/lib && echo new > usr/lib/new.so",
    "delete-and-hardlink": "rm etc/os-release && ln etc/app.conf etc/app.link",
    "rename-dir": "mv usr/lib usr/lib64 && chmod 4755 usr/bin/tool",
}


@pytest.mark.requires_root
@pytest.mark.requires_overlay
@pytest.mark.parametrize("userxattr", [True, False], ids=["userxattr", "trusted"])
@pytest.mark.parametrize("case", sorted(_REAL_CASES))
def test_real_overlay_upper_matches_tree(tmp_path: Path, case: str, userxattr: bool) -> None:
    image = build_image(tmp_path, BASE)
    script = _REAL_CASES[case]
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    # userxattr implies redirect_dir=nofollow and metacopy=off (and conflicts with "off",
    # which means "follow"); a trusted.* mount gets them spelled out.
    opts = (
        f"lowerdir={image.layers[0]},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'},"
        + ("userxattr" if userxattr else "redirect_dir=nofollow,index=off,metacopy=off")
    )
    # A private mount namespace: the mount dies with the shell whatever happens.
    mounted = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-euc",
            'mount -t overlay overlay -o "$1" "$2"; cd "$2"; rc=0; sh -ec "$3" || rc=$?; cd /; '
            'umount "$2"; exit $rc',
            "sh",
            opts,
            str(tmp_path / "merged"),
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert mounted.returncode == 0, mounted.stderr
    tree = tmp_path / "tree"
    cp_a(image.merged, tree)
    subprocess.run(["sh", "-ec", script], cwd=tree, check=True)

    from_tree = changeset.changes_from_tree(tree, image.view)
    from_upper = changeset.changes_from_upper(tmp_path / "upper", image.view)
    assert changeset.to_changes(from_upper) == changeset.to_changes(from_tree)
    digests = []
    for name, entries in (("l-tree", from_tree), ("l-upper", from_upper)):
        (tmp_path / name).mkdir()
        changeset.write_layer(entries, tmp_path / name, flavor="overlay")
        digests.append(layertar.layer_diff_id(tmp_path / name, flavor="overlay"))
    assert digests[0] == digests[1]
    if case == "opaque":
        xattr = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
        assert os.getxattr(tmp_path / "upper/usr/lib", xattr) == b"y"
        assert [str(c) for c in changeset.to_changes(from_upper)] == [
            "C /usr",
            "C /usr/lib",
            "D /usr/lib/a.so",
            "D /usr/lib/b.so",
            "A /usr/lib/new.so",
            "D /usr/lib/sub",
        ]
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()


def test_harness_catches_a_wrong_list(tmp_path: Path) -> None:
    """The round trip is not vacuous: a wrong expectation fails it."""
    with pytest.raises(AssertionError):
        roundtrip(tmp_path, lambda t: write(t / "etc/new", "n"), ["A /etc/new"])
