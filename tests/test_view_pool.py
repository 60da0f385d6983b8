"""The view pool: views made ahead and retired behind tests (pytest_layers/backends/pool.py).

The engine part runs without mounts; the plugin part runs whole sessions (pristine views under
many tests, exact snapshots, nothing left after a normal end, a KeyboardInterrupt or a SIGKILL).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_layers.backends.pool import Maker, ViewPool
from tests.faults_util import (
    child_env,
    dead_leftovers,
    our_mounts_under,
    out,
    pytest_command,
    run_session,
    write_project,
)

# ---- the engine ------------------------------------------------------------------------------


class _Files:
    """Views as files in ``root`` (made and removed by the helper, seen from here)."""

    def __init__(self, root: Path, *, fail_first: bool = False, reset: bool | None = None):
        self.root = root
        self.count = 0
        self.fail_first = fail_first
        self.resets = reset

    def make(self) -> str:
        self.count += 1
        if self.fail_first and self.count == 1:
            raise OSError(28, "No space left on device")
        path = self.root / f"{os.getpid()}-{self.count}"
        path.write_text("pristine")
        return str(path)

    def discard(self, view: str) -> None:
        os.unlink(view)

    def reset(self, view: str) -> bool:
        Path(view).write_text("pristine")
        return bool(self.resets)

    def maker(self) -> Maker[str]:
        return Maker(self.make, self.discard, reset=self.reset if self.resets else None)


def _pool(files: _Files, depth: int = 2) -> ViewPool[str]:
    pool: ViewPool[str] = ViewPool(depth=depth)
    pool.register("a", files.maker())
    return pool


def test_views_come_from_a_helper_process_once_each_and_no_thread(tmp_path: Path) -> None:
    """No thread in the session (unshare is never at risk); every view is new."""
    threads = threading.active_count()
    pool = _pool(_Files(tmp_path))
    pool.expect({"a": 5})
    taken = []
    for _ in range(6):
        view = pool.take("a")
        assert view is not None
        assert Path(view).read_text() == "pristine"
        Path(view).write_text("touched")
        taken.append(view)
        pool.retire(view)
        pool.expect({"a": 5})
    assert len(set(taken)) == 6, f"a view was handed out twice: {taken}"
    assert {int(Path(v).name.split("-")[0]) for v in taken} == set(pool.helper_pids)
    assert threading.active_count() == threads
    pool.close()
    assert os.listdir(tmp_path) == [], "close left views behind"
    assert pool.helper_pids == []


def test_ready_views_no_pending_test_needs_are_cleaned_and_the_helper_exits(
    tmp_path: Path,
) -> None:
    pool = _pool(_Files(tmp_path), depth=3)
    pool.expect({"a": 3})
    (pid,) = pool.helper_pids
    view = pool.take("a")  # makes sure the helper has answered at least once
    assert view is not None
    pool.retire(view)
    pool.expect({})
    # Whatever was still being made is cleaned when the pool closes; the helper is gone.
    pool.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_preparation_error_is_raised_by_the_take_that_needed_it(tmp_path: Path) -> None:
    pool = _pool(_Files(tmp_path, fail_first=True), depth=1)
    with pytest.raises(OSError, match="No space left"):
        pool.take("a")
    view = pool.take("a")
    assert view is not None
    assert Path(view).read_text() == "pristine"
    pool.close()
    assert os.listdir(tmp_path) == []


class _TwoStep(_Files):
    """Views made in two steps (Maker.begin): ``begin`` leaves a mark, the step it returns
    writes into the view how many marks were there, unfinished, when it ran."""

    def __init__(self, root: Path, *, fail: tuple[str, int] | None = None) -> None:
        super().__init__(root / "views")
        self.marks = root / "marks"
        self.fail = fail
        self.begun = 0

    def begin(self) -> Callable[[], str]:
        self.begun += 1
        n = self.begun
        if self.fail == ("begin", n):
            raise OSError(28, f"No space left to begin view {n}")
        (self.marks / str(n)).touch()

        def finish() -> str:
            unfinished = len(os.listdir(self.marks))
            (self.marks / str(n)).unlink()
            if self.fail == ("finish", n):
                raise OSError(5, f"view {n} did not mount")
            path = self.root / f"{n}"
            path.write_text(f"{n} {unfinished}")
            return str(path)

        return finish

    def maker(self) -> Maker[str]:
        return Maker(self.make, self.discard, begin=self.begin)


@pytest.mark.parametrize("fail", [None, ("begin", 2), ("finish", 2)])
def test_a_two_step_maker_has_views_begun_ahead_and_answered_in_order(
    tmp_path: Path, fail: tuple[str, int] | None
) -> None:
    """With Maker.begin (fuse: the daemon started, its mount not yet waited for), the helper
    begins up to AHEAD views before it finishes the first; the replies keep the order of the
    requests, and a view that fails in either step is the error of its own take only."""
    from pytest_layers.backends.pool import AHEAD

    (tmp_path / "views").mkdir()
    (tmp_path / "marks").mkdir()
    maker = _TwoStep(tmp_path, fail=fail)
    pool: ViewPool[str] = ViewPool(depth=2, batch=8)
    pool.register("a", maker.maker())
    pool.expect({"a": 10})
    seen = []
    for i in range(1, 11):
        if fail is not None and i == 2:
            with pytest.raises(OSError, match="view 2"):
                pool.take("a")
            continue
        view = pool.take("a")
        assert view is not None
        n, unfinished = map(int, Path(view).read_text().split())
        seen.append((n, unfinished))
        pool.retire(view)
        pool.expect({"a": 10 - i})
    assert [n for n, _ in seen] == [i for i in range(1, 11) if fail is None or i != 2]
    # The first write asked for depth + batch views: the first was finished with AHEAD begun
    # (one fewer when the second failed to begin).
    assert AHEAD > 1
    assert seen[0][1] == (AHEAD - 1 if fail == ("begin", 2) else AHEAD)
    pool.close()
    assert os.listdir(tmp_path / "views") == []
    assert os.listdir(tmp_path / "marks") == []


def test_a_view_that_cannot_cross_is_an_error_of_its_taker(tmp_path: Path) -> None:
    """export gives plain values (marshal), else something pickle takes; neither is an error
    for the test that asked, and the view is cleaned in the helper."""
    files = _Files(tmp_path)
    pool: ViewPool[str] = ViewPool(depth=1)
    pool.register("a", Maker(files.make, files.discard, export=lambda view: lambda: view))
    pool.register("b", Maker(files.make, files.discard, export=Path, load=str))
    with pytest.raises(Exception, match="lambda"):
        pool.take("a")
    view = pool.take("b")  # a Path is not marshal's: pickled
    assert view is not None
    assert Path(view).read_text() == "pristine"
    pool.retire(view)
    pool.close()
    assert os.listdir(tmp_path) == []


def test_unknown_key_or_closed_pool_is_served_by_the_caller(tmp_path: Path) -> None:
    pool = _pool(_Files(tmp_path))
    assert pool.take("b") is None
    assert pool.retire("not-from-the-pool") is False
    pool.close()
    assert pool.take("a") is None
    assert pool.declined == 2


def test_recycler_hook_offers_a_reset_view_again(tmp_path: Path) -> None:
    """How the copy backend's reusable copies plug in: reset in the helper after the test,
    then handed out again; nothing new is made meanwhile."""
    pool = _pool(_Files(tmp_path, reset=True), depth=1)
    first = pool.take("a")
    assert first is not None
    Path(first).write_text("touched")
    pool.retire(first)
    second = pool.take("a")
    assert second == first
    assert Path(second).read_text() == "pristine"
    assert len(os.listdir(tmp_path)) == 1
    pool.close()
    assert os.listdir(tmp_path) == []


def test_requests_and_retirements_go_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write wakes the helper (which may take the test's CPU): one write per batch of
    tests, not one per test."""
    from pytest_layers.backends import pool as pool_mod

    writes = []
    real = pool_mod._send
    pid = os.getpid()

    def counting(fd: int, message: tuple[object, ...]) -> None:
        if os.getpid() == pid:
            writes.append(message)
        real(fd, message)

    monkeypatch.setattr(pool_mod, "_send", counting)
    pool: ViewPool[str] = ViewPool(depth=2, batch=4)
    pool.register("a", _Files(tmp_path).maker())
    pool.follow(["a"] * 41, 16)
    for i in range(40):
        view = pool.take("a")
        assert view is not None
        pool.at(i)
        pool.retire(view)
    pool.close()
    # The first take, then one write per four tests, and the quit.
    assert len(writes) <= 40 // 4 + 3, writes
    assert sum(m[0] == "retire" for batch in writes for m in batch) == 40
    assert os.listdir(tmp_path) == []


def test_the_plan_window_slides_as_a_scan_would_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    rng = random.Random(7)
    plan = [rng.choice(["a", "b", "c", None]) for _ in range(300)]
    pool: ViewPool[str] = ViewPool()
    seen: list[dict[object, int]] = []
    monkeypatch.setattr(pool, "expect", lambda demand: seen.append(dict(demand)))
    pool.follow(plan, 16)
    # In order, then with jumps (xdist runs a share of the plan), then in order again.
    indices = [*range(120), 150, 151, 152, 200, *range(201, 300)]
    for i in indices:
        pool.at(i)
    for i, demand in zip(indices, seen, strict=True):
        scan: dict[object, int] = {}
        for key in plan[i + 1 : i + 17]:
            if key is not None:
                scan[key] = scan.get(key, 0) + 1
        assert demand == scan, i


def test_a_view_asked_for_never_waits_behind_a_cleanup(tmp_path: Path) -> None:
    """Unmounting waits for the kernel (an RCU grace period per umount2): the helper cleans
    retired views in a thread of its own, so views keep coming while cleanups are stuck."""
    gate = tmp_path / "gate"
    views = tmp_path / "views"
    views.mkdir()
    forced = tmp_path / "forced"

    class Stuck(_Files):
        def discard(self, view: str) -> None:
            for _ in range(3000):  # up to 30 s, then give up and say so
                if gate.exists():
                    break
                time.sleep(0.01)
            else:
                forced.write_text("a cleanup was forced through without the gate")
            os.unlink(view)

    pool: ViewPool[str] = ViewPool(depth=1, batch=1)
    pool.register("a", Stuck(views).maker())
    pool.follow(["a"] * 7, 4)
    for i in range(6):
        view = pool.take("a")
        assert view is not None
        pool.at(i)
        pool.retire(view)
    assert not forced.exists(), "a take waited for a cleanup"
    gate.write_text("")
    pool.close()
    assert os.listdir(views) == []
    assert not forced.exists()


def test_the_cleaner_runs_at_the_lowest_priority_and_its_backlog_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy machine the test and the views it waits for go first: the cleaner thread is
    niced. It may then fall behind, and views waiting for it hold mounts and disk: past
    CLEAN_BACKLOG the helper cleans the next retired views in its loop."""
    from pytest_layers.backends import pool as pool_module

    monkeypatch.setattr(pool_module, "CLEAN_BACKLOG", 2)  # the helper is forked after this
    gate = tmp_path / "gate"
    views = tmp_path / "views"
    views.mkdir()
    records = tmp_path / "records"
    records.mkdir()

    class Recorded(_Files):
        def discard(self, view: str) -> None:
            me = threading.current_thread()
            nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            who = "loop" if me is threading.main_thread() else "cleaner"
            (records / Path(view).name).write_text(f"{who} {nice}")
            if who == "cleaner":
                for _ in range(3000):  # stuck until the gate opens (30 s at most)
                    if gate.exists():
                        break
                    time.sleep(0.01)
            os.unlink(view)

    pool: ViewPool[str] = ViewPool(depth=1, batch=1)
    pool.register("a", Recorded(views).maker())
    pool.follow(["a"] * 9, 4)
    for i in range(8):
        view = pool.take("a")
        assert view is not None
        pool.at(i)
        pool.retire(view)
    # 8 retired views (the last one's retirement may still be queued in the session): one is
    # stuck in the cleaner, at most 2 wait for it, so the helper's loop cleaned the rest.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        inline = [f.read_text() for f in records.iterdir() if f.read_text().startswith("loop")]
        if len(inline) >= 4:
            break
        time.sleep(0.01)
    assert len(inline) >= 4, sorted(f.read_text() for f in records.iterdir())
    gate.write_text("")
    pool.close()
    cleaner = [f.read_text() for f in records.iterdir() if f.read_text().startswith("cleaner")]
    assert cleaner, "the cleaner cleaned nothing"
    assert set(cleaner) == {f"cleaner {pool_module.CLEANER_NICE}"}, cleaner
    assert os.listdir(views) == []


def test_the_helper_exits_when_the_last_test_of_its_image_hands_back_its_view(
    tmp_path: Path,
) -> None:
    """Not at the end of the session: the tests after it (which may count child processes
    and mounts) see neither the helper nor its views."""
    pool = _pool(_Files(tmp_path))
    pool.follow(["a", "a", None, None], 16)
    for i in range(2):
        view = pool.take("a")
        assert view is not None
        pool.at(i)
        assert pool.helper_pids, "the helper ended while a test held its view"
        (pid,) = pool.helper_pids
        pool.retire(view)
    assert pool.helper_pids == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert os.listdir(tmp_path) == []
    pool.close()


def test_prepared_views_cross_as_plain_values(tmp_path: Path) -> None:
    """What the helper sends is marshal's plain values; the session rebuilds the same
    Prepared, a backend's own View subclass and fields included, without the closer."""
    import marshal

    from pytest_layers.backends.base import View
    from pytest_layers.backends.copy import CopyView
    from pytest_layers.rootfs import Prepared, from_portable, portable

    for view in (
        View(tmp_path / "m", tmp_path / "u", "overlay", _closer=lambda: None),
        View(tmp_path / "m", None, "fuse"),
        CopyView(tmp_path / "c", tmp_path / "c", "tree", since_ns=123),
    ):
        prepared = Prepared(tmp_path, view, {"etc/a"}, {"etc"}, tmp_path / "init")
        back = from_portable(marshal.loads(marshal.dumps(portable(prepared))))
        # The path as text first: read back without making the view (it is made lazily).
        assert back.path_text() == os.fspath(view.path)
        assert type(back.view) is type(view)
        assert back.view == view
        assert back.view._closer is None
        assert (back.scratch, back.exclude, back.init_dirs, back.init_dir) == (
            tmp_path,
            {"etc/a"},
            {"etc"},
            tmp_path / "init",
        )


@pytest.mark.parametrize("two_step", [False, True], ids=["make", "begin"])
def test_views_that_are_reset_go_back_at_once_and_few_are_made(
    tmp_path: Path, two_step: bool
) -> None:
    """No batching where the helper resets views (the copy backend: each new view is a copy
    of the whole image): a returned view is reset and handed out again, so over many tests
    the helper makes no more views than the depth and the one in use, also for a maker that
    makes its views in two steps."""
    pool: ViewPool[str] = ViewPool(depth=2, batch=4)
    files = _Files(tmp_path, reset=True)
    maker = files.maker()
    if two_step:
        maker = dataclasses.replace(maker, begin=lambda: files.make)
    pool.register("a", maker)
    pool.follow(["a"] * 31, 16)
    seen = set()
    for i in range(30):
        view = pool.take("a")
        assert view is not None
        assert Path(view).read_text() == "pristine"
        Path(view).write_text("touched")
        seen.add(view)
        pool.at(i)
        pool.retire(view)
    assert len(seen) <= 3, seen
    pool.close()
    assert os.listdir(tmp_path) == []


# ---- the plugin ------------------------------------------------------------------------------

#: The pool is on by default (ini layers_view_pool = 2); the plugin tests say so anyway, so
#: that a change of the default does not change what they test.
POOL_INI = ["layers_view_pool = 2"]

CONFTEST = """
import os, threading
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "data").mkdir()
    for n in range(5):
        (root / f"data/f{n}").write_text(str(n))

@layer(parent=base)
def other(root):
    (root / "etc/other").write_text("o")

import atexit

@atexit.register
def _threads():
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    with open(os.path.join(os.path.dirname(__file__), "threads.txt"), "w") as f:
        f.write(",".join(names))
"""

PRISTINE = """
import os
import pytest

PRISTINE = {"data": sorted(f"f{n}" for n in range(5)), "etc": ["os-release"]}

@pytest.mark.parametrize(
    "i, name",
    [pytest.param(i, n, marks=pytest.mark.layer(n)) for i in range(N)
     for n in ["other" if i % 3 == 0 else "base"]],
)
def test_pristine(rootfs, i, name):
    etc = sorted(os.listdir(rootfs / "etc"))
    assert etc == sorted(PRISTINE["etc"] + (["other"] if name == "other" else [])), etc
    assert sorted(os.listdir(rootfs / "data")) == PRISTINE["data"]
    for n in range(5):
        assert (rootfs / f"data/f{n}").read_text() == str(n)
    assert not (rootfs / "new").exists()
    # Writes, deletes and renames the next test must never see.
    (rootfs / "new").write_text(str(i))
    (rootfs / "data/f1").unlink()
    os.rename(rootfs / "data/f2", rootfs / "data/moved")
    (rootfs / "data/f3").write_text("changed")
    (rootfs / "etc/os-release").write_text("ID=changed\\n")
"""


def _pristine(path: Path, n: int) -> Path:
    return write_project(path, CONFTEST, PRISTINE.replace("N)", f"{n})"), ini=POOL_INI)


def _nothing_left(path: Path, store: Path) -> None:
    assert our_mounts_under(path) == [], "mounts left"
    views = store / "scratch" / "views"
    assert not views.is_dir() or os.listdir(views) == [], os.listdir(views)
    assert (path / "threads.txt").read_text() == "", "threads left at exit"


@pytest.mark.requires_overlay
def test_pristine_views_and_nothing_left(tmp_path: Path) -> None:
    store = _pristine(tmp_path, 200)
    proc = run_session(tmp_path, "-vv", "-p", "no:xdist")
    assert proc.returncode == 0, out(proc)
    assert "200 passed" in proc.stdout, out(proc)
    # Every view came from the pool (how many were ready in time depends on the machine).
    assert "layers: view pool: 200 views served by helpers" in proc.stdout, out(proc)
    _nothing_left(tmp_path, store)


@pytest.mark.requires_overlay
def test_pool_is_on_by_default_and_0_turns_it_off(tmp_path: Path) -> None:
    write_project(tmp_path, CONFTEST, PRISTINE.replace("N)", "5)"))  # no ini line of its own
    proc = run_session(tmp_path, "-vv", "-p", "no:xdist")
    assert proc.returncode == 0, out(proc)
    assert "5 passed" in proc.stdout, out(proc)
    assert "layers: view pool: 5 views served by helpers" in proc.stdout, out(proc)
    proc = run_session(tmp_path, "-vv", "-p", "no:xdist", "-o", "layers_view_pool=0")
    assert proc.returncode == 0, out(proc)
    assert "5 passed" in proc.stdout, out(proc)
    assert "view pool" not in proc.stdout, out(proc)
    proc = run_session(tmp_path, "-o", "layers_view_pool=99")
    assert proc.returncode != 0
    assert "layers_view_pool: '99' is not a number of views" in proc.stderr, out(proc)


@pytest.mark.slow
@pytest.mark.requires_overlay
@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_pristine_views_2000_tests(tmp_path: Path, xdist: bool) -> None:
    store = _pristine(tmp_path, 2000)
    args = ("-n", "2") if xdist else ("-p", "no:xdist")
    proc = run_session(tmp_path, *args, timeout=900)
    assert proc.returncode == 0, out(proc)
    assert "2000 passed" in proc.stdout, out(proc)
    _nothing_left(tmp_path, store)


@pytest.mark.requires_overlay
def test_randomly_order_still_pristine(tmp_path: Path) -> None:
    """pytest-randomly reorders the items before the plugin reads the plan; the pool follows
    the order the tests run in. Only this test's session loads pytest-randomly (the suite's own
    order stays as written): from this interpreter, or from PYTEST_LAYERS_RANDOMLY_PATH."""
    from conftest import randomly_path, require

    require("randomly")
    extra = randomly_path()
    env = child_env()
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    store = _pristine(tmp_path, 100)
    proc = subprocess.run(
        [*pytest_command()[:3], "-p", "randomly", "-p", "no:xdist", "-vv"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, out(proc)
    assert "Using --randomly-seed=" in proc.stdout, out(proc)
    order = [line.split(" ")[0] for line in proc.stdout.splitlines() if " PASSED" in line]
    assert len(order) == 100, out(proc)
    assert order != sorted(order, key=lambda name: int(name.split("[")[1].split("-")[0])), (
        "pytest-randomly did not reorder the tests"
    )
    assert "layers: view pool: 100 views served by helpers" in proc.stdout, out(proc)
    _nothing_left(tmp_path, store)


SNAPSHOT = """
import os
import pytest

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(12))
def test_snap(rootfs, i):
    (rootfs / f"mine{i}").write_text(f"written by {i}")
    (rootfs / "data/f0").unlink()
    os.rename(rootfs / "data/f4", rootfs / f"data/renamed{i}")
    assert i % 4 != 1, "fails"
"""


@pytest.mark.requires_overlay
def test_failing_tests_snapshots_hold_exactly_their_own_writes(tmp_path: Path) -> None:
    from pytest_layers.store import Store

    store_path = write_project(
        tmp_path, CONFTEST, SNAPSHOT, ini=[*POOL_INI, "layers_keep_count = 10"]
    )
    proc = run_session(tmp_path, "-p", "no:xdist")
    assert proc.returncode == 1, out(proc)
    assert "3 failed, 9 passed" in proc.stdout, out(proc)
    store = Store(store_path)
    snaps = {s.test: s.chain_id for s in store.snapshots()}
    assert sorted(snaps) == [f"test_project.py::test_snap[{i}]" for i in (1, 5, 9)]
    for i in (1, 5, 9):
        layer = store.layer_dir(snaps[f"test_project.py::test_snap[{i}]"])
        files = sorted(str(p.relative_to(layer)) for p in layer.rglob("*"))
        assert files == ["data", "data/f0", "data/f4", f"data/renamed{i}", f"mine{i}"], files
        assert (layer / f"mine{i}").read_text() == f"written by {i}"
        assert (layer / f"data/renamed{i}").read_text() == "4"
    _nothing_left(tmp_path, store_path)


KINDS = """
import os
import pytest

@pytest.fixture(params=range(6))
def n(request):
    return request.param

@pytest.mark.layer("base", readonly=True)
def test_readonly(rootfs, n):
    with pytest.raises(OSError):
        (rootfs / "x").write_text("x")
    assert (rootfs / "etc/os-release").read_text() == "ID=demo\\n"

@pytest.mark.layer("base", init={"etc/hostname": "box\\n"})
def test_init(rootfs, n):
    assert (rootfs / "etc/hostname").read_text() == "box\\n"
    assert not (rootfs / f"mine{n}").exists()
    (rootfs / f"mine{n}").write_text("mine")
    # Init files are never part of a diff.
    assert [str(c) for c in rootfs.diff()] == [f"A /mine{n}"]

@pytest.mark.layer("other", "base")
def test_union(rootfs, n):
    assert (rootfs / "etc/other").read_text() == "o"
    assert not (rootfs / f"kept{n}").exists()
    (rootfs / f"kept{n}").write_text(str(n))
"""


@pytest.mark.requires_overlay
def test_readonly_init_union_and_keep_always_from_the_pool(tmp_path: Path) -> None:
    """Each kind of view has its own key (readonly=, init=, the union): each is pooled, keeps
    its behaviour, and --layers-keep=always snapshots every writable one from its own upper."""
    from pytest_layers.store import Store

    store_path = write_project(tmp_path, CONFTEST, KINDS, ini=[*POOL_INI, "layers_keep_count = 10"])
    proc = run_session(tmp_path, "-vv", "-p", "no:xdist", "--layers-keep=always")
    assert proc.returncode == 0, out(proc)
    assert "18 passed" in proc.stdout, out(proc)
    assert "layers: view pool: 18 views served by helpers" in proc.stdout, out(proc)
    store = Store(store_path)
    snaps = {s.test: s.chain_id for s in store.snapshots()}
    assert not [t for t in snaps if "readonly" in t], snaps
    for n in range(6):
        union = store.layer_dir(snaps[f"test_project.py::test_union[{n}]"])
        assert sorted(p.name for p in union.iterdir()) == [f"kept{n}"]
        init = store.layer_dir(snaps[f"test_project.py::test_init[{n}]"])
        assert sorted(p.name for p in init.iterdir()) == [f"mine{n}"]
    _nothing_left(tmp_path, store_path)


INTERRUPT = """
import pytest

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(20))
def test_it(rootfs, i):
    (rootfs / "x").write_text("x")
    if i == 7:
        raise KeyboardInterrupt
"""


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("overlay", marks=pytest.mark.requires_overlay),
        # The helper's daemons and their watcher: all gone once the drained helper exits.
        pytest.param("fuse", marks=pytest.mark.requires_fuse),
    ],
)
def test_keyboard_interrupt_leaves_nothing(tmp_path: Path, backend: str) -> None:
    store = write_project(tmp_path, CONFTEST, INTERRUPT, ini=POOL_INI)
    proc = run_session(tmp_path, "-p", "no:xdist", f"--layers-backend={backend}")
    assert proc.returncode == 2, out(proc)
    assert "KeyboardInterrupt" in proc.stdout + proc.stderr, out(proc)
    _nothing_left(tmp_path, store)
    for _ in range(500):  # unmounted daemons exit by themselves, a moment later
        if not _fuse_daemons_in(tmp_path):
            break
        time.sleep(0.01)
    assert _fuse_daemons_in(tmp_path) == []


KILLED = """
import os, signal
import pytest

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(20))
def test_it(rootfs, i):
    (rootfs / "x").write_text("x")
    if i == 7 and os.environ.get("KILL_ME"):
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.requires_overlay
@pytest.mark.requires_root
def test_sigkill_leftovers_are_swept_by_the_next_session(tmp_path: Path) -> None:
    """Ready views and retiring ones of a killed session: its mounts die with its namespace,
    its scratch (tmpfs or disk) is swept by the next session."""
    store = write_project(tmp_path, CONFTEST, KILLED, ini=POOL_INI)
    proc = run_session(tmp_path, "-p", "no:xdist", env=child_env(KILL_ME="1"))
    assert proc.returncode == -signal.SIGKILL, out(proc)
    assert our_mounts_under(tmp_path) == [], "the killed session's mounts outlived it"
    proc = run_session(tmp_path, "-p", "no:xdist")
    assert proc.returncode == 0, out(proc)
    assert dead_leftovers(store) == [], "the killed session's scratch was not swept"
    _nothing_left(tmp_path, store)


def _fuse_daemons_in(path: Path) -> list[int]:
    """fuse-overlayfs processes whose output (the log in a view's scratch) is under path (not
    their working directory: the daemon changes to / once mounted)."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "fuse-overlayfs":
                continue
            out = os.readlink(f"/proc/{pid}/fd/1")
        except OSError:
            continue
        if out.startswith(str(path)):
            found.append(pid)
    return found


@pytest.mark.requires_fuse
def test_fuse_views_from_the_pool_are_pristine_and_their_daemons_go(tmp_path: Path) -> None:
    """The fuse backend in the pool: daemons started ahead by the helper (in the process
    group of its watcher, without forking the session), each test its own view; after a
    normal end and after a SIGKILL of the session, no daemon and no mount is left."""
    (tmp_path / "pristine").mkdir()
    (tmp_path / "killed").mkdir()
    store = _pristine(tmp_path / "pristine", 30)
    proc = run_session(tmp_path / "pristine", "-vv", "-p", "no:xdist", "--layers-backend=fuse")
    assert proc.returncode == 0, out(proc)
    assert "30 passed" in proc.stdout, out(proc)
    assert "layers: view pool: 30 views served by helpers" in proc.stdout, out(proc)
    _nothing_left(tmp_path / "pristine", store)
    assert _fuse_daemons_in(tmp_path) == []

    write_project(tmp_path / "killed", CONFTEST, KILLED, ini=POOL_INI)
    proc = run_session(
        tmp_path / "killed", "-p", "no:xdist", "--layers-backend=fuse", env=child_env(KILL_ME="1")
    )
    assert proc.returncode == -signal.SIGKILL, out(proc)
    for _ in range(500):  # the helper dies with the session, its watcher sends SIGTERM
        if not _fuse_daemons_in(tmp_path):
            break
        time.sleep(0.01)
    assert _fuse_daemons_in(tmp_path) == [], "a fuse daemon outlived the killed session"
    for _ in range(500):  # as root, the namespace (and its mounts) goes with its last process
        if os.geteuid() != 0 or not our_mounts_under(tmp_path):
            break
        time.sleep(0.01)
    left = our_mounts_under(tmp_path)
    if left and os.geteuid() != 0:
        # An ordinary user's fuse views are mounted in the host's mount namespace (no private
        # one dies with the session): a killed session can leave the mounts of its ready views,
        # and the next session on the store sweeps them before it starts.
        proc = run_session(tmp_path / "killed", "-p", "no:xdist", "--layers-backend=fuse")
        assert proc.returncode == 0, out(proc)
        left = our_mounts_under(tmp_path)
    assert left == []


_GUARDED = """
import os, sys, time
from pathlib import Path
from pytest_layers.backends import fuse

root = Path(sys.argv[1])
fuse.guard_daemons()
view = fuse.FuseBackend().open([root / "lower"], root / "scratch")
print(os.getpid(), os.getpgid(0), fuse._group(), flush=True)
time.sleep(60)
"""


def _processes_in_group(pgid: int) -> dict[int, str]:
    """pid -> comm of the live (not zombie) processes of a process group."""
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            comm, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
        except OSError:
            continue
        fields = rest.split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found[pid] = comm.partition("(")[2]
    return found


@pytest.mark.requires_fuse
@pytest.mark.skipif(sys.version_info < (3, 11), reason="Popen's process_group is 3.11's")
def test_guarded_fuse_daemons_join_the_watchers_group_and_end_with_their_starter(
    tmp_path: Path,
) -> None:
    """In a process that called guard_daemons (the pool's helper does), a daemon is started
    without a death signal (no setpriv, no fork of the caller) in the process group of a
    watcher, not the caller's (a Ctrl-C to the terminal's group does not reach it); when the
    starter is SIGKILLed, the watcher ends the daemon and itself."""
    (tmp_path / "lower").mkdir()
    (tmp_path / "lower" / "f").write_text("lower\n")
    (tmp_path / "scratch").mkdir()
    starter = subprocess.Popen(
        [sys.executable, "-c", _GUARDED, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    group = 0
    try:
        assert starter.stdout is not None
        pid, pgid, group = map(int, starter.stdout.readline().split())
        assert group != pgid
        members = _processes_in_group(group)
        assert sorted(members.values()) == ["fuse-overlayfs", "sh"], members
        daemon = next(p for p, comm in members.items() if comm == "fuse-overlayfs")
        ppid = int(Path(f"/proc/{daemon}/stat").read_text().rpartition(")")[2].split()[1])
        assert ppid == pid, "the daemon was not started by the starter itself"
        assert (tmp_path / "scratch" / "m" / "f").read_text() == "lower\n"
    finally:
        starter.kill()
        starter.communicate()
        try:
            for _ in range(500):  # the watcher sends SIGTERM to the group, then exits
                if not group or not _processes_in_group(group):
                    break
                time.sleep(0.01)
            if group:
                assert _processes_in_group(group) == {}, "the daemon outlived its starter"
        finally:
            # fuse-overlayfs exits on SIGTERM without unmounting: in a session, the mount goes
            # with the session's namespace (root) or the next session's sweep (a user).
            if our_mounts_under(tmp_path):
                cmd = ["umount", "-l"] if os.geteuid() == 0 else ["fusermount3", "-u", "-z"]
                subprocess.run([*cmd, str(tmp_path / "scratch" / "m")], check=False)
    assert our_mounts_under(tmp_path) == []


GROUPED = """
import os
import pytest

def helpers_daemons():
    \"\"\"(pid, pgid) of the fuse-overlayfs processes whose parent is a child of this session.\"\"\"
    stats = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                comm, _, rest = open(f"/proc/{p}/stat").read().rpartition(")")
            except OSError:
                continue
            fields = rest.split()
            stats[int(p)] = (comm.partition("(")[2], int(fields[1]), int(fields[2]))
    return [
        (pid, pgid)
        for pid, (comm, ppid, pgid) in stats.items()
        if comm == "fuse-overlayfs" and stats.get(ppid, ("", 0, 0))[1] == os.getpid()
    ]

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(6))
def test_daemons_outside_the_sessions_group(rootfs, i):
    daemons = helpers_daemons()
    assert daemons, "no daemon started by a pool helper"
    assert all(pgid != os.getpgid(0) for _, pgid in daemons), daemons
"""


@pytest.mark.requires_fuse
@pytest.mark.skipif(sys.version_info < (3, 11), reason="Popen's process_group is 3.11's")
def test_the_pool_helpers_fuse_daemons_run_in_their_watchers_group(tmp_path: Path) -> None:
    """The helper starts its daemons guarded (guard_daemons): out of the session's process
    group, which a Ctrl-C at the terminal reaches."""
    store = write_project(tmp_path, CONFTEST, GROUPED, ini=POOL_INI)
    proc = run_session(tmp_path, "-p", "no:xdist", "--layers-backend=fuse")
    assert proc.returncode == 0, out(proc)
    assert "6 passed" in proc.stdout, out(proc)
    _nothing_left(tmp_path, store)


def test_copy_backend_views_reset_in_the_helper_stay_pristine(tmp_path: Path) -> None:
    """The copy backend in the pool: the helper resets each returned copy and hands it out
    again; every test still sees the image (the tests check it) and a failing test's snapshot
    holds exactly its own writes (taken in the session, by the walk)."""
    from pytest_layers.store import Store

    # suid,dev: as root, a copy is otherwise bound over itself, and a bound copy is not reused.
    args = ("-p", "no:xdist", "--layers-backend=copy", "-o", "layers_mount_options=suid,dev")
    (tmp_path / "pristine").mkdir()
    (tmp_path / "snap").mkdir()
    store_path = _pristine(tmp_path / "pristine", 30)
    proc = run_session(tmp_path / "pristine", "-vv", *args)
    assert proc.returncode == 0, out(proc)
    assert "30 passed" in proc.stdout, out(proc)
    assert "layers: view pool: 30 views served by helpers" in proc.stdout, out(proc)
    # The helpers reset the copies and their counts reach the session's line (checked in
    # test_copy_reuse_counts_are_reported_with_the_pool_on_as_off): never a line of zeros.
    assert "layers: copy: 0 copies reset" not in proc.stdout, out(proc)
    _nothing_left(tmp_path / "pristine", store_path)

    store_path = write_project(
        tmp_path / "snap", CONFTEST, SNAPSHOT, ini=[*POOL_INI, "layers_keep_count = 10"]
    )
    proc = run_session(tmp_path / "snap", *args)
    assert proc.returncode == 1, out(proc)
    assert "3 failed, 9 passed" in proc.stdout, out(proc)
    snaps = {s.test: s.chain_id for s in Store(store_path).snapshots()}
    for i in (1, 5, 9):
        layer = Store(store_path).layer_dir(snaps[f"test_project.py::test_snap[{i}]"])
        files = sorted(str(p.relative_to(layer)) for p in layer.rglob("*"))
        assert files == ["data", "data/f0", "data/f4", f"data/renamed{i}", f"mine{i}"], files
    _nothing_left(tmp_path / "snap", store_path)


REUSE_COUNTED = """
import subprocess
import pytest

LEFT = []

@pytest.mark.parametrize("i", range(8))
@pytest.mark.layer("base")
def test_counted(rootfs, i):
    (rootfs / f"new{i}").write_text(str(i))
    if i == 3:
        # A process left working in the copy: it cannot be reset with certainty.
        LEFT.append(subprocess.Popen(["sleep", "60"], cwd=rootfs / "etc"))
    if i == 7:
        for proc in LEFT:
            proc.kill()
            proc.wait()
"""


@pytest.mark.parametrize("depth", [2, 0])
def test_copy_reuse_counts_are_reported_with_the_pool_on_as_off(tmp_path: Path, depth: int) -> None:
    """With the pool on, the helper resets the copies: it says which views it hands out reset,
    and how many resets it refused, so ``-v`` counts them as the session does without the
    pool (before, the line was missing: the counts stayed in the helper)."""
    ini = [f"layers_view_pool = {depth}", "layers_mount_options = suid,dev"]
    write_project(tmp_path, CONFTEST, REUSE_COUNTED, ini=ini)
    proc = run_session(tmp_path, "-vv", "-p", "no:xdist", "--layers-backend=copy")
    assert proc.returncode == 0, out(proc)
    assert "8 passed" in proc.stdout, out(proc)
    # Fresh copies: the first test's, and one after test 3's was thrown away. The pool asks
    # for each view two tests ahead, before the test two places back gave its copy back: the
    # first three tests get fresh copies. Every other test gets a reset one.
    reused = 8 - (1 if depth == 0 else 3) - 1
    line = f"layers: copy: {reused} copies reset and reused, 1 thrown away"
    assert line in proc.stdout, out(proc)


def test_a_view_read_back_is_loaded_once_whatever_the_threads() -> None:
    """A view from the pool makes its paths at first use; threads of a test that use a fresh
    rootfs at once (rootfs.run() from a thread pool, say) each get every field."""
    import sys
    import threading

    from pytest_layers.backends.base import View
    from pytest_layers.rootfs import Prepared, from_portable, portable

    view = View(Path("/v/merged"), Path("/v/upper"), "overlay")
    data = portable(Prepared(Path("/v"), view, {"etc/a"}, {"etc"}, Path("/v/init")))
    errors: list[BaseException] = []
    seen: list[tuple[object, ...]] = []

    def use(prepared: Prepared, start: threading.Barrier) -> None:
        start.wait()
        try:
            seen.append((prepared.view, prepared.scratch, prepared.init_dirs, prepared.init_dir))
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for _ in range(300):
            prepared = from_portable(data)
            start = threading.Barrier(4)
            threads = [threading.Thread(target=use, args=(prepared, start)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(seen) == 1200
    assert all(s == (view, Path("/v"), {"etc"}, Path("/v/init")) for s in seen)
