"""The ``pytest-layers`` command, run as a subprocess (its mounts live in its own namespace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from treeutil import build_layer, busybox_tree, make_tree

from pytest_layers import _linux, cli, layertar
from pytest_layers.store import Store

VERBS = [
    *("ls", "inspect", "diff", "mount", "umount", "shell", "run", "export", "import", "verify"),
    "prune",
]


def run(
    *args: str, store: Path | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest_layers.cli"]
    if store is not None:
        cmd += ["--store", os.fspath(store)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store holding ``base`` (etc/x, bin/) and ``app`` (changes etc/x, adds etc/app.conf)."""
    st = Store(tmp_path / "store")
    tree = make_tree(tmp_path / "tree", {"etc/x": "from base\n", "etc/gone": "g\n", "srv": None})
    base = build_layer(st, None, tree, "base")
    (tree / "etc/x").write_text("from app\n")
    (tree / "etc/gone").unlink()
    (tree / "etc/app.conf").write_text("debug=false\n")
    build_layer(st, base, tree, "app")
    return st.root


def layer_digests(store: Path) -> dict[str, str]:
    """The diff_id of every stored layer tree, read from the files (not through ``Store``, which
    refuses, rightly, a store that belongs to another user)."""
    flavor = json.loads((store / "VERSION").read_text())["flavor"]
    return {
        d.parent.name: layertar.layer_diff_id(d, flavor=flavor)
        for d in sorted((store / "layers").glob("*/diff"))
    }


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str) -> None:
    proc = run(verb, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pytest-layers")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run().returncode == 2
    assert run("frobnicate").returncode == 2
    proc = run("export", "app", store=tmp_path)  # -o is required
    assert proc.returncode == 2
    assert "-o/--output" in proc.stderr


def test_failures_are_one_line_without_traceback(store: Path, tmp_path: Path) -> None:
    proc = run("inspect", "nope", store=store)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("pytest-layers: error: unknown layer 'nope'; known layers: app")
    proc = run("ls", store=tmp_path / "missing")
    assert proc.returncode == 1
    assert "no layer store at" in proc.stderr
    assert "--store PATH" in proc.stderr


def test_ls_inspect_diff(store: Path) -> None:
    proc = run("ls", store=store)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["REF", "CHAIN", "ID", "LAYERS", "DISK", "USE", "CREATED", "SOURCE"]
    assert [line.split()[0] for line in lines[1:]] == ["app", "base"]
    assert run("ls", "-q", store=store).stdout.split() == ["app", "base"]

    info = json.loads(run("inspect", "app", store=store).stdout)[0]
    st = Store(store)
    chain = st.chain(st.resolve("app"))
    assert info["RootFS"] == {"Type": "layers", "Layers": [i.diff_id for i in chain]}
    assert info["ChainIDs"] == [i.chain_id for i in chain]
    assert info["ChainIDs"][-1] == layertar.chain_id(info["RootFS"]["Layers"])
    assert info["Names"] == ["app"]
    assert info["Source"] == "build"
    assert info["Size"] == sum(i.size for i in chain)
    # A unique hex prefix is a ref too.
    assert json.loads(run("inspect", chain[0].chain_id[7:19], store=store).stdout)[0]["Names"] == [
        "base"
    ]

    proc = run("diff", "app", store=store)
    assert proc.stdout.splitlines() == [
        "C /etc",
        "A /etc/app.conf",
        "D /etc/gone",
        "C /etc/x",
    ]


def test_verify_and_prune(store: Path) -> None:
    proc = run("verify", store=store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert run("verify", "app", store=store).stdout.strip() == "ok (2 layers)"
    victim = Store(store).layer_dir(Store(store).resolve("base")) / "etc/x"
    os.chmod(victim, 0o644)
    victim.write_text("tampered\n")
    proc = run("verify", store=store)
    assert proc.returncode == 1
    assert "/etc/x" in proc.stdout
    proc = run("prune", store=store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("removed ")


def test_export_then_import_via_cli(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "app.tar"
    proc = run("export", "app", "-o", str(out), "--gzip", store=store)
    assert proc.returncode == 0, proc.stderr
    assert "layer 2/2" in proc.stderr
    proc = run("export", "app", "-o", str(out), store=store)
    assert proc.returncode == 1
    assert "already exists" in proc.stderr
    other = tmp_path / "other"
    proc = run("import", str(out), "--name", "again", store=other)
    assert proc.returncode == 0, proc.stderr
    assert Store(other).resolve("again") == Store(store).resolve("app")


def test_default_store_is_under_the_pytest_rootdir(tmp_path: Path) -> None:
    (tmp_path / "proj/sub/deeper").mkdir(parents=True)
    (tmp_path / "proj/tox.ini").write_text("[pytest]\n")
    found = cli.default_store_path(tmp_path / "proj/sub/deeper")
    assert found == (tmp_path / "proj/.pytest_cache/layers").resolve()
    lone = tmp_path / "lone"
    lone.mkdir()
    assert cli.default_store_path(lone) == lone.resolve() / ".pytest_cache/layers"
    proc = run("ls", cwd=tmp_path / "proj/sub/deeper")
    assert str(tmp_path / "proj/.pytest_cache/layers") in proc.stderr


def _busybox_store(root: Path) -> Path:
    st = Store(root / "store")
    tree = busybox_tree(root / "tree", {"etc/x": "from image\n"})
    build_layer(st, None, tree, "bb")
    return st.root


@pytest.mark.requires_overlay
@pytest.mark.requires_tool("busybox")
# "self" is whoever runs the suite (root, or the test user in CI's second pass); "user" is root
# switching to the test user.
@pytest.mark.parametrize("who", ["self", "user"])
def test_shell_runs_the_image_shell_and_discards_writes(
    tmp_path: Path, who: str, request: pytest.FixtureRequest
) -> None:
    command = [sys.executable, "-m", "pytest_layers.cli"]
    if who == "user":
        from conftest import TEST_USER

        base = request.getfixturevalue("user_tmp_path")
        store = _busybox_store(base)
        subprocess.run(["chown", "-R", f"{TEST_USER}:", os.fspath(base)], check=True)
        pythonpath = f"PYTHONPATH={Path(cli.__file__).parent.parent}"
        command = ["runuser", "-u", TEST_USER, "--", "env", pythonpath, *command]
    else:
        store = _busybox_store(tmp_path)

    def shell(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "--store", str(store), "shell", "bb", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    before = layer_digests(store)
    proc = shell("--", "/bin/sh", "-c", "echo hi; exit 3")
    assert (proc.returncode, proc.stdout) == (3, "hi\n"), proc.stderr
    proc = shell("--", "sh", "-c", "echo changed > /etc/x; rm /bin/cat; id -u")
    assert (proc.returncode, proc.stdout) == (0, "0\n"), proc.stderr
    proc = shell("--", "cat", "/etc/x")
    assert (proc.returncode, proc.stdout) == (0, "from image\n"), proc.stderr
    # Without a command: the image's own /bin/sh, here reading its commands from stdin.
    proc = shell(stdin="echo $PYTEST_LAYERS_REF; readlink /proc/self/exe; exit 5\n")
    assert (proc.returncode, proc.stdout) == (5, "bb\n/bin/busybox\n"), proc.stderr
    assert layer_digests(store) == before
    assert list((store / "tmp").iterdir()) == []


@pytest.mark.requires_overlay
def test_shell_without_a_shell_in_the_image(store: Path) -> None:
    # The image has no programs: a one-line error, never a host shell outside the sandbox.
    proc = run("shell", "app", store=store)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "pytest-layers: error: app has no /bin/sh; name a program of the image after `--` "
        "(`pytest-layers shell app -- /path/in/image`), or pass --host-tools to bind the "
        "host's /usr, /bin, /lib read-only into it"
    ]
    proc = run("shell", "app", "--", "cat", "/etc/x", store=store)
    assert proc.returncode == 1
    assert proc.stderr == (
        "pytest-layers: error: cat: not found in the image "
        "(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)\n"
    )
    assert list((store / "tmp").iterdir()) == []


@pytest.mark.requires_overlay
def test_shell_with_host_tools_binds_them_read_only(store: Path) -> None:
    proc = run(
        "shell", "--host-tools", "app", "--", "sh", "-c", "cat /etc/x; touch /usr/x", store=store
    )
    assert proc.returncode == 1
    assert proc.stdout == "from app\n"
    assert "Read-only file system" in proc.stderr
    assert "(--host-tools)" in proc.stderr
    assert not Path("/usr/x").exists()


@pytest.mark.requires_root
@pytest.mark.requires_overlay
@pytest.mark.parametrize("rw", [False, True], ids=["readonly", "rw"])
def test_mount_and_umount(store: Path, tmp_path: Path, rw: bool) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    before = layer_digests(store)
    try:
        proc = run("mount", "app", str(target), *(["--rw"] if rw else []), store=store)
        assert proc.returncode == 0, proc.stderr
        assert (target / "etc/x").read_text() == "from app\n"
        assert not (target / "etc/gone").exists()
        if rw:
            (target / "etc/x").write_text("written\n")
            assert (target / "etc/x").read_text() == "written\n"
        else:
            with pytest.raises(OSError, match="Read-only file system"):
                (target / "etc/x").write_text("written\n")
        again = run("mount", "app", str(target), store=store)
        assert again.returncode == 1
        assert "already a mount point" in again.stderr
        proc = run("umount", str(target), store=store)
        assert proc.returncode == 0, proc.stderr
        assert list(target.iterdir()) == []
    finally:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == str(target) for line in f):
                _linux.umount2(target, _linux.MNT_DETACH)
    assert layer_digests(store) == before
    assert list((store / "mounts").iterdir()) == []
    assert run("umount", str(target), store=store).returncode == 1


@pytest.mark.requires_user
def test_mount_as_ordinary_user_points_to_shell(user_tmp_path: Path) -> None:
    from conftest import run_as_user

    Store(user_tmp_path / "store")
    (user_tmp_path / "mnt").mkdir()
    proc = run_as_user(
        [
            sys.executable,
            "-m",
            "pytest_layers.cli",
            "--store",
            str(user_tmp_path / "store"),
            "mount",
            "x",
            str(user_tmp_path / "mnt"),
        ],
        cwd=user_tmp_path,
        env={"PYTHONPATH": str(Path(cli.__file__).parent.parent)},
    )
    assert proc.returncode == 1
    assert "mount needs root" in proc.stderr
    assert "pytest-layers shell x" in proc.stderr


@pytest.mark.requires_tool("busybox")
def test_run_passes_exit_codes_env_and_network(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        require("userns")
    store = _busybox_store(tmp_path)
    before = layer_digests(store)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest_layers.cli", "--store", str(store), "run", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    proc = run("bb", "--", "sh", "-c", "cat /etc/x; exit 7")
    assert (proc.returncode, proc.stdout) == (7, "from image\n"), proc.stderr
    # Read-only unless --rw; with --rw the write works and is thrown away.
    proc = run("bb", "--", "sh", "-c", "echo y > /etc/x")
    assert proc.returncode != 0
    assert "Read-only" in proc.stderr
    proc = run("--rw", "--env", "K=v w", "bb", "--", "sh", "-c", "echo $K > /etc/x; cat /etc/x")
    assert (proc.returncode, proc.stdout) == (0, "v w\n"), proc.stderr
    proc = run("bb", "--", "sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert proc.stdout.split() == ["lo"]
    proc = run("--network", "host", "bb", "--", "sh", "-c", "tail -n +3 /proc/net/dev | wc -l")
    assert int(proc.stdout) == len(Path("/proc/net/dev").read_text().splitlines()) - 2
    proc = run("bb")
    assert proc.returncode == 1
    assert "name the program to run" in proc.stderr
    proc = run("--env", "novalue", "bb", "--", "true")
    assert proc.returncode == 1
    assert "KEY=VALUE" in proc.stderr
    assert layer_digests(store) == before
