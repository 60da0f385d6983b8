"""Mount namespaces: private (root), user namespace (ordinary user), host-mode sweeping.

Every test that mounts does so in a child process; a child that enters a private namespace
takes its mounts with it whatever happens, and the host-mode tests unmount in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_as_user

from pytest_layers import _linux, namespaces
from pytest_layers.errors import BackendUnavailableError


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def _fresh_env() -> dict[str, str]:
    """The environment minus the namespace marker: the plugin may have entered a namespace
    for this pytest process, and the children here must enter their own."""
    return {k: v for k, v in os.environ.items() if k != namespaces.ENV_VAR}


def _mount_points_under(root: Path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    prefix = os.path.realpath(root)
    with open(mountinfo) as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _spawn_holder(body: str) -> subprocess.Popen[str]:
    """Start a child that runs ``body``, prints "ready" and then sleeps until killed."""
    code = textwrap.dedent(body) + "\nprint('ready', flush=True)\nimport time\ntime.sleep(300)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_fresh_env()
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        _kill(proc)
        pytest.fail(f"holder did not get ready: {line!r}")
    return proc


_OVERLAY_AT = """
from pathlib import Path
from pytest_layers.backends.overlay import OverlayBackend
lower = Path({lower!r})
scratch = Path({scratch!r})
scratch.mkdir(parents=True)
view = OverlayBackend().open([lower], scratch)
assert (view.path / "f").read_text() == "lower"
"""


def _make_lower(tmp_path: Path) -> Path:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("lower")
    return lower


# ---- pure functions -------------------------------------------------------------------------


def test_session_dir_name_round_trips() -> None:
    name = namespaces.session_dir_name()
    pid, start = namespaces.parse_session_dir_name(name) or (0, None)
    assert pid == os.getpid()
    assert start is not None
    assert start > 0
    assert namespaces.parse_session_dir_name("123") == (123, None)
    assert namespaces.parse_session_dir_name("views") is None
    assert namespaces.parse_session_dir_name("12-x") is None


def test_stale_environment_variable_is_not_our_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(namespaces.ENV_VAR, "private:mnt:[1]")
    assert namespaces.inside_our_namespace() is None
    monkeypatch.setenv(namespaces.ENV_VAR, f"userns:{namespaces.current_namespace()}")
    assert namespaces.inside_our_namespace() == namespaces.NamespaceInfo(
        "userns", namespaces.current_namespace()
    )


@pytest.mark.parametrize(
    ("sysctl", "value", "expected"),
    [
        ("_SYSCTL_MAX_USERNS", "0", "user.max_user_namespaces = 0"),
        ("_SYSCTL_DEBIAN_USERNS", "0", "kernel.unprivileged_userns_clone = 0"),
        ("_SYSCTL_APPARMOR_USERNS", "1", "apparmor_restrict_unprivileged_userns = 1"),
    ],
)
def test_disabled_user_namespaces_are_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sysctl: str, value: str, expected: str
) -> None:
    for name in ("_SYSCTL_MAX_USERNS", "_SYSCTL_DEBIAN_USERNS", "_SYSCTL_APPARMOR_USERNS"):
        monkeypatch.setattr(namespaces, name, tmp_path / "missing")
    fake = tmp_path / "sysctl"
    fake.write_text(value + "\n")
    monkeypatch.setattr(namespaces, sysctl, fake)
    monkeypatch.delenv(namespaces.ENV_VAR, raising=False)
    reason = namespaces.userns_disabled_reason()
    assert reason is not None
    assert expected in reason
    assert "sysctl -w" in reason
    with pytest.raises(BackendUnavailableError, match="sysctl -w"):
        namespaces.enter_user_namespace()
    fake.write_text("15000\n" if value == "0" else "0\n")
    assert namespaces.userns_disabled_reason() is None


# ---- root: private mount namespace ------------------------------------------------------------


@pytest.mark.requires_root
def test_user_namespaces_disabled_for_real() -> None:
    # In a user namespace of our own we are allowed to set its limit to 0: then creating a
    # nested one is exactly what a machine with user namespaces disabled refuses.
    proc = subprocess.run(
        _script(
            """
            from pytest_layers import _linux, namespaces
            from pytest_layers.errors import BackendUnavailableError
            _linux.unshare(_linux.CLONE_NEWUSER)
            for f, v in (("uid_map", "0 0 1"), ("setgroups", "deny"), ("gid_map", "0 0 1")):
                open(f"/proc/self/{f}", "w").write(v)
            open("/proc/sys/user/max_user_namespaces", "w").write("0")
            try:
                namespaces.enter_user_namespace()
            except BackendUnavailableError as exc:
                print(exc)
            """
        ),
        capture_output=True,
        text=True,
        check=True,
        env=_fresh_env(),
    )
    assert "user namespaces are disabled (user.max_user_namespaces = 0)" in proc.stdout
    assert "sysctl -w user.max_user_namespaces=" in proc.stdout


@pytest.mark.requires_root
def test_threads_already_running_are_refused() -> None:
    proc = subprocess.run(
        _script(
            """
            import threading, time
            from pytest_layers import namespaces
            from pytest_layers.errors import BackendUnavailableError
            threading.Thread(target=time.sleep, args=(5,), name="early-bird", daemon=True).start()
            for enter in (namespaces.enter_private_mount_namespace,
                          namespaces.enter_user_namespace):
                try:
                    enter()
                except BackendUnavailableError as exc:
                    print(exc)
            """
        ),
        capture_output=True,
        text=True,
        check=True,
        env=_fresh_env(),
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr
    assert "private mount namespace because 1 other thread(s) already run (early-bird)" in lines[0]
    assert "user namespace because 1 other thread(s) already run (early-bird)" in lines[1]
    assert all("before starting threads" in line for line in lines)


@pytest.mark.requires_root
def test_private_namespace_hides_mounts_and_children_inherit_it(tmp_path: Path) -> None:
    point = tmp_path / "point"
    point.mkdir()
    proc = subprocess.run(
        _script(
            f"""
            import json, os, subprocess, sys
            from pytest_layers import _linux, namespaces
            info = namespaces.enter_private_mount_namespace()
            _linux.mount("tmpfs", {str(point)!r}, "tmpfs", 0, "size=1m")
            child = subprocess.run([sys.executable, "-c", (
                "import json; from pytest_layers import namespaces;"
                "info = namespaces.enter_private_mount_namespace();"
                "print(json.dumps([info.kind, info.mnt_ns]))")],
                capture_output=True, text=True, check=True)
            p = {str(point)!r}
            print(json.dumps({{"ns": info.mnt_ns, "child": json.loads(child.stdout),
                               "host_sees": open("/proc/1/mountinfo").read().count(p),
                               "we_see": open("/proc/self/mountinfo").read().count(p)}}))
            """
        ),
        capture_output=True,
        text=True,
        check=True,
        env=_fresh_env(),
    )
    out = json.loads(proc.stdout)
    assert out["we_see"] == 1
    assert out["host_sees"] == 0
    assert out["child"] == ["private", out["ns"]]  # inherited, not unshared again
    assert _mount_points_under(tmp_path) == []


@pytest.mark.requires_root
def test_sigkill_leaves_no_mount_behind_in_private_mode(tmp_path: Path) -> None:
    lower = _make_lower(tmp_path)
    scratch = tmp_path / "scratch"
    holder = _spawn_holder(
        "from pytest_layers import namespaces\nnamespaces.enter_private_mount_namespace()\n"
        + _OVERLAY_AT.format(lower=str(lower), scratch=str(scratch))
    )
    try:
        assert _mount_points_under(scratch, f"/proc/{holder.pid}/mountinfo") == [str(scratch / "m")]
        assert _mount_points_under(tmp_path) == []  # never visible outside
    finally:
        _kill(holder)
    assert _mount_points_under(tmp_path) == []
    with open("/proc/mounts") as f:
        assert str(scratch) not in f.read()


# ---- root: host mode and the sweep ------------------------------------------------------------


@pytest.mark.requires_root
def test_sweep_removes_dead_sessions_mounts_and_spares_live_ones(tmp_path: Path) -> None:
    store_tmp = tmp_path / "store-tmp"
    lower = _make_lower(tmp_path)
    outside = tmp_path / "outside"
    session = """
from pytest_layers import namespaces
scratch_root = Path({views!r}) / namespaces.session_dir_name()
""".replace("{views!r}", repr(str(store_tmp / "views")))
    body = _OVERLAY_AT.format(lower=str(lower), scratch="SCRATCH").replace(
        "Path('SCRATCH')", "scratch_root / 'view-1'"
    )
    dead = _spawn_holder("from pathlib import Path\n" + session + body)
    live = _spawn_holder("from pathlib import Path\n" + session + body)
    # a dead process's mount outside the store: never ours to touch
    stranger = _spawn_holder(_OVERLAY_AT.format(lower=str(lower), scratch=str(outside)))
    try:
        dead_dir = store_tmp / "views" / namespaces.session_dir_name(dead.pid)
        live_dir = store_tmp / "views" / namespaces.session_dir_name(live.pid)
        for proc in (dead, stranger):
            _kill(proc)
        # host mode: the mounts outlive their owners
        assert _mount_points_under(dead_dir) == [str(dead_dir / "view-1" / "m")]
        assert _mount_points_under(outside) == [str(outside / "m")]

        swept = namespaces.sweep_stale_mounts(store_tmp)

        assert swept == [dead_dir / "view-1" / "m"]
        assert _mount_points_under(dead_dir) == []
        assert not dead_dir.exists()
        assert _mount_points_under(live_dir) == [str(live_dir / "view-1" / "m")]
        assert (live_dir / "view-1" / "m" / "f").read_text() == "lower"
        assert _mount_points_under(outside) == [str(outside / "m")]
    finally:
        for proc in (dead, live, stranger):
            _kill(proc)
        for point in sorted(_mount_points_under(tmp_path), key=len, reverse=True):
            _linux.umount2(point, _linux.MNT_DETACH)
    assert _mount_points_under(tmp_path) == []


@pytest.mark.requires_root
def test_sweep_tells_reused_pids_by_start_time(tmp_path: Path) -> None:
    views = tmp_path / "views"
    me = views / namespaces.session_dir_name()
    impostor = views / f"{os.getpid()}-1"  # our pid, but a start time that is not ours
    other = views / f"{os.getppid()}-1"
    for d in (me, impostor, other):
        (d / "view").mkdir(parents=True)
    namespaces.sweep_stale_mounts(tmp_path)
    assert me.exists()  # our own session
    assert impostor.exists()  # our pid is skipped outright
    assert not other.exists()  # the parent's pid with another start time: a dead session


# ---- ordinary user: user namespace ------------------------------------------------------------

_USERNS_SCRIPT = """
import json, os, subprocess, sys
from pathlib import Path
from pytest_layers import _linux, namespaces
from pytest_layers.backends.overlay import OverlayBackend
base = Path(sys.argv[1])
uid_before = os.getuid()
info = namespaces.enter_user_namespace()
lower = base / "lower"
lower.mkdir()
(lower / "f").write_text("lower")
(base / "s1").mkdir()
view = OverlayBackend().open([lower], base / "s1")
(view.path / "written").write_text("by parent")
child_code = '''
import json, os, sys
from pathlib import Path
from pytest_layers import _linux, namespaces
from pytest_layers.backends.overlay import OverlayBackend
base = Path(sys.argv[1])
inside = namespaces.inside_our_namespace()
seen = (base / "s1" / "m" / "written").read_text()
(base / "s2").mkdir()
view = OverlayBackend().open([base / "lower"], base / "s2")
(view.path / "g").write_text("child mount")
ok = (view.path / "f").read_text()
view.close()
print(json.dumps({"uid": os.getuid(), "inside": inside.kind if inside else None, "seen": seen,
                  "child_mount": ok, "sys_admin": _linux.has_effective_cap(_linux.CAP_SYS_ADMIN)}))
'''
child = subprocess.run([sys.executable, "-c", child_code, str(base)], capture_output=True,
                       text=True)
view.close()
print(json.dumps({"uid_before": uid_before, "uid": os.getuid(), "gid": os.getgid(),
                  "kind": info.kind, "child": child.stdout, "child_err": child.stderr[-2000:],
                  "ambient": _linux.ambient_is_set(_linux.CAP_SYS_ADMIN)}))
"""


@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_ordinary_user_mounts_in_user_namespace_and_exec_child_can_too(
    user_tmp_path: Path,
) -> None:
    proc = run_as_user([sys.executable, "-c", _USERNS_SCRIPT, str(user_tmp_path)], cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == out["uid_before"] != 0
    assert out["kind"] == "userns"
    assert out["ambient"] is True
    child = json.loads(out["child"] or "null")
    assert child is not None, out["child_err"]
    assert child == {
        "uid": out["uid"],
        "inside": "userns",
        "seen": "by parent",
        "child_mount": "lower",
        "sys_admin": True,
    }
    # everything was made by the user, with their own uid, and nothing is mounted any more
    assert (user_tmp_path / "lower" / "f").stat().st_uid == out["uid"]
    assert _mount_points_under(user_tmp_path) == []


@pytest.mark.requires_user
def test_ordinary_user_with_threads_gets_a_clear_reason(user_tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import threading, time
        from pytest_layers import namespaces
        from pytest_layers.errors import BackendUnavailableError
        threading.Thread(target=time.sleep, args=(5,), name="xdist-ish", daemon=True).start()
        try:
            namespaces.enter_user_namespace()
        except BackendUnavailableError as exc:
            print(exc)
        """
    )
    proc = run_as_user([sys.executable, "-c", code], cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "cannot enter a user namespace because 1 other thread(s) already run (xdist-ish)" in (
        proc.stdout
    )


def test_sweep_without_views_is_a_no_op(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("kept")
    assert namespaces.sweep_stale_mounts(tmp_path) == []
    assert (tmp_path / "file").read_text() == "kept"
