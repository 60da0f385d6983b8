"""Keep policy: failing tests leave a snapshot equal to their rw layer; init files never kept."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_layers.store import Store

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
import pytest
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "etc/old").write_text("old")

@layer
def tools(root):
    (root / "bin").mkdir()
    (root / "bin/tool").write_text("#!/bin/sh\\n")

def pytest_layers_init(item):
    return {"etc/hostname": item.name + "\\n"}

def pytest_layers_snapshot_committed(item, ref, layer):
    with open(str(item.config.rootpath / "hook.log"), "a") as f:
        f.write(f"{ref} {layer.parent.name}\\n")
"""

TESTS = """
import pytest

@pytest.mark.layer("base", init={"etc/motd": "hi"})
def test_fails(rootfs):
    assert (rootfs / "etc/hostname").read_text() == "test_fails\\n"
    (rootfs / "etc/app.conf").write_text("debug=true\\n")
    (rootfs / "etc/old").unlink()
    assert False, "boom"

@pytest.mark.layer("base", keep="never")
def test_fails_never(rootfs):
    (rootfs / "x").write_text("x")
    assert False

@pytest.mark.layer("base", keep="always")
def test_passes_always(rootfs):
    (rootfs / "kept").write_text("kept")

@pytest.mark.layer("base")
def test_passes(rootfs):
    (rootfs / "gone").write_text("x")

@pytest.mark.layer("tools", "base")
def test_union_fails(rootfs):
    assert [x.name for x in rootfs.layers] == ["base", "tools"]
    (rootfs / "bin/tool").write_text("patched")
    assert False

@pytest.mark.layer("base")
def test_commit(rootfs):
    (rootfs / "etc/app.conf").write_text("x")
    lay = rootfs.commit("configured")
    assert lay.name == "configured" and lay.parent.name == "base"
    assert [str(c) for c in lay.changes()] == ["C /etc", "A /etc/app.conf"]
"""


def _store(pytester: pytest.Pytester) -> Store:
    return Store(pytester.path / ".pytest_cache" / "layers")


def _tree(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out[str(p.relative_to(path))] = "<whiteout>"
        else:
            out[str(p.relative_to(path))] = p.read_text() if p.is_file() else "<dir>"
    return out


@pytest.mark.slow
def test_snapshots(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_snap=TESTS)
    pytester.makeini("[pytest]\nlayers_keep_count = 2\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshot -*",
            "snapshot:test_snap.py::test_fails (sha256:*, * B)",
            "inspect it with:",
            "  pytest-layers --store * diff snapshot:test_snap.py::test_fails",
            "  pytest-layers --store * shell snapshot:test_snap.py::test_fails",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshots -*",
            "SNAPSHOT test_snap.py::test_fails -> pytest-layers --store * diff "
            "snapshot:test_snap.py::test_fails",
            "SNAPSHOT test_snap.py::test_passes_always -> pytest-layers --store * diff "
            "snapshot:test_snap.py::test_passes_always",
            "SNAPSHOT test_snap.py::test_union_fails -> pytest-layers --store * diff "
            "snapshot:test_snap.py::test_union_fails",
        ]
    )
    result.stdout.no_fnmatch_line("SNAPSHOT test_snap.py::test_fails_never *")
    result.stdout.no_fnmatch_line("SNAPSHOT test_snap.py::test_passes *")

    store = _store(pytester)
    snaps = {s.test: s for s in store.snapshots()}
    assert set(snaps) == {
        "test_snap.py::test_fails",
        "test_snap.py::test_passes_always",
        "test_snap.py::test_union_fails",
    }
    # The snapshot holds exactly the rw layer: no init files (hook's or marker's).
    fails = snaps["test_snap.py::test_fails"].chain_id
    tree = _tree(store.layer_dir(fails))
    deleted = {"etc/old": "<whiteout>"} if store.flavor == "overlay" else {"etc/.wh.old": ""}
    assert tree == {"etc": "<dir>", "etc/app.conf": "debug=true\n", **deleted}
    info = store.layer_info(fails)
    assert store.layer_info(info.parent).name == "base"
    # The union snapshot sits on the union's chain: base, then tools.
    union = store.chain(snaps["test_snap.py::test_union_fails"].chain_id)
    assert len(union) == 3
    # tools sits on base only in the union: that position is an alias of the stored tools
    # layer, sharing its tree (same directory, same inodes), not a copy of it.
    tools = store.get_name("tools")
    assert (union[0].chain_id, union[1].parent) == (store.get_name("base"), union[0].chain_id)
    assert union[1].alias_of == tools
    assert union[1].diff_id == store.layer_info(tools).diff_id
    assert store.layer_dir(union[1].chain_id) == store.layer_dir(tools)
    assert sorted(p.name for p in (store.root / "layers" / union[1].chain_id[7:]).iterdir()) == [
        "layer.json"
    ]
    # Bytes held: base, tools, the rw and init layers of the snapshots, nothing twice. Each
    # snapshot also keeps the chain its test saw (image, init layer, rw layer): the rw layer
    # there is an alias, not a copy.
    held = {c for c in store.layers() if store.layer_info(c).alias_of is None}
    assert store.size() == sum(store.layer_info(c).size for c in held)
    with_init = [s.with_init for s in snaps.values()]
    assert None not in with_init  # every test had init files (the conftest's hook)
    assert len(held) == len(store.layers()) - 1 - len(with_init)
    for snap in snaps.values():
        assert snap.with_init is not None
        seen = store.chain(snap.with_init)
        assert seen[-1].alias_of == snap.chain_id
        assert seen[-2].source == "init"
        assert [x.diff_id for x in seen[:-2]] == [
            x.diff_id for x in store.chain(snap.chain_id)[:-1]
        ]
    assert (store.layer_dir(union[2].chain_id) / "bin/tool").read_text() == "patched"
    # The hook saw every snapshot, in order, with its committed layer (parent: the image top).
    assert (pytester.path / "hook.log").read_text().splitlines() == [
        "snapshot:test_snap.py::test_fails base",
        "snapshot:test_snap.py::test_passes_always base",
        "snapshot:test_snap.py::test_union_fails tools",
    ]
    # Passing tests under "failed" leave no scratch behind.
    assert list((pytester.path / ".pytest_cache/layers/scratch/views").iterdir()) == []

    # Snapshots survive into later sessions; layers_keep_count=2 keeps the newest two.
    for _ in range(2):
        pytester.runpytest_subprocess("-k", "test_fails and not never").assert_outcomes(failed=1)
    store = _store(pytester)
    kept = store.snapshots("test_snap.py::test_fails")
    assert [s.n for s in kept] == [2, 3]

    # The CLI reads what the plugin stored: the snapshot's own changes, and the union
    # snapshot exports as an ordinary three-layer OCI image.
    cli = [sys.executable, "-m", "pytest_layers.cli", "--store", str(store.root)]
    proc = subprocess.run(
        [*cli, "diff", "snapshot:test_snap.py::test_fails"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["C /etc", "A /etc/app.conf", "D /etc/old"]
    out = pytester.path / "union-oci"
    proc = subprocess.run(
        [*cli, "export", "snapshot:test_snap.py::test_union_fails", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((out / "blobs/sha256" / manifest_hex).read_text())
    config_hex = manifest["config"]["digest"].split(":")[1]
    config = json.loads((out / "blobs/sha256" / config_hex).read_text())
    assert config["rootfs"]["diff_ids"] == [x.diff_id for x in union]


def test_keep_always_option(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_opt="""
        import pytest
        @pytest.mark.layer("base")
        def test_ok(rootfs):
            (rootfs / "a").write_text("a")
        @pytest.mark.layer("base", keep="never")
        def test_never(rootfs):
            (rootfs / "a").write_text("a")
        """
    )
    result = pytester.runpytest_subprocess("--layers-keep=always")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["SNAPSHOT test_opt.py::test_ok -> *snapshot:test_opt.py::test_ok"])
    assert [s.test for s in _store(pytester).snapshots()] == ["test_opt.py::test_ok"]


BROKEN_CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()

def pytest_layers_snapshot_committed(item, ref, layer):
    if item.name == "test_hook_breaks":
        raise RuntimeError("the hook broke")
"""

BROKEN_TESTS = """
import pytest

@pytest.mark.layer("base")
def test_hook_breaks(rootfs):
    (rootfs / "etc/a").write_text("a")
    assert False, "fails on purpose"

@pytest.mark.layer("base", keep="always")
def test_commit_breaks_on_a_passing_test(rootfs):
    def broken(name=None):
        raise ValueError("the commit broke")
    rootfs.commit = broken  # what the plugin calls to keep the rw layer

@pytest.mark.layer("base")
def test_commit_breaks_on_a_failing_test(rootfs):
    def broken(name=None):
        pytest.fail("fail() inside the commit")
    rootfs.commit = broken
    assert False, "fails on its own"

@pytest.mark.layer("base")
def test_after_them(rootfs):
    assert (rootfs / "etc").is_dir()
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_failure_to_keep_a_snapshot_is_reported_on_the_test(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    pytester.makeconftest(BROKEN_CONFTEST)
    pytester.makepyfile(test_broken=BROKEN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", *workers)
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text, text
    # Each test keeps its own outcome; the session goes on.
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshots -*",
            "SNAPSHOT test_broken.py::test_hook_breaks -> pytest-layers --store * diff "
            "snapshot:test_broken.py::test_hook_breaks",
        ]
    )
    # The failing tests' sections and, for every test, the summary name what went wrong.
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshot -*",
            "kept as snapshot:test_broken.py::test_hook_breaks, but a "
            "pytest_layers_snapshot_committed hook failed: RuntimeError: the hook broke "
            "(at *conftest.py:9)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshot -*",
            "could not keep the rw layer as a snapshot: Failed: fail() inside the commit (at *)",
        ]
    )
    summary = text.split("- layers snapshots -", 1)[1]
    for line in [
        "test_broken.py::test_commit_breaks_on_a_passing_test: could not keep the rw layer as "
        "a snapshot: ValueError: the commit broke (at *test_broken.py:11)",
        "test_broken.py::test_hook_breaks: kept as snapshot:test_broken.py::test_hook_breaks, "
        "but a pytest_layers_snapshot_committed hook failed: RuntimeError: the hook broke*",
        "test_broken.py::test_commit_breaks_on_a_failing_test: could not keep the rw layer as "
        "a snapshot: Failed: fail() inside the commit*",
    ]:
        pytest.LineMatcher(summary.splitlines()).fnmatch_lines([line])
    snapshots = Store(pytester.path / ".pytest_cache" / "layers").snapshots()
    assert [s.test for s in snapshots] == ["test_broken.py::test_hook_breaks"]
