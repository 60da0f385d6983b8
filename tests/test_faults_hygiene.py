"""Faults, group 7: resource hygiene over 2,000 tests that each get a rootfs.

A session runs 2,000 tests, each opening a rootfs, writing to it and diffing it (every 100th
also commits). The project's conftest samples the process after a warm-up test and again in
the last test (both hold exactly one open view): open file descriptors, mount table lines,
entries in the session's scratch dir, entries in its private ``TMPDIR``, and RSS. None may grow
except RSS, which must stay within 50 MiB (the peak RSS is reported), and, with the view pool,
the session's views, by at most what the pool holds at a time. After the session, nothing
it mounted or created is left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from faults_util import (
    child_env,
    no_mounts_left,
    our_mounts_under,
    out,
    pytest_command,
    run_session,
    write_project,
)

from pytest_layers.backends import pool

pytestmark = [pytest.mark.faults, pytest.mark.slow]

N_TESTS = 2000
RSS_BOUND = 50 << 20

CONFTEST = """
import json, os, resource
from pathlib import Path
import pytest
from pytest_layers import layer

HERE = Path(__file__).parent

@layer
def base(root):
    (root / "etc").mkdir()
    for i in range(100):
        (root / "etc" / f"f{i}").write_text(str(i) * 50)

def sample(rootfs):
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
    )
    session_scratch = Path(os.fspath(rootfs)).parents[2]  # views/<session>/<n>/view/m
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    inside = [p for p in points if p.startswith(str(session_scratch) + "/")]
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        # The session's views (the view pool's ready and retiring ones among them), and the rest.
        "view_mounts": len(inside),
        "mounts": len(points) - len(inside),
        "scratch": len(os.listdir(session_scratch)),
        "tmp": sorted(os.listdir(os.environ["TMPDIR"])),
        "rss": int(status["VmRSS"].split()[0]) * 1024,
        "peak": int(status["VmHWM"].split()[0]) * 1024,
        "threads": len(os.listdir("/proc/self/task")),
    }
"""

TESTS = """
import json, os
from pathlib import Path
import pytest
from conftest import HERE, sample

N = int(os.environ["N_TESTS"])

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(N))
def test_many(rootfs, i):
    (rootfs / "etc" / "f1").write_text("changed")
    (rootfs / "new").mkdir()
    (rootfs / "new" / "file").write_text(str(i))
    assert [str(c) for c in rootfs.diff()] == [
        "C /etc", "C /etc/f1", "A /new", "A /new/file"
    ]
    if i % 100 == 99:
        assert rootfs.commit().files >= 2
    if i == 20:
        (HERE / "warm.json").write_text(json.dumps(sample(rootfs)))
    if i == N - 1:
        (HERE / "end.json").write_text(json.dumps(sample(rootfs)))
"""


def _run(
    path: Path, backend: str, *, as_user: bool, n: int = N_TESTS, extra: Sequence[str] = ()
) -> dict[str, dict[str, object]]:
    tmpdir = path / "tmpdir"
    tmpdir.mkdir()
    if as_user:
        owner = os.stat(path)
        os.chown(tmpdir, owner.st_uid, owner.st_gid)
    store = write_project(path, CONFTEST, TESTS)
    args = [f"--layers-backend={backend}", "-p", "no:randomly", *extra]
    if as_user:
        from conftest import run_as_user

        proc = run_as_user(
            pytest_command(*args),
            cwd=path,
            env={"TMPDIR": str(tmpdir), "PYTHONDONTWRITEBYTECODE": "1", "N_TESTS": str(n)},
            timeout=600,
        )
    else:
        proc = run_session(
            path, *args, env=child_env(TMPDIR=str(tmpdir), N_TESTS=str(n)), timeout=600
        )
    assert proc.returncode == 0, out(proc)
    assert f"{n} passed" in proc.stdout, out(proc)
    warm = json.loads((path / "warm.json").read_text())
    end = json.loads((path / "end.json").read_text())
    # After the session: nothing mounted, no scratch, no temp files.
    assert our_mounts_under(path) == []
    views = store / "scratch" / "views"
    assert not views.exists() or os.listdir(views) == [], os.listdir(views)
    assert os.listdir(store / "tmp") == []
    assert os.listdir(tmpdir) == []
    return {"warm": warm, "end": end, "n": {"n": n}}


#: What the view pool (on by default) may hold at any moment, in views: ready ones, retired ones
#: on their way to the helper and waiting for its cleaner. Each may be two mount lines.
POOL_VIEWS = pool.DEFAULT_DEPTH + 2 * pool.BATCH + pool.CLEAN_BACKLOG + 1


def _check(samples: dict[str, dict[str, object]], label: str, *, pooled: bool = True) -> None:
    """Nothing may grow; with the view pool, the session's views (mounts and scratch entries)
    may differ by what the pool holds at the two moments, bounded whatever the test count."""
    warm, end = samples["warm"], samples["end"]
    rss_growth = int(end["rss"]) - int(warm["rss"])  # type: ignore[call-overload]
    print(
        f"{label}: {samples['n']['n']} tests; fds {len(warm['fds'])}->{len(end['fds'])}, "  # type: ignore[arg-type]
        f"mount lines {warm['mounts']}->{end['mounts']}, of views "
        f"{warm['view_mounts']}->{end['view_mounts']}, scratch entries "
        f"{warm['scratch']}->{end['scratch']}, threads {warm['threads']}->{end['threads']}, "
        f"RSS {int(warm['rss']) >> 20}->{int(end['rss']) >> 20} MiB "  # type: ignore[call-overload]
        f"(growth {rss_growth / (1 << 20):.1f} MiB), peak RSS {int(end['peak']) >> 20} MiB"  # type: ignore[call-overload]
    )
    assert end["fds"] == warm["fds"], "file descriptors leaked"
    assert end["mounts"] == warm["mounts"], "mounts leaked"
    views = int(end["view_mounts"]) - int(warm["view_mounts"])  # type: ignore[call-overload]
    scratch = int(end["scratch"]) - int(warm["scratch"])  # type: ignore[call-overload]
    if pooled:
        assert abs(views) <= 2 * POOL_VIEWS, f"view mounts leaked: {views}"
        assert abs(scratch) <= POOL_VIEWS, f"view scratch dirs leaked: {scratch}"
    else:
        assert views == 0, "view mounts leaked"
        assert scratch == 0, "view scratch dirs leaked"
    assert end["tmp"] == warm["tmp"], "temporary files leaked"
    assert end["threads"] == warm["threads"], "threads leaked"
    assert rss_growth < RSS_BOUND, f"RSS grew by {rss_growth >> 20} MiB"


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("overlay", marks=[pytest.mark.requires_root, pytest.mark.requires_overlay]),
        pytest.param("copy", marks=pytest.mark.requires_root),
        # Unbound copies (as where mounting is refused) are reset and reused: one copy, one
        # inotify instance and its watches for the whole session, nothing more per test.
        pytest.param("copy-reuse", marks=pytest.mark.requires_root),
        # Without the view pool every view is made and removed in its test: exact counts.
        pytest.param(
            "overlay-nopool", marks=[pytest.mark.requires_root, pytest.mark.requires_overlay]
        ),
    ],
)
def test_two_thousand_rootfs_tests_leak_nothing(pytester: pytest.Pytester, backend: str) -> None:
    # The copy backend pays a real copy and a ctime-clock tick per test (~25 ms here): 500 of
    # its tests make the same point within the suite's time budget; so do 500 without the
    # pool, whose counts must not move at all (the pooled overlay case runs all 2,000).
    n = {"overlay": N_TESTS, "copy": 500, "overlay-nopool": 500}.get(backend, N_TESTS)
    extra: tuple[str, ...] = ()
    if backend == "copy-reuse":
        extra = ("-o", "layers_mount_options=suid,dev")
    pooled = not backend.endswith("-nopool")
    if not pooled:
        extra = ("-o", "layers_view_pool=0")
    name = backend.removesuffix("-reuse").removesuffix("-nopool")
    with no_mounts_left(pytester.path):
        samples = _run(pytester.path, name, as_user=False, n=n, extra=extra)
        _check(samples, f"root/{backend}", pooled=pooled)


@pytest.mark.slow
@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_two_thousand_rootfs_tests_leak_nothing_as_user(user_tmp_path: Path) -> None:
    with no_mounts_left(user_tmp_path):
        _check(_run(user_tmp_path, "auto", as_user=True), "user/auto")
