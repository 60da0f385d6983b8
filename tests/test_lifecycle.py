"""One test's rootfs life (``lifecycle.TestRootfs``) driven without a pytest session: a store,
a layer and the copy backend, then open -> the "test" -> ended(outcome) -> section -> close,
checking the snapshot kept (or not) and that nothing is left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_layers.backends.copy import CopyBackend
from pytest_layers.build import Layer, LayerDef, LayerSession
from pytest_layers.lifecycle import TestRootfs, pool_key
from pytest_layers.store import Store

TEST = "tests/test_x.py::test_one"


def _builder(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc/app.conf").write_text("port = 1\n")


@pytest.fixture
def session(tmp_path: Path) -> Iterator[LayerSession]:
    store = Store(tmp_path / "store")
    layers = LayerSession(store, CopyBackend(), tmp_path, scratch_root=tmp_path / "scratch")
    try:
        yield layers
    finally:
        layers.close()
        store.close()


@pytest.fixture
def image(session: LayerSession) -> list[Layer]:
    defn = LayerDef("base", _builder, None, (), None, ())
    return [session.get(defn, None, {})]


def _life(session: LayerSession, image: list[Layer], **kw: Any) -> TestRootfs:
    return TestRootfs(session, image, test=TEST, **kw)


def _left_behind(session: LayerSession) -> list[str]:
    root = session.scratch_root
    return sorted(os.listdir(root)) if root.exists() else []


def _run(life: TestRootfs, *, failed: bool, write: bool = True) -> Path:
    fs = life.open()
    assert (fs / "etc/app.conf").read_text() == "port = 1\n"
    if write:
        (fs / "etc/app.conf").write_text("port = 2\n")
        (fs / "new.txt").write_text("hello\n")
    life.ended(failed=failed)
    return fs.path


def test_a_passing_test_keeps_nothing_and_leaves_nothing(
    session: LayerSession, image: list[Layer]
) -> None:
    life = _life(session, image)
    path = _run(life, failed=False)
    assert life.decided
    assert life.snapshot is None
    assert life.error is None
    assert life.section(session.store.root) == (None, None)
    life.close()
    assert not path.exists()
    assert _left_behind(session) == []
    assert session.store.snapshots(TEST) == []


def test_a_failing_test_keeps_its_rw_layer_as_a_snapshot(
    session: LayerSession, image: list[Layer]
) -> None:
    life = _life(session, image)
    path = _run(life, failed=True)
    assert life.error is None
    (snap,) = session.store.snapshots(TEST)
    text, ref = life.section(session.store.root)
    assert ref == snap.ref == f"snapshot:{TEST}"
    assert text is not None
    assert f"{ref} ({snap.chain_id[:19]}, 2 files" in text
    assert f"diff {ref}" in text.replace("'", "")
    # The changed text file as a unified diff against the image.
    assert "-port = 1" in text
    assert "+port = 2" in text
    # Reported once.
    assert life.section(session.store.root) == (None, None)
    life.close()
    assert not path.exists()
    assert _left_behind(session) == []
    committed = session.store.layer_dir(snap.chain_id)
    assert (committed / "new.txt").read_text() == "hello\n"
    assert snap.with_init is None


def test_keep_always_keeps_a_passing_test_and_never_keeps_none(
    session: LayerSession, image: list[Layer]
) -> None:
    always = _life(session, image, keep="always")
    _run(always, failed=False)
    always.close()
    assert len(session.store.snapshots(TEST)) == 1
    never = _life(session, image, keep="never")
    _run(never, failed=True)
    never.close()
    assert len(session.store.snapshots(TEST)) == 1
    assert never.snapshot is None
    assert never.error is None


def test_the_outcome_is_decided_once(session: LayerSession, image: list[Layer]) -> None:
    life = _life(session, image, keep="always")
    _run(life, failed=True)
    life.ended(failed=True)  # the teardown fallback after the call phase decided
    life.close()
    assert len(session.store.snapshots(TEST)) == 1


def test_a_readonly_view_is_never_committed(session: LayerSession, image: list[Layer]) -> None:
    life = _life(session, image, keep="always", readonly=True)
    fs = life.open()
    assert fs.readonly
    life.ended(failed=True)
    assert life.snapshot is None
    assert life.error is None
    life.close()
    assert session.store.snapshots(TEST) == []
    assert _left_behind(session) == []


def test_init_files_are_seen_not_committed_and_kept_beside_the_snapshot(
    session: LayerSession, image: list[Layer]
) -> None:
    life = _life(session, image, init={"etc/hostname": "box\n"})
    fs = life.open()
    assert (fs / "etc/hostname").read_text() == "box\n"
    (fs / "new.txt").write_text("x")
    assert [str(c) for c in fs.diff()] == ["A /new.txt"]
    life.ended(failed=True)
    text, _ = life.section(session.store.root)
    life.close()
    (snap,) = session.store.snapshots(TEST)
    assert not (session.store.layer_dir(snap.chain_id) / "etc/hostname").exists()
    assert snap.with_init is not None
    assert life.init_kept
    assert text is not None
    assert "init layer kept" in text
    assert _left_behind(session) == []


def test_a_snapshot_that_cannot_be_kept_is_a_line_not_an_error(
    session: LayerSession, image: list[Layer]
) -> None:
    life = _life(session, image, keep_count=0)  # the store refuses to keep zero snapshots
    _run(life, failed=True)
    assert life.snapshot is None
    assert life.error is not None
    assert life.error.startswith("could not keep the rw layer as a snapshot: ValueError: keep")
    assert " (at " in life.error  # not one of ours: where it was raised
    life.close()
    assert _left_behind(session) == []


def test_a_failing_commit_hook_is_reported_and_the_snapshot_stays(
    session: LayerSession, image: list[Layer]
) -> None:
    seen: list[tuple[str, Layer]] = []

    def hook(ref: str, lay: Layer) -> None:
        seen.append((ref, lay))
        raise RuntimeError("boom")

    life = _life(session, image)
    life.open()
    life.ended(failed=True, committed=hook)
    life.close()
    (snap,) = session.store.snapshots(TEST)
    assert seen
    assert seen[0][0] == snap.ref
    assert seen[0][1].chain_id == snap.chain_id
    assert life.error is not None
    assert life.error.startswith(f"kept as {snap.ref}, but a pytest_layers_snapshot_committed")
    assert "RuntimeError: boom" in life.error


class _InlinePool:
    """The view pool's interface, served in this process (the real pool's helpers are forks):
    enough to see that the lifecycle takes a view from the pool and hands it back."""

    def __init__(self) -> None:
        self.makers: dict[Any, Any] = {}
        self.handed: list[Any] = []
        self.retired: list[Any] = []

    def known(self, key: Any) -> bool:
        return key in self.makers

    def register(self, key: Any, maker: Any) -> None:
        self.makers.setdefault(key, maker)

    def take(self, key: Any) -> Any:
        # As the real pool: made (in its helper), sent as plain values, loaded in the session.
        maker = self.makers[key]
        made = maker.make()
        view = maker.load(maker.export(made))
        self.handed.append((view, made, maker))
        return view

    def retire(self, view: Any) -> bool:
        for handed, made, maker in self.handed:
            if handed is view:
                maker.discard(made)
                self.retired.append(view)
                return True
        return False


def test_a_pooled_view_is_taken_from_the_pool_and_handed_back(
    session: LayerSession, image: list[Layer]
) -> None:
    pool = _InlinePool()
    key = pool_key(["base"], False, {})
    asked: list[Any] = []
    life = _life(session, image, pool=pool, key=key)
    fs = life.open(expect=asked.append)
    assert asked == [pool]
    assert len(pool.handed) == 1
    assert fs.path == pool.handed[0][0].view.path
    (fs / "new.txt").write_text("x")
    life.ended(failed=True)
    life.close()
    assert pool.retired == [pool.handed[0][0]]
    assert len(session.store.snapshots(TEST)) == 1
    assert _left_behind(session) == []


def test_pool_keys() -> None:
    assert pool_key([], False, {}) is None
    assert pool_key(["a/conftest.py::base"], True, {"b": "2", "a": "1"}) == (
        ("a/conftest.py::base",),
        True,
        (("a", "1"), ("b", "2")),
    )
