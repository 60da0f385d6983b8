"""pytest-xdist: each layer built once per store, whatever the worker count; as root and user."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import run_as_user

pytestmark = [pytest.mark.requires_overlay, pytest.mark.slow]

# 8 images: a base, 6 children of it, and a grandchild; 40 tests spread over them.
CONFTEST = """
import os, time
from pytest_layers import layer

LOG = os.path.join(os.path.dirname(__file__), "runs.log")

def _count(name):
    with open(LOG, "a") as f:
        f.write(f"{name} {os.getpid()}\\n")
    time.sleep(0.2)  # widen the race window: other workers must wait, not build

@layer
def base(root):
    _count("base")
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")

def _child(n):
    def build(root):
        _count(f"child{n}")
        (root / f"etc/child{n}").write_text(str(n))
    build.__name__ = build.__qualname__ = f"child{n}"
    return layer(name=f"child{n}", parent=base, version=str(n))(build)

child1, child2, child3, child4, child5, child6 = (_child(n) for n in range(1, 7))

@layer(parent="child6")
def grandchild(root):
    _count("grandchild")
    (root / "etc/grandchild").write_text("g")
"""

TESTS = """
import pytest

import os

IMAGES = ["base"] + [f"child{n}" for n in range(1, 7)] + ["grandchild"]
# What each image adds to /etc beyond the base's os-release.
EXPECT = {
    "base": {},
    "grandchild": {"child6": "6", "grandchild": "g"},
    **{f"child{n}": {f"child{n}": str(n)} for n in range(1, 7)},
}

@pytest.mark.parametrize("i", range(40))
def test_image(request, i):
    name = IMAGES[i % len(IMAGES)]
    request.applymarker(pytest.mark.layer(name))
    rootfs = request.getfixturevalue("rootfs")
    assert (rootfs / "etc/os-release").read_text() == "ID=demo\\n"
    assert sorted(os.listdir(rootfs / "etc")) == sorted(["os-release", *EXPECT[name]])
    for fname, content in EXPECT[name].items():
        assert (rootfs / "etc" / fname).read_text() == content
    (rootfs / "etc/scratch").write_text(str(i))
    if i == 39:
        assert False, "keep me"
"""


def _check_runs(path: Path) -> None:
    runs = Counter(line.split()[0] for line in (path / "runs.log").read_text().splitlines())
    assert runs == Counter({"base": 1, "grandchild": 1, **{f"child{n}": 1 for n in range(1, 7)}}), (
        runs
    )


def _write(path: Path) -> None:
    (path / "conftest.py").write_text(CONFTEST)
    (path / "test_x.py").write_text(TESTS)


def test_xdist_builds_once_as_root(pytester: pytest.Pytester) -> None:
    _write(pytester.path)
    result = pytester.runpytest_subprocess("-n", "4")
    result.assert_outcomes(passed=39, failed=1)
    _check_runs(pytester.path)
    result.stdout.fnmatch_lines(
        ["*- layers snapshot -*", "snapshot:test_x.py::test_image[[]39[]] (sha256:*"]
    )
    result.stdout.fnmatch_lines(
        ["*- layers snapshots -*", "SNAPSHOT test_x.py::test_image[[]39[]] -> *"]
    )
    result.stdout.fnmatch_lines(["layers: built base in *"])
    # A second run with more workers reuses everything.
    (pytester.path / "runs.log").unlink()
    pytester.runpytest_subprocess("-n", "2").assert_outcomes(passed=39, failed=1)
    assert not (pytester.path / "runs.log").exists()


@pytest.mark.requires_user
def test_xdist_builds_once_as_user(user_tmp_path: Path) -> None:
    _write(user_tmp_path)
    os.chown(user_tmp_path / "conftest.py", user_tmp_path.stat().st_uid, -1)
    os.chown(user_tmp_path / "test_x.py", user_tmp_path.stat().st_uid, -1)
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("PYTEST_LAYERS_") and k != "PYTEST_LAYERS_MOUNT_NS"
    }
    proc = run_as_user(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "4",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "--rootdir",
            str(user_tmp_path),
            str(user_tmp_path),
        ],
        cwd=user_tmp_path,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert "1 failed, 39 passed" in out, out[:3000]
    assert "layers: backend=overlay (user namespace)" in out, out
    _check_runs(user_tmp_path)


REFUSED_TESTS = """
import pytest

@pytest.mark.layer("base")
def test_needs_a_layer(rootfs):
    pass

@pytest.mark.parametrize("i", range(3))
def test_without_layers(i):
    pass
"""


def _refused_outcome(out: str) -> None:
    assert "None backend unavailable" not in out, out
    assert "INTERNALERROR" not in out, out
    assert "3 passed, 1 error" in out, out
    assert "[gw" in out, out  # the failing test ran in a worker


def test_controller_setup_error_reaches_workers(pytester: pytest.Pytester) -> None:
    """The controller refuses a store of a newer format; the workers, which do not set up
    themselves, show the controller's reason."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_refused=REFUSED_TESTS)
    store = pytester.path / "store"
    store.mkdir()
    (store / "VERSION").write_text('{"format": 99, "flavor": "overlay"}')
    result = pytester.runpytest_subprocess("-n", "2", "--layers-store=store")
    out = result.stdout.str() + result.stderr.str()
    _refused_outcome(out)
    result.stdout.fnmatch_lines(
        [
            "layers: unavailable: the layer store */store has format version 99, newer than *",
            "*pytest-layers cannot run in this session: the layer store */store has format "
            "version 99, newer than the version * this pytest-layers supports; *",
        ]
    )


def test_controller_backend_error_reaches_workers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend the controller was told to use does not work: the workers, which open the
    store fine, used to fail with "None backend unavailable" instead of the reason."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_refused=REFUSED_TESTS)
    bare = pytester.path / "bin"
    bare.mkdir()  # a PATH without fuse-overlayfs
    monkeypatch.setenv("PATH", str(bare))
    result = pytester.runpytest_subprocess("-n", "2", "--layers-backend=fuse")
    out = result.stdout.str() + result.stderr.str()
    _refused_outcome(out)
    result.stdout.fnmatch_lines(
        [
            "layers: unavailable: fuse backend unavailable: fuse-overlayfs is not installed *",
            "pytest-layers cannot run in this session: fuse backend unavailable: fuse-overlayfs "
            "is not installed or not executable (apt-get install fuse-overlayfs); to fix: *",
        ]
    )


@pytest.mark.requires_user
@pytest.mark.parametrize("cause", ["unwritable store", "overlay without a user namespace"])
def test_controller_error_reaches_workers_as_user(user_tmp_path: Path, cause: str) -> None:
    store = Path(f"{user_tmp_path}-root-store")
    store.mkdir(mode=0o755)  # root's: the test user cannot write it
    if cause == "unwritable store":
        args = [f"--layers-store={store}"]
        expected = (  # another user's store is refused before anything is written to it
            f"pytest-layers cannot run in this session: {store} belongs to uid 0 (root), "
            "not to you * a store is used by its owner only; use a store of your own*"
        )
    else:
        args = ["--layers-backend=overlay", "-o", "layers_mount_namespace=host"]
        expected = (
            "pytest-layers cannot run in this session: overlay (user namespace) backend "
            "unavailable: not root and not in a user namespace of its own *"
        )
    try:
        (user_tmp_path / "conftest.py").write_text(CONFTEST)
        (user_tmp_path / "test_refused.py").write_text(REFUSED_TESTS)
        proc = run_as_user(
            [
                sys.executable,
                "-m",
                "pytest",
                "-n",
                "2",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:randomly",
                "--rootdir",
                str(user_tmp_path),
                *args,
                str(user_tmp_path),
            ],
            cwd=user_tmp_path,
        )
        out = proc.stdout + proc.stderr
        _refused_outcome(out)
        pytest.LineMatcher(out.splitlines()).fnmatch_lines([expected])
        assert list(store.iterdir()) == []
    finally:
        store.rmdir()
