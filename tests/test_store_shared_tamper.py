"""A shared store's members can rename and plant entries in its group-writable directories:
what the store itself creates, sets up and reads there is never reached through a symlink, a
fifo or an oversized file a member put in its place.

The store here is shared with the running user's own group, so each test runs as root and
as an ordinary user alike; the planting is done by the same user, which is all the store's
code can see of a member.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_layers import _access, _storegc, _storerecords, errors
from pytest_layers.oci import export_image
from pytest_layers.store import Store


def _group() -> str:
    return _access.group_name(os.getegid())


def _shared_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", shared_group=_group())


def _layer(store: Store, text: str = "member file\n") -> tuple[str, Path]:
    """A stored layer holding ``f``; its chain id and its directory."""
    with store.staging() as staged:
        (staged / "f").write_text(text)
        chain_id = store.add_layer(staged, parent=None, name="m", source="build").chain_id
    return chain_id, store.root / "layers" / chain_id.removeprefix("sha256:")


def _say_blob(layer: Path) -> None:
    """Make the layer's record name a kept blob, as an imported layer's does."""
    record = layer / "layer.json"
    data = json.loads(record.read_text())
    data["blob"] = "blob.tar"
    record.write_text(json.dumps(data))


def _secret(tmp_path: Path) -> tuple[Path, str]:
    """A file outside the store, and the digest verify must never print."""
    path = tmp_path / "secret"
    path.write_text("not the store's\n")
    path.chmod(0o600)
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


_VERIFY = """
import sys
from pytest_layers.store import Store
for problem in Store(sys.argv[1], shared_group=sys.argv[2]).verify():
    print(problem.message)
"""


def _verify_in_child(store: Store) -> str:
    """verify's messages, from a child process: a verify that waits on a planted fifo fails
    the test (TimeoutExpired) instead of hanging the session."""
    proc = subprocess.run(
        [sys.executable, "-c", _VERIFY, str(store.root), _group()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- directories the store creates: group and mode set through the directory itself ------------


def test_make_dir_never_chmods_a_symlink_planted_after_the_mkdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = _access.Access.resolve(_group())
    victim, _ = _secret(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    fresh = scratch / "1-1-stage-x"
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: str | os.PathLike[str], mode: int = 0o777, **kw: object) -> None:
        real_mkdir(path, mode)
        # A member, between our mkdir and our chmod: the new directory out, a symlink in.
        os.rename(path, f"{os.fspath(path)}.moved")
        os.symlink(victim, path)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with pytest.raises(errors.StoreError) as caught:
        access.make_dir(fresh)
    monkeypatch.undo()
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    message = str(caught.value)
    assert f"{fresh}, a directory just created in the layer store, is now a symlink" in message
    assert "tampered" in message


def test_private_subtree_never_follows_a_symlink(tmp_path: Path) -> None:
    access = _access.Access.resolve(_group())
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o2750)
    staged = tmp_path / "diff"
    staged.symlink_to(victim)
    with pytest.raises(errors.StoreError, match="is now a symlink"):
        access.private_subtree(staged)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o2750


def test_make_dir_still_sets_the_shared_group_and_mode(tmp_path: Path) -> None:
    access = _access.Access.resolve(_group())
    old = os.umask(0o077)
    try:
        assert access.make_dir(tmp_path / "d")
        assert not access.make_dir(tmp_path / "d", exist_ok=True)
    finally:
        os.umask(old)
    st = os.stat(tmp_path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o2770
    assert st.st_gid == os.getegid()


# -- store files a member may plant: a kept blob, files.json, a lease --------------------------


def test_verify_never_hashes_through_a_planted_blob_symlink(tmp_path: Path) -> None:
    store = _shared_store(tmp_path)
    _, layer = _layer(store)
    secret, secret_digest = _secret(tmp_path)
    _say_blob(layer)
    (layer / "blob.tar").symlink_to(secret)
    messages = _verify_in_child(store)
    assert "original blob unreadable: a symlink, not a file of the store" in messages
    assert secret_digest not in messages


def test_verify_reports_a_planted_blob_fifo_without_waiting(tmp_path: Path) -> None:
    store = _shared_store(tmp_path)
    _, layer = _layer(store)
    _say_blob(layer)
    os.mkfifo(layer / "blob.tar")
    assert "original blob unreadable: not a regular file" in _verify_in_child(store)


def test_verify_reports_a_planted_files_json_fifo_without_waiting(tmp_path: Path) -> None:
    store = _shared_store(tmp_path)
    _, layer = _layer(store)
    (layer / "diff" / "f").write_text("changed\n")  # a mismatch: verify reads files.json
    (layer / "files.json").unlink()
    os.mkfifo(layer / "files.json")
    assert "files.json unusable (not a regular file)" in _verify_in_child(store)


def test_verify_never_reads_a_files_json_symlink(tmp_path: Path) -> None:
    store = _shared_store(tmp_path)
    _, layer = _layer(store)
    (layer / "diff" / "f").write_text("changed\n")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"not-from-the-store": {"type": "file"}}))
    (layer / "files.json").unlink()
    (layer / "files.json").symlink_to(elsewhere)
    problems = store.verify()
    assert [p.message.rpartition("; ")[2] for p in problems] == [
        "files.json unusable (a symlink, not a file of the store)"
    ]


def test_verify_reads_a_files_json_far_larger_than_a_record(tmp_path: Path) -> None:
    # files.json grows with the layer (tens of MB for 100,000 files): it is not held to the
    # 1 MiB of a ref or layer.json.
    store = _shared_store(tmp_path)
    _, layer = _layer(store)
    was = os.lstat(layer / "diff" / "f").st_mtime_ns
    (layer / "diff" / "f").write_text("changed\n")
    os.utime(layer / "diff" / "f", ns=(was, was))  # the content alone changed, whatever the clock
    index = layer / "files.json"
    index.chmod(0o644)
    with index.open("a") as f:
        f.write(" " * (3 << 20))  # still the same JSON object
    assert [(p.path, p.message) for p in store.verify()] == [
        ("f", "content changed (size 12 -> 8)")
    ]


def test_verify_refuses_a_files_json_beyond_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _shared_store(tmp_path)
    _, layer = _layer(store)
    (layer / "diff" / "f").write_text("changed\n")
    # The real bound is 1 GiB; a small one keeps the planted sparse file small.
    monkeypatch.setattr(_storegc, "_MAX_FILES_JSON", 4096)
    index = layer / "files.json"
    index.unlink()
    with index.open("wb") as f:
        f.truncate(4097)
    problems = store.verify()
    assert [p.message.rpartition("; ")[2] for p in problems] == [
        "files.json unusable (larger than 4096 bytes)"
    ]


def test_export_never_streams_a_planted_blob_symlink(tmp_path: Path) -> None:
    store = _shared_store(tmp_path)
    chain_id, layer = _layer(store)
    secret, _ = _secret(tmp_path)
    _say_blob(layer)
    (layer / "blob.tar").symlink_to(secret)
    with pytest.raises(errors.StoreError) as caught:
        export_image(store, chain_id, tmp_path / "out")
    assert f"its kept blob {layer / 'blob.tar'} is a symlink, not a file of the store" in str(
        caught.value
    )
    assert not (tmp_path / "out").exists()


def test_prune_refuses_a_lease_larger_than_any_lease(tmp_path: Path) -> None:
    store = _shared_store(tmp_path)
    chain_id, _ = _layer(store)
    planted = store.root / "leases" / "pin-planted.pin"
    limit = _storerecords._MAX_LEASE
    with planted.open("wb") as f:
        f.write(f"+{chain_id}\n".encode())
        f.truncate(limit + 1)  # sparse: nothing on disk
    with pytest.raises(errors.StoreError) as caught:
        store.prune()
    assert caught.value.errno == errno.EFBIG
    assert f"{planted} is larger than {limit} bytes" in str(caught.value)


def test_staging_makes_nothing_through_a_container_swapped_for_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member swaps the staging container the store just made for a symlink to a directory
    of its choosing: the store's ``diff`` is not made there, and staging is refused."""
    store = _shared_store(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_new = Store._new_tmp_dir

    def new_then_swap(self: Store, kind: str) -> Path:
        made = real_new(self, kind)
        os.rename(made, f"{made}.moved")
        os.symlink(elsewhere, made)
        return made

    monkeypatch.setattr(Store, "_new_tmp_dir", new_then_swap)
    with pytest.raises(errors.StoreError, match="tampered"), store.staging():
        pass
    assert list(elsewhere.iterdir()) == []
