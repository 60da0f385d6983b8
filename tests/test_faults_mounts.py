"""Mounts and views as a trust boundary (docs/reference/options.md, layers_mount_options).

Written as the attacks: an image's setuid-root program and device node grant another user
nothing through a view or a CLI mount; teardown never empties a host directory a test
bind-mounted into its rootfs, nor follows a directory swapped under its walk; a forged mount
record never makes ``umount`` remove anything but its own scratch.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_USER, require, run_as_user
from faults_util import as_owner
from treeutil import build_layer, make_tree

from pytest_layers import _linux, _removal, namespaces
from pytest_layers.backends.base import MountPolicy
from pytest_layers.backends.detect import get_backend
from pytest_layers.store import Store

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BACKENDS = {"overlay": "overlay", "fuse": "fuse", "copy": "root"}


def run_cli(*args: str, store: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest_layers.cli", "--store", os.fspath(store), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def privileged_tree(root: Path) -> Path:
    """A layer tree holding a setuid-root copy of ``id`` and a world-writable device node with
    /dev/null's numbers (harmless if opened, but opening it at all is the attack)."""
    (root / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    shutil.copy2(shutil.which("id") or "/usr/bin/id", root / "bin/id")
    os.chown(root / "bin/id", 0, 0)
    os.chmod(root / "bin/id", 0o4755)
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.stat("/dev/null").st_rdev)
    os.chmod(root / "dev/null", 0o666)
    return root


def user_sees(view: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
    """(the test user's euid running the image's setuid ``id``, the result of opening its
    device node) as that user."""
    euid = run_as_user([str(view / "bin/id"), "-u"])
    assert euid.returncode == 0, euid.stderr
    opened = run_as_user(
        [sys.executable, "-c", f"open({str(view / 'dev/null')!r}, 'w').write('x')"]
    )
    return euid.stdout.strip(), opened


def _unmount_all(path: Path) -> None:
    for point in namespaces.mounts_under(path):
        _linux.umount2(point, _linux.MNT_DETACH)


@pytest.mark.requires_root
@pytest.mark.requires_user
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("policy", ["nosuid,nodev", "suid,dev"])
def test_view_grants_an_image_privileges_only_when_opted_in(
    backend: str, policy: str, user_tmp_path: Path
) -> None:
    require(BACKENDS[backend])  # skips (or fails under PYTEST_LAYERS_REQUIRE) with the reason
    user_uid = str(pwd.getpwnam(TEST_USER).pw_uid)
    layer = privileged_tree(user_tmp_path / "layer")
    scratch = user_tmp_path / "scratch"
    scratch.mkdir()
    view = get_backend(backend, MountPolicy.parse(policy)).open([layer], scratch)
    try:
        euid, opened = user_sees(view.path)
        if policy == "nosuid,nodev":
            assert euid == user_uid  # the setuid bit grants nothing
            assert opened.returncode != 0
            assert "Permission denied" in opened.stderr  # nodev: EACCES on open
        else:  # the control: the same image, opted in, does grant them
            assert euid == "0"
            assert opened.returncode == 0, opened.stderr
    finally:
        view.close()
        _unmount_all(user_tmp_path)
    assert not scratch.exists()


def test_mount_policy_parses_and_refuses_unknown_words() -> None:
    assert str(MountPolicy.parse("")) == "nosuid,nodev"
    assert str(MountPolicy.parse("suid")) == "suid,nodev"
    assert MountPolicy.parse("suid, dev") == MountPolicy(suid=True, dev=True)
    with pytest.raises(ValueError, match="unknown mount option 'exec'"):
        MountPolicy.parse("nosuid,exec")


def test_plugin_refuses_a_bad_mount_options_value(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--layers-mount-options=suid,setgid")
    result.stderr.fnmatch_lines(["*--layers-mount-options: invalid value 'suid,setgid'*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


# ---- the CLI's mount -----------------------------------------------------------------------


@pytest.fixture
def priv_store(tmp_path: Path) -> Iterator[Path]:
    """A store (reachable by the test user) whose ``priv`` image holds privileged content."""
    base = Path("/tmp") / f"pytest-layers-mountsec-{os.getpid()}-{tmp_path.name}"
    base.mkdir(mode=0o755)
    try:
        st = Store(base / "store")
        build_layer(st, None, privileged_tree(base / "tree"), "priv")
        st.close()
        for d in (base / "store", base / "store/layers"):
            os.chmod(d, 0o755)
        yield base
    finally:
        _unmount_all(base)
        namespaces.remove_tree(base)


@pytest.mark.requires_root
@pytest.mark.requires_overlay
@pytest.mark.requires_user
@pytest.mark.parametrize("opt_in", [[], ["--suid", "--dev"]], ids=["default", "opted-in"])
def test_cli_mount_is_nosuid_nodev_unless_opted_in(priv_store: Path, opt_in: list[str]) -> None:
    target = priv_store / "mnt"
    target.mkdir()
    store = priv_store / "store"
    proc = run_cli("mount", "priv", str(target), *opt_in, store=store)
    assert proc.returncode == 0, proc.stderr
    try:
        entry = namespaces.mount_at(target)
        assert entry is not None
        euid, opened = user_sees(target)
        if not opt_in:
            assert "nosuid,nodev" in proc.stdout
            assert {"nosuid", "nodev"} <= entry.options
            assert euid == str(pwd.getpwnam(TEST_USER).pw_uid)
            assert "Permission denied" in opened.stderr
        else:
            assert euid == "0"
            assert opened.returncode == 0, opened.stderr
    finally:
        assert run_cli("umount", str(target), store=store).returncode == 0
    assert namespaces.mount_at(target) is None


@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_forged_mount_record_removes_nothing(priv_store: Path) -> None:
    """A record whose scratch points at the store (``mounts/..``) or whose target is someone
    else's mount: umount refuses, the store and the other mount stay."""
    store = priv_store / "store"
    target = priv_store / "mnt"
    target.mkdir()
    (store / "mounts").mkdir(mode=0o700, exist_ok=True)
    record = store / "mounts" / f"{_key(target)}.json"
    before = sorted(p.name for p in (store / "layers").iterdir())
    # 1. The old record format, aimed at the store itself: the target is not mounted.
    record.write_text(json.dumps({"dir": str(target), "scratch": str(store / "mounts/..")}))
    proc = run_cli("umount", str(target), store=store)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "refusing the mount record" in proc.stderr
    # 2. A well-formed record, but the mount at the target is not the one it names.
    _linux.mount("tmpfs", target, "tmpfs", 0, "size=1m")
    try:
        (target / "canary").write_text("someone else's\n")
        record.write_text(json.dumps({"dir": str(target), "mnt_id": 1, "fstype": "overlay"}))
        proc = run_cli("umount", str(target), store=store)
        assert proc.returncode == 1
        assert "not by the mount" in proc.stderr
        assert proc.stderr.count("\n") == 1
        assert (target / "canary").read_text() == "someone else's\n"
        # 3. Another user's record (or a symlink to one) is refused outright.
        os.chown(record, 65534, 65534)
        assert "refusing" in run_cli("umount", str(target), store=store).stderr
        record.unlink()
        record.symlink_to(store / "VERSION")
        assert "refusing" in run_cli("umount", str(target), store=store).stderr
    finally:
        _linux.umount2(target, _linux.MNT_DETACH)
    assert sorted(p.name for p in (store / "layers").iterdir()) == before
    assert (store / "VERSION").is_file()
    assert run_cli("verify", store=store).returncode == 0


def _key(target: Path) -> str:
    import hashlib

    return hashlib.sha256(os.fsencode(os.path.realpath(target))).hexdigest()[:16]


@pytest.fixture
def unnamed_store(tmp_path: Path) -> tuple[Path, str]:
    """A store holding one layer that nothing but a lease or pin keeps from ``prune``."""
    st = Store(tmp_path / "store")
    cid = build_layer(st, None, make_tree(tmp_path / "tree", {"etc/x": "kept\n"}), None)
    st.close()
    return st.root, cid


@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_prune_leaves_a_mounted_image_until_umount(
    unnamed_store: tuple[Path, str], tmp_path: Path
) -> None:
    store, cid = unnamed_store
    target = tmp_path / "mnt"
    target.mkdir()
    assert run_cli("mount", cid, str(target), store=store).returncode == 0
    try:
        prune = run_cli("prune", store=store)
        assert prune.returncode == 0, prune.stderr
        assert (target / "etc/x").read_text() == "kept\n"
        assert Store(store).has_layer(cid)
    finally:
        assert run_cli("umount", str(target), store=store).returncode == 0
    assert "removed 1 layer(s)" in run_cli("prune", store=store).stdout
    assert not Store(store).has_layer(cid)


@pytest.mark.requires_overlay
def test_prune_leaves_the_image_of_a_live_shell(unnamed_store: tuple[Path, str]) -> None:
    store, cid = unnamed_store
    cmd = [sys.executable, "-m", "pytest_layers.cli", "--store", os.fspath(store)]
    # `cat` (the host's, bound in) waits on stdin: the shell lives until we close it.
    shell = subprocess.Popen(
        [*cmd, "shell", "--host-tools", cid, "--", "sh", "-c", "echo ready; cat; cat /etc/x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout is not None
        assert shell.stdout.readline() == "ready\n"
        assert run_cli("prune", store=store).returncode == 0
        assert Store(store).has_layer(cid)
        out, err = shell.communicate("", timeout=60)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
    assert shell.returncode == 0, err
    assert out == "kept\n"
    assert "removed 1 layer(s)" in run_cli("prune", store=store).stdout


# ---- teardown never crosses a mount --------------------------------------------------------


@pytest.mark.requires_root
def test_remove_tree_detaches_a_bind_mount_instead_of_emptying_it(tmp_path: Path) -> None:
    canary = make_tree(tmp_path / "host", {"secret": "host data\n", "sub/deep": "deep\n"})
    tree = make_tree(tmp_path / "tree", {"a/file": "x\n", "a/mnt": None, "b": None})
    _linux.mount(canary, tree / "a/mnt", None, _linux.MS_BIND)
    # A second, nested bind, and one whose detach the walk must survive (bind over a file).
    _linux.mount(canary / "sub", tree / "b", None, _linux.MS_BIND)
    try:
        namespaces.remove_tree(tree)
    finally:
        _unmount_all(tmp_path)
    assert not tree.exists()
    assert (canary / "secret").read_text() == "host data\n"
    assert (canary / "sub/deep").read_text() == "deep\n"


@pytest.mark.requires_root
def test_removal_without_the_mount_table_still_detaches_a_bind_mount_it_meets(
    tmp_path: Path,
) -> None:
    """remove_tree_seen_unmounted (a fuse view's scratch, its mount seen gone) skips reading the
    mount table, but a mount in the tree after all is never entered and then detached: the
    tree goes, the mount's source is untouched."""
    canary = make_tree(tmp_path / "host", {"secret": "host data\n"})
    tree = make_tree(tmp_path / "tree", {"u/file": "x\n", "u/mnt": None, "log": "log\n"})
    _linux.mount(canary, tree / "u/mnt", None, _linux.MS_BIND)
    try:
        _removal.remove_tree_seen_unmounted(tree)
    finally:
        _unmount_all(tmp_path)
    assert not tree.exists()
    assert (canary / "secret").read_text() == "host data\n"
    plain = make_tree(tmp_path / "plain", {"a/b/c": "x\n", "d": None})
    _removal.remove_tree_seen_unmounted(plain)
    assert not plain.exists()
    _removal.remove_tree_seen_unmounted(plain)  # gone already: nothing to do


@pytest.mark.requires_root
def test_removal_without_the_mount_table_detaches_a_mount_on_the_tree_itself(
    tmp_path: Path,
) -> None:
    """A mount on the path itself (not inside it) is detached, never emptied through."""
    canary = make_tree(tmp_path / "host", {"secret": "host data\n"})
    tree = make_tree(tmp_path / "tree", {})
    _linux.mount(canary, tree, None, _linux.MS_BIND)
    try:
        _removal.remove_tree_seen_unmounted(tree)
    finally:
        _unmount_all(tmp_path)
    assert (canary / "secret").read_text() == "host data\n"
    assert not tree.exists()


@pytest.mark.requires_root
@pytest.mark.requires_userns
@pytest.mark.parametrize("remove", ["remove_tree", "remove_tree_seen_unmounted"])
def test_removal_leaves_a_mount_on_the_tree_it_cannot_detach(tmp_path: Path, remove: str) -> None:
    """A mount on the path itself that cannot be detached (here one locked into a user
    namespace's copy of the mounts) is not the tree's: its content is never removed."""
    canary = make_tree(tmp_path / "host", {"secret": "host data\n", "sub/deep": "deep\n"})
    tree = make_tree(tmp_path / "tree", {})
    repo = Path(__file__).resolve().parents[1]
    script = (
        f"import sys; sys.path.insert(0, {os.fspath(repo)!r}); from pathlib import Path; "
        f"from pytest_layers import _removal; _removal.{remove}(Path({os.fspath(tree)!r}))"
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" "$2" && exec unshare -Urm "$3" -c "$4"', "sh",
         canary, tree, sys.executable, script],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (canary / "secret").read_text() == "host data\n"
    assert (canary / "sub/deep").read_text() == "deep\n"


def test_fs_magic_names_the_filesystem_kind(tmp_path: Path) -> None:
    assert _linux.fs_magic("/proc") == 0x9FA0  # PROC_SUPER_MAGIC
    with pytest.raises(FileNotFoundError):
        _linux.fs_magic(tmp_path / "missing")


def test_mount_id_tells_a_bind_mount_from_its_parent(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _linux.mount_id("d", fd) == _linux.mount_id("", fd) == _linux.mount_id(tmp_path)
    finally:
        os.close(fd)
    assert _linux.mount_id("/proc") != _linux.mount_id("/")


@pytest.mark.parametrize("depth", [1, 40], ids=["fds-kept", "climbs-dotdot"])
def test_remove_tree_never_follows_a_directory_moved_under_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """The walk is inside ``victim/a/...`` when ``a`` is renamed out to ``outside/`` and a
    symlink to ``outside`` is put in its place. A walk that climbs by ``..`` would climb into
    ``outside`` and go on removing ``z`` (still pending in ``victim``) there."""
    victim = make_tree(tmp_path / "victim", {"z/own": "removed\n"})
    deep = victim / "a"
    for _ in range(depth):
        deep = deep / "d"
    deep.mkdir(parents=True)
    outside = make_tree(tmp_path / "outside", {"z/canary": "kept\n"})
    monkeypatch.setattr(_removal, "_KEEP_OPEN", 4)
    moved: list[str] = []

    def swap(rel: str) -> None:
        if rel.count("/") == depth and not moved:
            os.rename(victim / "a", outside / "a")
            os.symlink(outside, victim / "a")
            moved.append(rel)

    monkeypatch.setattr(_removal, "_walk_hook", swap)
    namespaces.remove_tree(victim)
    assert moved, "the hook never fired: the walk did not reach the bottom"
    assert (outside / "z/canary").read_text() == "kept\n"
    assert not (victim / "z/own").exists() or depth > 4  # a stopped walk may leave some


def test_remove_tree_racing_a_swapping_thread_never_reaches_outside(tmp_path: Path) -> None:
    """The same attack without a hook: a thread keeps moving the tree's subdirectory out and
    putting a symlink to ``outside`` in its place while the walk runs (a bounded number of
    rounds); whatever the interleaving, nothing outside is removed."""
    import threading

    outside = make_tree(tmp_path / "outside", {f"m{i}/canary": "kept\n" for i in range(8)})
    for round_ in range(20):
        victim = make_tree(
            tmp_path / f"victim{round_}",
            {**{f"a/{'d/' * 30}x": "x\n"}, **{f"m{i}/own": "gone\n" for i in range(8)}},
        )
        stop = threading.Event()

        def swap(victim: Path = victim, round_: int = round_, stop: threading.Event = stop) -> None:
            for k in range(200):
                if stop.is_set():
                    return
                with contextlib.suppress(OSError):
                    os.rename(victim / "a", outside / f"moved-{round_}-{k}")
                    os.symlink(outside, victim / "a")

        thread = threading.Thread(target=swap)
        thread.start()
        try:
            namespaces.remove_tree(victim)
        finally:
            stop.set()
            thread.join()
        for i in range(8):
            assert (outside / f"m{i}/canary").read_text() == "kept\n"


COPY_ATTACK = """
import os, pytest
from pytest_layers import _linux

@pytest.mark.layer("base")
def test_installer_leaves_a_bind_mount(rootfs):
    (rootfs / "mnt").mkdir()
    _linux.mount({canary!r}, os.fspath(rootfs / "mnt"), None, _linux.MS_BIND)
    (rootfs / "etc/written").write_text("by the test\\n")
    assert False, "fails, so its rw layer is committed"
"""


@pytest.mark.requires_root
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_teardown_and_snapshot_never_reach_a_bind_mounted_host_dir(
    pytester: pytest.Pytester, tmp_path: Path, backend: str
) -> None:
    from plugin_util import BASE_CONFTEST

    require(BACKENDS[backend])  # skips (or fails under PYTEST_LAYERS_REQUIRE) with the reason

    canary = make_tree(tmp_path / "canary", {"secret": "host data\n", "sub/deep": "deep\n"})
    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(COPY_ATTACK.format(canary=os.fspath(canary)))
    store = pytester.path / "store"
    result = pytester.runpytest_subprocess(f"--layers-backend={backend}", f"--layers-store={store}")
    result.assert_outcomes(failed=1)
    assert (canary / "secret").read_text() == "host data\n"
    assert (canary / "sub/deep").read_text() == "deep\n"
    # The snapshot holds the test's own write and no host content.
    diff = run_cli(
        "diff",
        "snapshot:test_teardown_and_snapshot_never_reach_a_bind_mounted_host_dir.py"
        "::test_installer_leaves_a_bind_mount",
        store=store,
    )
    assert diff.returncode == 0, diff.stderr
    assert "A /etc/written" in diff.stdout.splitlines()
    assert "secret" not in diff.stdout
    assert "deep" not in diff.stdout
    with open("/proc/self/mountinfo") as f:
        assert os.fspath(pytester.path) not in f.read()


# ---- inspect says what privileged content an image holds --------------------------------------


@pytest.mark.requires_root
def test_inspect_reports_privileged_content(tmp_path: Path) -> None:
    tree = privileged_tree(tmp_path / "tree")
    (tree / "bin/ping").write_bytes(b"\x7fELF")
    # VFS_CAP_REVISION_2, cap_net_raw (13) permitted and effective.
    caps = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    os.setxattr(tree / "bin/ping", "security.capability", caps)
    (tree / "bin/wall").write_bytes(b"\x7fELF")
    os.chmod(tree / "bin/wall", 0o2755)
    (tree / "etc").mkdir()
    (tree / "etc/open").write_text("anyone writes\n")
    os.chmod(tree / "etc/open", 0o666)
    (tree / "tmp").mkdir()
    os.chmod(tree / "tmp", 0o1777)  # sticky: as /tmp is, not reported
    st = Store(tmp_path / "store")
    base = build_layer(st, None, make_tree(tmp_path / "plain", {"etc/x": "x\n"}), "plain")
    build_layer(st, base, tree, "priv")
    st.close()

    proc = run_cli("inspect", "priv", store=st.root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["Privileged"] == {
        "Setuid": ["/bin/id"],
        "Setgid": ["/bin/wall"],
        "Capabilities": ["/bin/ping"],
        "Devices": ["/dev/null c 1:3"],
        "WorldWritable": ["/etc/open"],
    }
    assert proc.stderr.splitlines() == [
        "pytest-layers: warning: priv holds privileged content (1 setuid, 1 setgid, "
        '1 file-capability, 1 device, 1 world-writable; see "Privileged"); views and mounts of it '
        "are nosuid,nodev unless you opt out"
    ]
    clean = run_cli("inspect", "plain", store=st.root)
    assert clean.stderr == ""
    assert not any(json.loads(clean.stdout)[0]["Privileged"].values())


# ---- an ordinary user's test that locks itself out keeps its snapshot ---------------------------

LOCKOUT_TESTS = """
import os, pytest

@pytest.mark.layer("base")
def test_locks_itself_out(rootfs):
    (rootfs / "etc/os-release").write_text("ID=changed\\n")
    (rootfs / "locked").mkdir()
    (rootfs / "locked/inside").write_text("kept\\n")
    os.chmod(rootfs / "locked", 0)
    os.chmod(rootfs / "etc", 0)
    assert False, "fails, so its rw layer is committed"
"""


def _run_unprivileged(
    path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """pytest in ``path`` as an ordinary user: the test user when we are root, else us; with
    ``env`` added to its environment."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *args]
    extra = env or {}
    if os.geteuid() == 0:
        return run_as_user(cmd, cwd=path, env={"PYTHONDONTWRITEBYTECODE": "1", **extra})
    if _linux.has_effective_cap(_linux.CAP_DAC_READ_SEARCH):
        # Inside this suite's own user namespace, whose capabilities children inherit as
        # ambient: drop them, or the child reads through mode 000 as root would.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop inherited capabilities")
        cmd = [setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--", *cmd]
    return subprocess.run(
        cmd, cwd=path, capture_output=True, text=True, timeout=300, env={**os.environ, **extra}
    )


@contextlib.contextmanager
def _user_project(tmp_path: Path, name: str, tests: str) -> Iterator[Path]:
    """A project dir with the base conftest and ``tests`` as ``test_<name>.py``, that the
    ordinary user running it (the test user when we are root) owns; removed on exit."""
    from plugin_util import BASE_CONFTEST

    if os.geteuid() == 0:
        require("user")
        path = Path("/tmp") / f"pytest-layers-{name}-{os.getpid()}-{tmp_path.name}"
        path.mkdir(mode=0o755)
        entry = pwd.getpwnam(TEST_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    else:
        path = tmp_path
    try:
        (path / "conftest.py").write_text(BASE_CONFTEST)
        (path / f"test_{name}.py").write_text(tests)
        for p in path.iterdir():
            os.chmod(p, 0o644)
        yield path
    finally:
        if os.geteuid() == 0:
            namespaces.remove_tree(path)


def test_copy_snapshot_of_a_test_that_made_dirs_unreadable(tmp_path: Path) -> None:
    with _user_project(tmp_path, "lockout", LOCKOUT_TESTS) as path:
        store = path / "store"
        proc = _run_unprivileged(path, "--layers-backend=copy", f"--layers-store={store}")
        assert "1 failed" in proc.stdout, proc.stdout + proc.stderr
        assert "snapshot:test_lockout.py::test_locks_itself_out" in proc.stdout, proc.stdout
        # A store is its owner's alone: look into it as the owner.
        check = (
            "import json, os, stat, sys\n"
            "from pytest_layers.store import Store\n"
            "st = Store(sys.argv[1])\n"
            "layer = st.layer_dir(st.snapshots()[0].chain_id)\n"
            "mode = lambda p: stat.S_IMODE(os.lstat(layer / p).st_mode)\n"
            "print(json.dumps({'etc': mode('etc'), 'locked': mode('locked'),\n"
            "    'inside': (layer / 'locked/inside').read_text(),\n"
            "    'os': (layer / 'etc/os-release').read_text(),\n"
            "    'problems': [str(p) for p in st.verify()]}))\n"
        )
        seen = subprocess.run(
            [*as_owner(store), sys.executable, "-c", check, str(store)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        # The layer keeps the content under them, with the owner's access put back (a store
        # must read its own layers).
        assert json.loads(seen.stdout) == {
            "etc": 0o700,
            "locked": 0o700,
            "inside": "kept\n",
            "os": "ID=changed\n",
            "problems": [],
        }
        # Teardown coped too: nothing of the view is left.
        assert list((store / "scratch" / "views").iterdir()) == []


SWAPPED_LOCKOUT_TESTS = """
import os, pytest
from pytest_layers import store as store_mod

VICTIM = os.environ["LAYERS_VICTIM"]

@pytest.mark.layer("base")
def test_opened_up_dir_swapped_during_commit(rootfs, monkeypatch):
    (rootfs / "locked").mkdir()
    os.chmod(rootfs / "locked", 0o077)  # the owner may not list it: the commit opens it up
    real = store_mod.Store.write_layer

    def swap_then_write(self, *a, **kw):
        # A process left running in the rootfs: the directory opened up becomes a symlink
        # to a file of the user's outside the rootfs while the commit reads.
        os.rename(rootfs / "locked", rootfs / "locked.moved")
        os.symlink(VICTIM, rootfs / "locked")
        return real(self, *a, **kw)

    monkeypatch.setattr(store_mod.Store, "write_layer", swap_then_write)
    rootfs.commit("swapped")
"""


def test_modes_restored_after_a_commit_never_follow_a_swapped_in_symlink(tmp_path: Path) -> None:
    """A directory an ordinary user's commit opened up gets its mode back after the commit
    only if it is still that directory: a symlink put in its place meanwhile (to a file of the
    user's) is not followed, so that file keeps its mode."""
    with _user_project(tmp_path, "swapout", SWAPPED_LOCKOUT_TESTS) as path:
        victim = path / "victim"
        victim.write_text("the user's own\n")
        os.chmod(victim, 0o600)
        owner = os.stat(path)  # the user the session runs as
        os.chown(victim, owner.st_uid, owner.st_gid)
        proc = _run_unprivileged(
            path,
            "--layers-backend=copy",
            f"--layers-store={path / 'store'}",
            env={"LAYERS_VICTIM": str(victim)},
        )
        assert stat.S_IMODE(os.lstat(victim).st_mode) == 0o600, proc.stdout + proc.stderr
        assert "1 passed" in proc.stdout, proc.stdout + proc.stderr


FLAGS_TESTS = """
import os
from pathlib import Path

import pytest
from pytest_layers import namespaces

@pytest.mark.layer("base")
def test_flags(rootfs):
    entry = namespaces.mount_at(Path(os.path.realpath(rootfs.path)))
    assert sorted(entry.options & {{"nosuid", "nodev"}}) == {expected!r}
"""


@pytest.mark.requires_overlay
@pytest.mark.parametrize(
    ("args", "expected"),
    [((), ["nodev", "nosuid"]), (("--layers-mount-options=suid,dev",), [])],
    ids=["default", "opted-in"],
)
def test_plugin_views_follow_layers_mount_options(
    pytester: pytest.Pytester, args: tuple[str, ...], expected: list[str]
) -> None:
    from plugin_util import BASE_CONFTEST

    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(FLAGS_TESTS.format(expected=expected))
    result = pytester.runpytest_subprocess("--layers-backend=overlay", *args)
    result.assert_outcomes(passed=1)
