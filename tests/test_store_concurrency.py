"""The store under concurrent writers and under SIGKILL: store.py's invariants.

Every worker is a separate Python process (the store's locks are cross-process), started so that
they all reach the contended call at the same moment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pytest_layers.store import Store

_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from pytest_layers.store import Store

    mode, root, counter, seed = sys.argv[1:5]
    files = int(sys.argv[5])

    def build(staged: Path) -> None:
        # Fixed mtimes: every worker builds the byte-identical tree, hence the same chain id.
        for i in range(files):
            d = staged / f"d{i % 16}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}").write_text(f"{seed}:{i}\\n" * (i % 50 + 1))
            os.utime(d / f"f{i}", (1_000_000_000, 1_000_000_000))
        for d in staged.iterdir():
            os.utime(d, (1_000_000_000, 1_000_000_000))

    store = Store(root)
    with store.staging() as staged:
        if mode != "prune":
            build(staged)
        print("ready", flush=True)
        sys.stdin.readline()  # go
        start = time.perf_counter()
        if mode == "add":
            result = store.add_layer(staged, parent=None, name="same", source="build").chain_id
        elif mode == "key":
            with store.build_lock("key-1"):
                result = store.cache_get("key-1")
                if result is None:
                    with open(counter, "a") as f:
                        f.write(f"{os.getpid()}\\n")
                    info = store.add_layer(staged, parent=None, name=None, source="build")
                    result = info.chain_id
                    store.cache_set("key-1", result)
        elif mode == "prune":
            result = str(len(store.prune().removed_layers))
        print(result, time.perf_counter() - start, flush=True)
    """
)


@contextmanager
def workers(
    n: int, *args: str, env: dict[str, str] | None = None, pause: str | None = None
) -> Iterator[list[subprocess.Popen[str]]]:
    """Start n workers, wait until each is ready, then release them all at once; ``pause``
    names a fault point where they stop (tests/faults_util.py)."""
    from faults_util import pause_source

    code = (pause_source(pause) if pause else "") + _WORKER
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line == "ready\n", (line, p.stderr.read() if p.stderr else "")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(out.split()[0])
    return results


def assert_consistent(store: Store) -> None:
    """Only complete layers are visible, and each one verifies."""
    layers_dir = store.root / "layers"
    for name in os.listdir(layers_dir):
        assert sorted(os.listdir(layers_dir / name)) == ["diff", "files.json", "layer.json"], name
        assert json.loads((layers_dir / name / "layer.json").read_text())["chain_id"][7:] == name
    assert Store(store.root).verify() == []
    for chain_id in store.names().values():
        assert store.has_layer(chain_id)


def test_eight_processes_adding_the_same_layer(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with workers(8, "add", str(store.root), "-", "same", "300") as procs:
        results = finish(procs)
    assert len(set(results)) == 1
    assert store.layers() == results[:1]
    assert store.get_name("same") == results[0]
    assert os.listdir(store.root / "tmp") == []  # the seven losers discarded their trees
    assert_consistent(store)


def test_eight_processes_racing_on_one_build_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    counter = tmp_path / "builds"
    with workers(8, "key", str(store.root), str(counter), "k", "300") as procs:
        results = finish(procs)
    assert len(counter.read_text().splitlines()) == 1  # built once
    assert len(set(results)) == 1
    assert store.layers() == results[:1]
    assert store.cache_get("key-1") == results[0]
    assert os.listdir(store.root / "tmp") == []
    assert_consistent(store)


def _kill_after(proc: subprocess.Popen[str], delay: float) -> None:
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_just_before_the_rename_leaves_no_partial_layer(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    # The pause sits after layer.json is written and before the rename: the worst moment.
    with workers(1, "add", str(store.root), "-", "p", "50", pause="add_layer") as (proc,):
        assert proc.stdout is not None
        paused = proc.stdout.readline()
        assert paused.startswith("PAUSED "), paused
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    container = Path(paused.split(" ", 1)[1].strip())
    assert (container / "layer.json").is_file()  # complete, yet invisible
    assert store.layers() == []
    assert store.get_name("same") is None

    Store(store.root)  # the next opener sweeps what the dead process left
    assert not container.exists()
    with workers(1, "add", str(store.root), "-", "p", "50") as procs:
        (chain_id,) = finish(procs)
    assert store.layers() == [chain_id]
    assert_consistent(store)


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_at_random_points_while_adding(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    files = "800"
    with workers(1, "add", str(store.root), "-", "calibrate", files) as procs:
        out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0, err
    duration = float(out.split()[1])
    rng = random.Random(os.environ.get("PYTEST_LAYERS_FAULT_SEED", "store"))
    killed = 0
    for run in range(8):
        with workers(1, "add", str(store.root), "-", f"run{run}", files) as (proc,):
            _kill_after(proc, rng.uniform(0, duration * 1.1))
            proc.wait()
            killed += proc.returncode == -signal.SIGKILL
        assert_consistent(store)
    assert killed >= 4, f"only {killed} of 8 workers were killed before finishing"

    # Every interrupted add succeeds on the next try, and nothing is left behind.
    for run in range(8):
        with workers(1, "add", str(store.root), "-", f"run{run}", files) as procs:
            finish(procs)
    assert len(store.layers()) == 9
    assert os.listdir(Store(store.root).root / "tmp") == []
    assert_consistent(store)


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_at_random_points_while_pruning(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "kept").write_text("kept")
        kept = store.add_layer(staged, parent=None, name="kept", source="build").chain_id
    rng = random.Random(os.environ.get("PYTEST_LAYERS_FAULT_SEED", "prune"))

    def add_garbage(run: int) -> None:
        for i in range(20):
            with store.staging() as staged:
                for j in range(50):
                    (staged / f"f{j}").write_text(f"{run}:{i}:{j}")
                store.add_layer(staged, parent=None, name=None, source="build")
        store.close()  # no ref and no lease: all 20 are garbage

    # How long such a prune takes on this machine, now: the kill window is drawn inside it, so
    # the test means the same on a fast idle machine and a slow loaded one.
    add_garbage(-1)
    with workers(1, "prune", str(store.root), "-", "-", "0") as (proc,):
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    removed, seconds = out.split()
    assert removed == "20"
    duration = float(seconds)
    interrupted = 0
    for run in range(8):
        add_garbage(run)
        with workers(1, "prune", str(store.root), "-", "-", "0") as (proc,):
            _kill_after(proc, rng.uniform(0.05, 0.9) * duration)
            proc.wait()
        # Killed half-way: what it had taken out of layers/ waits in tmp/ for a sweep.
        interrupted += proc.returncode == -signal.SIGKILL and bool(os.listdir(store.root / "tmp"))
        assert_consistent(store)
        assert store.has_layer(kept)
    assert interrupted >= 1, f"no prune (~{duration * 1000:.0f} ms each) was killed half-way"
    Store(store.root).prune()
    assert store.layers() == [kept]
    assert os.listdir(store.root / "tmp") == []


def test_a_write_probe_swept_by_another_session_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a store proves it writable with a probe file; another session opening the same
    store may sweep that probe before it is removed, which must not fail this one."""
    from pytest_layers import _storecore

    real_write = _storecore._write_new  # type: ignore[attr-defined]

    def write_then_swept(path: Any, *args: Any, **kw: Any) -> Any:
        made = real_write(path, *args, **kw)
        if "-probe-" in str(path):
            os.unlink(path)  # the other session's sweep
        return made

    monkeypatch.setattr(_storecore, "_write_new", write_then_swept)
    Store(tmp_path / "s")
