"""Faults, store trust: a store someone else can write, or a directory that is not a store, is
refused with one line before anything is read, written or deleted through it.

Each attack plants what an attacker could have planted (a symlink in the store, another user's
store, a directory of unrelated files, a parent loop in layer.json) and checks the canary
outside the store is unchanged and the error is one line naming the path and the fix
(docs/concepts/security.md).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_util import cli, out

from pytest_layers import errors
from pytest_layers.store import MAX_CHAIN_LENGTH, Store
from tests.conftest import TEST_USER, run_as_user

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _layer(store: Store, name: str, files: dict[str, str], parent: str | None = None) -> str:
    with store.staging() as staged:
        for rel, text in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_text(text)
        return store.add_layer(staged, parent=parent, name=name, source="build").chain_id


def _one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message, message
    return message


def _cli_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, out(proc)
    assert "Traceback" not in proc.stderr, out(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out(proc)
    return lines[0]


def _tree(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (not following symlinks) with its content or kind."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(path))
            found[rel] = full.read_text() if full.is_file() and not full.is_symlink() else "-"
    return found


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A directory outside the store with content that must survive every attack."""
    path = tmp_path / "canary"
    (path / "12345-1" / "upper").mkdir(parents=True)  # looks like a dead session's scratch
    (path / "12345-1" / "upper" / "precious").write_text("keep me\n")
    (path / "1").write_text("not a snapshot\n")
    (path / "file").write_text("original\n")
    before = _tree(path)
    yield path
    assert _tree(path) == before, "the canary outside the store changed"


# -- item 1: the store is its owner's alone -----------------------------------------------------


@pytest.mark.requires_root
@pytest.mark.requires_user
def test_other_users_cannot_reach_a_stored_setuid_binary(tmp_path: Path) -> None:
    # A world-reachable parent, as /home/USER/project/.pytest_cache is.
    parent = Path("/tmp") / f"pytest-layers-setuid-{os.getpid()}-{tmp_path.name}"
    parent.mkdir(mode=0o755)
    try:
        store = Store(parent / "store")
        with store.staging() as staged:
            shutil.copy2("/usr/bin/id", staged / "id")
            os.chmod(staged / "id", 0o4755)  # an image's setuid-root shell, say
            chain_id = store.add_layer(staged, parent=None, name="suid", source="import").chain_id
        binary = store.layer_dir(chain_id) / "id"
        assert os.stat(binary).st_mode & stat.S_ISUID
        assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(binary.parent.parent).st_mode) == 0o700
        proc = run_as_user([str(binary), "-u"], cwd="/")
        assert proc.returncode != 0, out(proc)  # with a 0755 store it printed 0: euid root
        assert proc.stdout.strip() != "0"
        assert "Permission denied" in proc.stderr, out(proc)
    finally:
        shutil.rmtree(parent)


# -- item 4: a store another user can write is refused --------------------------------------------


@pytest.mark.parametrize(
    "sub", ["", "layers", "tmp", "locks", "leases", "refs/names", "refs/snapshots", "scratch/views"]
)
def test_store_directory_writable_by_others_is_refused(tmp_path: Path, sub: str) -> None:
    root = tmp_path / "store"
    Store(root).close()
    leftover = root / "tmp" / "12345-1-stage-abc"  # a dead process's: the sweep would take it
    leftover.mkdir()
    (root / sub).chmod(0o777)  # made under umask 000, or chmod-ed by a helpful colleague
    with pytest.raises(errors.StoreError) as info:
        Store(root)
    message = _one_line(str(info.value))
    assert f"{root / sub if sub else root} is writable by group (mode 0777)" in message
    assert "chmod -R go-w" in message
    assert "--layers-store-shared" in message
    assert leftover.is_dir(), "a refused store was swept"


@pytest.mark.parametrize(
    "sub", ["layers", "tmp", "locks", "refs/snapshots", "refs/rebuild", "scratch", "scratch/views"]
)
def test_symlinked_store_directory_is_refused(tmp_path: Path, canary: Path, sub: str) -> None:
    root = tmp_path / "store"
    Store(root).close()
    shutil.rmtree(root / sub)
    (root / sub).symlink_to(canary)
    with pytest.raises(errors.StoreError) as info:
        Store(root)
    message = _one_line(str(info.value))
    assert f"{root / sub} is a symlink inside the layer store" in message
    assert info.value.errno == errno.ELOOP


@pytest.mark.requires_overlay
def test_session_refuses_a_planted_scratch_views_symlink(
    pytester: pytest.Pytester, canary: Path
) -> None:
    # Before: the session swept "dead sessions" under the symlink's target, unmounting and
    # deleting there.
    from tests.plugin_util import BASE_CONFTEST, BASE_TESTS

    store = pytester.path / "store"
    Store(store).close()
    shutil.rmtree(store / "scratch" / "views")
    (store / "scratch" / "views").symlink_to(canary)
    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(test_it=BASE_TESTS)
    result = pytester.runpytest_subprocess(f"--layers-store={store}")
    result.stdout.fnmatch_lines(
        [f"layers: unavailable: {store}/scratch/views is a symlink inside the layer store*"]
    )
    assert "Traceback" not in result.stdout.str()


def test_symlinked_snapshot_directory_writes_and_deletes_nothing_elsewhere(
    tmp_path: Path, canary: Path
) -> None:
    store = Store(tmp_path / "store")
    chain_id = _layer(store, "base", {"etc/a": "a\n"})
    (store.root / "refs" / "snapshots" / "test_x").symlink_to(canary)
    with pytest.raises(errors.StoreError) as info:
        store.add_snapshot("test_x", chain_id, keep=1)
    assert "refs/snapshots/test_x is a symlink" in _one_line(str(info.value))
    # Reading and pruning skip it with a warning: nothing there is read or deleted.
    assert store.snapshots() == []
    assert any("test_x" in w for w in store.warnings), store.warnings
    store.prune(keep_snapshots=0)


def _take_lease(store: Store, chain_id: str) -> None:
    with store.lease([chain_id]):
        pass


def test_planted_lock_symlinks_create_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    chain_id = _layer(store, "base", {"etc/a": "a\n"})
    store.close()
    for lock in ("gc.lock", "snapshots.lock", "prune.lock"):
        target = tmp_path / f"created-by-{lock}"
        (store.root / "locks" / lock).unlink(missing_ok=True)
        (store.root / "locks" / lock).symlink_to(target)
        attack = {
            "gc.lock": lambda: _take_lease(store, chain_id),
            "snapshots.lock": lambda: store.add_snapshot("t", chain_id, keep=1),
            "prune.lock": store.prune,
        }[lock]
        with pytest.raises(errors.StoreError) as info:
            attack()
        message = _one_line(str(info.value))
        assert f"locks/{lock} is a symlink, where the store keeps a lock file" in message
        assert not os.path.lexists(target), f"{lock}: a symlink made us create its target"
        (store.root / "locks" / lock).unlink()


def test_rebuild_marker_never_writes_through_a_symlink(tmp_path: Path, canary: Path) -> None:
    store = Store(tmp_path / "store")
    marker = store.root / "refs" / "rebuild" / "key-1"
    marker.symlink_to(canary / "file")
    assert not store.rebuild_marked("key-1", "token")  # not read through the link either
    store.mark_rebuilt("key-1", "token")
    assert store.rebuild_marked("key-1", "token")
    assert not marker.is_symlink()


@pytest.mark.requires_user
def test_another_users_store_is_refused_and_its_edits_never_reach_root(
    tmp_path: Path, user_tmp_path: Path
) -> None:
    # The user built a layer, then edited it in place: root must not mount it.
    theirs = user_tmp_path / "store"
    script = (
        "import sys\nfrom pathlib import Path\nfrom pytest_layers.store import Store\n"
        "s = Store(sys.argv[1])\n"
        "with s.staging() as d:\n"
        "    (d / 'marker').write_text('built\\n')\n"
        "    c = s.add_layer(d, parent=None, name='base', source='build').chain_id\n"
        "(s.layer_dir(c) / 'marker').write_text('edited by the user\\n')\n"
    )
    proc = run_as_user([sys.executable, "-c", script, str(theirs)], cwd="/")
    assert proc.returncode == 0, out(proc)
    with pytest.raises(errors.StoreError) as info:
        Store(theirs)
    message = _one_line(str(info.value))
    assert f"{theirs} belongs to uid {os.stat(theirs).st_uid} ({TEST_USER}), not to you" in message
    assert "--layers-store" in message
    # The CLI says the same in one line.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_layers.cli", "--store", str(theirs), "ls"],
        capture_output=True,
        text=True,
    )
    assert "belongs to uid" in _cli_error(proc)


def test_non_empty_directory_without_version_is_never_adopted(tmp_path: Path) -> None:
    unrelated = tmp_path / "project-data"
    (unrelated / "tmp").mkdir(parents=True)
    (unrelated / "tmp" / "12345-1-notes").write_text("a dead pid's name, but mine\n")
    (unrelated / "layers" / "x").mkdir(parents=True)
    (unrelated / "README").write_text("hello\n")
    before = _tree(unrelated)
    with pytest.raises(errors.StoreError) as info:
        Store(unrelated)
    message = _one_line(str(info.value))
    assert f"{unrelated} is not empty (README) and has no VERSION file" in message
    assert "new or empty directory" in message
    for verb in ("ls", "prune", "verify"):
        line = _cli_error(cli(unrelated, verb))
        assert "has no VERSION file" in line
    assert _tree(unrelated) == before
    # An empty directory, or one holding only store directories (a crash before VERSION), is.
    (tmp_path / "empty").mkdir(mode=0o700)
    Store(tmp_path / "empty").close()
    (tmp_path / "half" / "tmp").mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "half", 0o700)
    Store(tmp_path / "half").close()


@pytest.mark.requires_overlay
def test_store_path_that_is_a_regular_file(pytester: pytest.Pytester) -> None:
    from tests.plugin_util import BASE_CONFTEST, BASE_TESTS

    path = pytester.path / "not-a-store"
    path.write_text("keep\n")
    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(test_it=BASE_TESTS)
    result = pytester.runpytest_subprocess(f"--layers-store={path}")
    result.stdout.fnmatch_lines(
        [
            f"layers: unavailable: {path} is a regular file, not a store directory; "
            "point --layers-store (pytest-layers --store) at a directory"
        ]
    )
    assert result.stdout.str().count(str(path)) <= 3  # header, one error line per test
    line = _cli_error(cli(path, "ls"))
    assert line.endswith(
        f"{path} is a regular file, not a store directory; "
        "point --layers-store (pytest-layers --store) at a directory"
    )
    assert path.read_text() == "keep\n"


# -- item 7: parent loops, damaged JSON, stray entries ---------------------------------------------


def _set_parent(store: Store, chain_id: str, parent: str) -> None:
    record = store.root / "layers" / chain_id[7:] / "layer.json"
    data = json.loads(record.read_text())
    data["parent"] = parent
    record.write_text(json.dumps(data))


def test_parent_loop_is_one_line_for_every_verb(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    base = _layer(store, "base", {"a": "a\n"})
    top = _layer(store, "top", {"b": "b\n"}, parent=base)
    _set_parent(store, base, top)  # base -> top -> base -> ...
    fresh = Store(store.root)
    with pytest.raises(errors.StoreError) as info:
        fresh.chain(top)
    assert "its parents loop back to" in _one_line(str(info.value))
    problems = fresh.verify()
    assert problems
    assert all("loop back" in str(p) for p in problems), problems
    for args in (
        ["ls"],
        ["inspect", "top"],
        ["verify"],
        ["diff", "top"],
        ["export", "top", "-o", str(tmp_path / "out")],
    ):
        proc = cli(store.root, *args)  # a hang here used to reach 12.6 GB of memory
        text = proc.stdout + proc.stderr
        assert "Traceback" not in text, out(proc)
        if args[0] != "ls":
            assert proc.returncode != 0, out(proc)
            assert "loop back" in text, out(proc)


def test_chain_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    base = _layer(store, "base", {"a": "a\n"})
    # Forge a chain id naming itself: the limit and the loop check both stop it.
    record = store.root / "layers" / base[7:] / "layer.json"
    assert MAX_CHAIN_LENGTH >= 500  # the kernel's own stacking limit fits
    _set_parent(store, base, base)
    with pytest.raises(errors.StoreError, match="loop back"):
        Store(store.root).chain(base)
    assert record.is_file()


@pytest.mark.parametrize(
    "content",
    ["[]", '"text"', "{}", "[" * 100_000 + "]" * 100_000, "not json"],
    ids=["list", "string", "empty-object", "deep", "garbage"],
)
def test_damaged_layer_json_names_the_file(tmp_path: Path, content: str) -> None:
    store = Store(tmp_path / "store")
    chain_id = _layer(store, "base", {"a": "a\n"})
    record = store.root / "layers" / chain_id[7:] / "layer.json"
    record.write_text(content)
    with pytest.raises(errors.StoreError) as info:
        Store(store.root).layer_info(chain_id)
    assert str(record) in _one_line(str(info.value))
    line = _cli_error(cli(store.root, "inspect", chain_id))
    assert str(record) in line


def test_stray_entries_in_refs_are_skipped_with_a_warning(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    chain_id = _layer(store, "base", {"a": "a\n"})
    store.add_snapshot("test_a", chain_id, keep=2)
    refs = store.root / "refs"
    (refs / "names" / "a-directory").mkdir()
    os.mkfifo(refs / "cache" / "a-fifo")  # reading it must not hang
    (refs / "cache" / "deep").write_text("[" * 100_000 + "]" * 100_000)
    (refs / "snapshots" / "a-file").write_text("x\n")
    (refs / "names" / "list").write_text("[1, 2]\n")
    proc = cli(store.root, "ls")
    assert proc.returncode == 0, out(proc)
    assert "base" in proc.stdout
    assert "Traceback" not in proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "warning:" in ln]
    assert any("a-directory" in w for w in warnings), out(proc)
    assert any("a-file" in w for w in warnings), out(proc)
    proc = cli(store.root, "prune")
    assert proc.returncode == 0, out(proc)
    assert Store(store.root).names() == {"base": chain_id}


def test_verify_reports_a_layer_directory_replaced_by_a_symlink(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    chain_id = _layer(store, "base", {"a": "a\n"})
    real = store.root / "layers" / chain_id[7:]
    moved = tmp_path / "elsewhere"
    real.rename(moved)
    real.symlink_to(moved)
    proc = cli(store.root, "verify")
    assert proc.returncode != 0, out(proc)
    assert "is a symlink inside the layer store" in proc.stdout + proc.stderr, out(proc)


# -- read-only stores ---------------------------------------------------------------------------


@pytest.mark.requires_root
def test_read_only_store_serves_the_read_verbs(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        store = Store(mnt / "store")
        _layer(store, "base", {"etc/a": "a\n"})
        store.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for args in (["ls"], ["inspect", "base"], ["diff", "base"], ["verify"]):
            proc = cli(mnt / "store", *args)
            assert proc.returncode == 0, out(proc)
        proc = cli(mnt / "store", "export", "base", "-o", str(tmp_path / "image"))
        assert proc.returncode == 0, out(proc)
        line = _cli_error(cli(mnt / "store", "prune"))
        assert "is on a read-only filesystem" in line
        assert "permission" not in line.lower()
        ro = Store(mnt / "store")
        assert ro.read_only
        with pytest.raises(errors.StoreError) as info:
            ro.set_name("x", ro.layers()[0])
        assert info.value.errno == errno.EROFS
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
