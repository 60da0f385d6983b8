"""The layer writer hands the small files it wrote to the stream that names the layer, which
takes them instead of reading them back, but only while they are unchanged; and the change
list hands the writer the small changed files it read to compare them with the image."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from treeutil import make_tree

from pytest_layers import changeset, layertar
from pytest_layers.changeset import ImageView


def _visit(*_args: object) -> None:
    pass


def _written_layer(tmp_path: Path) -> tuple[Path, layertar.WrittenFiles]:
    base = tmp_path / "base"
    make_tree(base, {"d": None, "d/a": "old a", "d/b": "old b"})
    upper = tmp_path / "upper"
    make_tree(upper, {"d": None, "d/a": "new a", "d/c": "a new file", "e": None, "e/big": "x" * 9})
    os.setxattr(upper / "d/c", "user.note", b"kept")
    entries = changeset.changes_from_upper(upper, ImageView([base], "overlay"))
    dest = tmp_path / "dest"
    dest.mkdir()
    written: layertar.WrittenFiles = {}
    changeset.write_layer(entries, dest, flavor="overlay", written=written)
    return dest, written


def test_the_writer_records_what_it_wrote(tmp_path: Path) -> None:
    dest, written = _written_layer(tmp_path)
    assert sorted(written) == [b"d/a", b"d/c", b"e/big"]
    assert written[b"d/c"].data == b"a new file"
    assert written[b"d/c"].xattrs == ((b"user.note", b"kept"),)
    assert written[b"d/a"].matches(os.lstat(dest / "d/a"))


def test_the_stream_takes_unchanged_files_from_the_writer(tmp_path: Path) -> None:
    dest, written = _written_layer(tmp_path)
    plain = layertar.layer_diff_id(dest, flavor="overlay")
    assert layertar.stream_layer(dest, flavor="overlay", visit=_visit, written=written) == plain
    # Bytes recorded for a file whose stat still matches are what the tar is made of: the
    # stream did not open the file (here the record is altered, the file is not).
    rec = written[b"d/a"]
    written[b"d/a"] = layertar.Written(rec.ino, rec.mtime_ns, rec.ctime_ns, b"NEW A", rec.xattrs)
    assert layertar.stream_layer(dest, flavor="overlay", visit=_visit, written=written) != plain


@pytest.mark.parametrize("change", ["content", "xattr", "mode"])
def test_a_file_changed_after_writing_is_read_from_disk(tmp_path: Path, change: str) -> None:
    dest, written = _written_layer(tmp_path)
    path = dest / "d/a"
    st = os.lstat(path)
    if change == "content":
        path.write_bytes(b"other")  # same size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    elif change == "xattr":
        os.setxattr(path, "user.added", b"1")
    else:
        os.chmod(path, 0o600)
    assert not written[b"d/a"].matches(os.lstat(path))
    assert layertar.stream_layer(
        dest, flavor="overlay", visit=_visit, written=written
    ) == layertar.layer_diff_id(dest, flavor="overlay")


def test_the_writer_keeps_no_more_than_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layertar, "WRITTEN_BUDGET", 12)
    _dest, written = _written_layer(tmp_path)
    assert sum(len(w.data) for w in written.values()) <= 12
    assert written  # but what fits is kept


def test_a_store_where_the_ctime_is_coarse_reads_what_it_wrote_back(tmp_path: Path) -> None:
    # ramfs keeps the ctime of a clock tick (as older kernels do on every filesystem): a
    # same-size rewrite within one tick would look unchanged, so the store does not trust
    # the files it wrote there; the same store type on this test's own filesystem probes
    # its own answer, and a commit on ramfs still stores exactly what its files hold.
    from conftest import require
    from faults_util import unmount_all_under

    from pytest_layers import _linux
    from pytest_layers.store import Store

    require("root")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    _linux.mount("none", mnt, "ramfs", 0, "")
    try:
        store = Store(mnt / "store")
        assert store._fine_ctime() is False
        upper = tmp_path / "upper"
        make_tree(upper, {"a": "one", "b": "two"})
        entries = changeset.changes_from_upper(upper, ImageView([], "overlay"))
        info = store.write_layer(entries, parent=None, name=None, source="commit")
        assert store.verify() == []
        assert (store.layer_dir(info.chain_id) / "a").read_text() == "one"
    finally:
        unmount_all_under(mnt)


def _compared(tmp_path: Path) -> tuple[Path, list[changeset.Entry]]:
    base = tmp_path / "base"
    make_tree(base, {"d": None, "d/a": "old a", "d/b": "old b", "d/s": "short"})
    upper = tmp_path / "upper"
    # d/a: same size, other content (compared by reading both); d/s: another size (no read).
    make_tree(upper, {"d": None, "d/a": "new a", "d/s": "longer now"})
    os.setxattr(upper / "d/a", "user.note", b"kept")
    return upper, changeset.changes_from_upper(upper, ImageView([base], "overlay"))


def test_the_writer_takes_a_changed_file_from_what_the_comparison_read(tmp_path: Path) -> None:
    upper, entries = _compared(tmp_path)
    st = os.lstat(upper / "d/a")
    plain = pickle.loads(pickle.dumps(entries))  # the same entries without what was read
    ref = tmp_path / "ref"
    ref.mkdir()
    changeset.write_layer(plain, ref, flavor="overlay")
    # The file is gone from the upper dir: the writer does not go back to it.
    os.unlink(upper / "d/a")
    dest = tmp_path / "dest"
    dest.mkdir()
    changeset.write_layer(entries, dest, flavor="overlay")
    assert (dest / "d/a").read_bytes() == b"new a"
    assert os.getxattr(dest / "d/a", "user.note") == b"kept"
    got = os.lstat(dest / "d/a")
    assert (got.st_mode, got.st_uid, got.st_gid) == (st.st_mode, st.st_uid, st.st_gid)
    assert layertar.layer_diff_id(dest, flavor="overlay") == layertar.layer_diff_id(
        ref, flavor="overlay"
    )


def test_the_comparison_keeps_no_more_than_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layertar, "WRITTEN_BUDGET", 4)
    upper, entries = _compared(tmp_path)
    os.unlink(upper / "d/a")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(FileNotFoundError):  # not kept: the writer reads the file
        changeset.write_layer(entries, dest, flavor="overlay")


def test_what_the_comparison_carried_and_the_writer_keeps_share_one_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layertar, "WRITTEN_BUDGET", 100)
    base, upper = tmp_path / "base", tmp_path / "upper"
    make_tree(base, {f"z{i}": "o" * 10 for i in range(10)})
    # z*: changed at the same size, carried (100 bytes, the whole budget); a*: new, read.
    make_tree(
        upper, {f"z{i}": "c" * 10 for i in range(10)} | {f"a{i}": "n" * 10 for i in range(10)}
    )
    entries = changeset.changes_from_upper(upper, ImageView([base], "overlay"))
    carried = {id(e._read.data): len(e._read.data) for e in entries if e._read is not None}
    assert sum(carried.values()) == 100
    written: layertar.WrittenFiles = {}
    dest = tmp_path / "dest"
    dest.mkdir()
    changeset.write_layer(entries, dest, flavor="overlay", written=written)
    live = carried | {id(w.data): len(w.data) for w in written.values()}
    assert sum(live.values()) <= 100
    assert {os.fsdecode(k) for k in written} == {f"z{i}" for i in range(10)}
