"""Where mounting is forbidden: `auto` falls back to copy, says why and names the fix.

The environments are emulated by ``.ci/restricted.py`` (a seccomp filter from Debian's
python3-seccomp, a private /dev without fuse, the store on an overlayfs): Docker's default
profile (``docker``) and Ubuntu's AppArmor restriction of user namespaces (``apparmor``: the
namespace is created but mounting in it fails, as when its capabilities are withheld).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_layers import namespaces
from pytest_layers.backends import detect
from tests.conftest import TEST_USER, require

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = ROOT / ".ci" / "restricted.py"
VENV_BIN = Path(sys.executable).parent
SYSCTL = "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"

TEST_FILE = """\
import os
import pytest
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_text("v1\\n")
    (root / "suid").write_text("x")
    os.chmod(root / "suid", 0o4755)

@pytest.mark.layer("base")
def test_writes(rootfs):
    (rootfs / "etc" / "conf").write_text("v2\\n")
    assert (rootfs / "etc" / "conf").read_text() == "v2\\n"
    assert [str(c) for c in rootfs.diff()] == ["C /etc", "C /etc/conf"]

@pytest.mark.layer("base")
def test_isolated(rootfs):
    assert (rootfs / "etc" / "conf").read_text() == "v1\\n"
    # As root the copy could not be bound nosuid: the setuid bit must not reach it.
    assert os.geteuid() != 0 or not os.stat(rootfs / "suid").st_mode & 0o6000
"""


def _needs_seccomp() -> None:
    probe = subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-seccomp is not installed (apt-get install python3-seccomp)")


def _restricted(
    args: list[str], cmd: list[str], *, cwd: Path, user: bool = False
) -> subprocess.CompletedProcess[str]:
    full = ["/usr/bin/python3", str(WRAPPER), *args, "--", *cmd]
    if user and os.geteuid() == 0 and "--user" not in args:
        full = ["runuser", "-u", TEST_USER, "--", *full]
    env = {**os.environ, "PYTEST_ADDOPTS": "", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(full, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory every user can write (the test user runs inside it)."""
    path = Path("/tmp") / f"pytest-layers-restricted-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    try:
        yield path
    finally:
        namespaces.remove_tree(path)


def _project(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "test_it.py").write_text(TEST_FILE)
    (path / "pytest.ini").write_text("[pytest]\n")
    path.chmod(0o777)
    return path


@pytest.mark.requires_root
@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_docker_default_profile_picks_copy_and_says_why(shared_tmp: Path, as_user: bool) -> None:
    """Mounting and unsharing refused, no /dev/fuse, the store on overlayfs: copy runs, the
    header says copy, why, and a fix; the tests pass."""
    _needs_seccomp()
    if as_user:
        require("user")
    project = _project(shared_tmp / "proj")
    ovl = shared_tmp / "ovl"
    args = ["--overlay", str(ovl)] + (["--user", TEST_USER] if as_user else [])
    cmd = [
        str(VENV_BIN / "pytest"),
        "-p",
        "no:cacheprovider",
        f"--layers-store={ovl}/store",
        f"--basetemp={ovl}/bt",
        "test_it.py",
    ]
    proc = _restricted(args, cmd, cwd=project)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    header = next(line for line in out.splitlines() if line.startswith("layers: backend="))
    assert header.startswith("layers: backend=copy ("), header
    expected = "mounting is refused here" if not as_user else "refused an unprivileged user"
    assert expected in header, header
    assert "fuse: /dev/fuse does not exist" in header, header
    short_fix = (
        "docker run --security-opt seccomp=unconfined" if as_user else "docker run --privileged"
    )
    assert f"; fix: {short_fix})" in header, header
    assert "2 passed" in out, out
    assert str(shared_tmp) not in Path("/proc/self/mounts").read_text()


@pytest.mark.requires_root
@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_docker_default_profile_reuses_copies(shared_tmp: Path, as_user: bool) -> None:
    """The second test of an image gets the first one's copy, reset (``test_isolated``
    checks its content and, as root, that the reset copy is still defanged). In the session:
    the view pool's helper resets copies too (tests/test_copy_reuse.py), but its counts stay
    in the helper."""
    _needs_seccomp()
    if as_user:
        require("user")
    project = _project(shared_tmp / "proj")
    ovl = shared_tmp / "ovl"
    args = ["--overlay", str(ovl)] + (["--user", TEST_USER] if as_user else [])
    cmd = [
        str(VENV_BIN / "pytest"),
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        f"--layers-store={ovl}/store",
        f"--basetemp={ovl}/bt",
        "-o",
        "layers_view_pool=0",
        "-v",
        "test_it.py",
    ]
    proc = _restricted(args, cmd, cwd=project)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 passed" in out, out
    assert "layers: copy: 1 copies reset and reused, 0 thrown away" in out, out


@pytest.mark.requires_root
def test_docker_default_profile_doctor(tmp_path: Path) -> None:
    """`doctor` names each cause and this machine's fix, and the cost of copy."""
    _needs_seccomp()
    ovl = tmp_path / "ovl"
    cmd = [str(VENV_BIN / "pytest-layers"), f"--store={ovl}/store", "doctor"]
    proc = _restricted(["--overlay", str(ovl)], cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    overlay = next(line for line in lines if line.startswith("overlay"))
    assert "--cap-add SYS_ADMIN --security-opt seccomp=unconfined" in overlay
    assert "--privileged" in overlay
    assert "volume" in overlay
    assert "--layers-store=/store" in overlay
    fuse = next(line for line in lines if line.startswith("fuse"))
    assert "/dev/fuse is missing" in fuse
    assert "--device /dev/fuse" in fuse
    assert any(line.startswith("copy") and "works" in line for line in lines)
    assert any(line.startswith("auto picks: copy, ") and " ms per test" in line for line in lines)


@pytest.mark.requires_root
def test_doctor_fuse_device_not_usable(shared_tmp: Path) -> None:
    """A root-only /dev/fuse and no fusermount3: the fix is the chmod."""
    _needs_seccomp()
    require("user")
    bindir = shared_tmp / "bin"
    bindir.mkdir()
    (bindir / "fuse-overlayfs").symlink_to("/usr/bin/fuse-overlayfs")
    store = shared_tmp / "store"
    cmd = ["env", f"PATH={bindir}", str(VENV_BIN / "pytest-layers"), f"--store={store}", "doctor"]
    proc = _restricted(["--fuse-mode", "0600", "--user", TEST_USER], cmd, cwd=shared_tmp)
    assert proc.returncode == 0, proc.stderr
    fuse = next(line for line in proc.stdout.splitlines() if line.startswith("fuse"))
    assert fuse.endswith("fix: sudo chmod 0666 /dev/fuse"), fuse


@pytest.mark.requires_userns
def test_apparmor_restriction_detected_with_the_sysctl_fix(shared_tmp: Path) -> None:
    """A user namespace that is created but refuses mounting: reported as AppArmor's
    restriction, with the sysctl in the header (-v) and in doctor."""
    _needs_seccomp()
    if os.geteuid() == 0:
        require("user")
    base = shared_tmp
    project = _project(base / "proj")
    cmd = [
        str(VENV_BIN / "pytest"),
        "-v",
        "-p",
        "no:cacheprovider",
        f"--layers-store={base}/store",
        f"--basetemp={base}/bt",
        "test_it.py",
    ]
    proc = _restricted(["--profile", "apparmor"], cmd, cwd=project, user=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    header = next(line for line in out.splitlines() if line.startswith("layers: backend="))
    assert header.startswith("layers: backend=copy (no user namespace: created but mount")
    assert f"layers: fix: {SYSCTL}" in out.splitlines()
    assert "layers: fix: remove layers_mount_namespace" not in out
    doctor = [str(VENV_BIN / "pytest-layers"), f"--store={base}/store", "doctor"]
    proc = _restricted(["--profile", "apparmor"], doctor, cwd=base, user=True)
    overlay = next(line for line in proc.stdout.splitlines() if line.startswith("overlay"))
    assert "AppArmor" in overlay, overlay
    assert overlay.endswith(f"fix: {SYSCTL}"), overlay


@pytest.mark.parametrize(
    ("reason", "fix"),
    [
        ("the store spells whiteouts as 'marker' files (...)", "--layers-store=/store"),
        (f"{namespaces.USERNS_NO_MOUNT} (Operation not permitted)", SYSCTL),
        ("AppArmor (kernel.apparmor_restrict_unprivileged_userns = 1)", SYSCTL),
        ("disabled (user.max_user_namespaces = 0)", "sysctl -w user.max_user_namespaces=15000"),
        ("disabled (kernel.unprivileged_userns_clone = 0)", "unprivileged_userns_clone=1"),
        ("the kernel refused an unprivileged user namespace (EPERM)", "seccomp=unconfined"),
        (f"{namespaces.MOUNT_REFUSED} (seccomp)", "--cap-add SYS_ADMIN"),
        ("fuse-overlayfs is not installed or not executable", "apt-get install fuse-overlayfs"),
        ("/dev/fuse does not exist (modprobe fuse)", "--device /dev/fuse"),
        ("/dev/fuse is not usable by this user", "chmod 0666 /dev/fuse"),
        ("trial mount failed: mount: Operation not permitted", "--privileged"),
    ],
)
def test_each_cause_has_its_fix(reason: str, fix: str) -> None:
    finding = detect.explain("overlay", reason)
    assert fix in finding.fix
    assert not finding.works
    assert finding.why
    assert finding.detail == reason
    assert fix in " ".join(detect.fixes_for(reason))


def test_unknown_cause_keeps_the_reason_and_invents_no_fix() -> None:
    finding = detect.explain("copy", "trial copy failed: [Errno 28] No space left on device")
    assert finding.fix == ""
    assert "No space left" in finding.why
    assert finding.line() == f"copy      no: {finding.why}"


def test_a_namespace_failure_hides_the_not_entered_repeat() -> None:
    reasons = (
        "no user namespace: the kernel refused an unprivileged user namespace (EPERM); "
        "overlay (user namespace): not root and not in a user namespace of its own"
    )
    fixes = detect.fixes_for(reasons)
    assert len(fixes) == 1
    assert "seccomp=unconfined" in fixes[0]


# ---- docs/how-to/ci.md: its recipes, where this machine can emulate them ---------------------

CI_DOC = ROOT / "docs" / "how-to" / "ci.md"


def _section(title: str) -> str:
    text = CI_DOC.read_text()
    start = text.index(f"### {title}\n")
    end = text.find("\n### ", start + 1)
    return " ".join(text[start : end if end != -1 else None].split())


def _quoted_header(title: str) -> str:
    """The header words a recipe quotes: the backticked text after "says"."""
    section = _section(title)
    return section.split("says `", 1)[1].split("`", 1)[0]


def test_ci_recipes_quote_what_the_emulation_prints() -> None:
    """The recipes quote exactly the texts the tests above find in the emulated headers."""
    assert _quoted_header("GitHub Actions, `ubuntu-24.04`, as the runner user") == (
        f"no user namespace: {namespaces.USERNS_NO_MOUNT}; fix: {SYSCTL}"
    )
    assert _quoted_header("GitHub Actions, `container:` job") == (
        f"no private mount namespace: {namespaces.MOUNT_REFUSED}; fuse: /dev/fuse does not exist"
    )
    # Every fix a recipe applies is the one doctor gives for that cause.
    ubuntu = _section("GitHub Actions, `ubuntu-24.04`, as the runner user")
    assert f"run: {SYSCTL}" in ubuntu
    assert detect.explain("fuse", "fuse-overlayfs is not installed").fix in ubuntu
    container = _section("GitHub Actions, `container:` job")
    assert "options: --cap-add SYS_ADMIN --security-opt seccomp=unconfined" in container
    assert "pytest --layers-store=/store" in container


@pytest.mark.requires_root
def test_ci_recipe_reproduce_locally_runs_as_written(shared_tmp: Path) -> None:
    """The "reproduce locally" commands, run as written (paths and user name substituted):
    each doctor says copy is what auto picks, and why the faster ones are not."""
    _needs_seccomp()
    require("user")
    block = CI_DOC.read_text().split("### Reproduce a restricted CI machine locally", 1)[1]
    block = block.split("```console\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.startswith(("# ", "$ "))]
    assert len(commands) == 3, commands
    expected = ["mounting is refused", "refuses user namespaces", "AppArmor"]
    for command, why in zip(commands, expected, strict=True):
        prompt, text = command.split(" ", 1)
        text = text.replace("/tmp/ovl", str(shared_tmp / "ovl")).replace("alice", TEST_USER)
        text = text.replace(".venv/bin/", f"{VENV_BIN}/")
        argv = text.split()
        if prompt == "$":
            argv[argv.index("doctor") : argv.index("doctor")] = [f"--store={shared_tmp}/us"]
            argv = ["runuser", "-u", TEST_USER, "--", *argv]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        lines = proc.stdout.splitlines()
        assert any(line.startswith("auto picks: copy, ") for line in lines), proc.stdout
        overlay = next(line for line in lines if line.startswith("overlay"))
        assert why in overlay, (command, overlay)


DEFANG_SCRIPT = """
import os, stat, sys, tempfile
from pathlib import Path
from pytest_layers.backends.copy import CopyBackend
from pytest_layers.errors import BackendUnavailableError
base = Path(sys.argv[1])
lower = base / "lower"
lower.mkdir()
(lower / "suid").write_text("x")
os.chmod(lower / "suid", 0o6755)
os.setxattr(lower / "suid", "security.capability", bytes.fromhex(
    "0000000200200000000000000000000000000000"))
backend = CopyBackend()
(base / "v1").mkdir()
view = backend.open([lower], base / "v1")
st = os.stat(view.path / "suid")
print("mode", oct(stat.S_IMODE(st.st_mode)))
print("caps", "security.capability" in os.listxattr(view.path / "suid"))
view.close()
os.mknod(lower / "kmsg", stat.S_IFCHR | 0o600, os.makedev(1, 11))
(base / "v2").mkdir()
try:
    backend.open([lower], base / "v2")
except BackendUnavailableError as exc:
    print("refused", exc)
print("left", sorted(os.listdir(base / "v2")))
"""


@pytest.mark.requires_root
def test_root_copy_without_mount_rights_grants_nothing(tmp_path: Path) -> None:
    """Root refused mounting (no nosuid,nodev bind possible): the copy drops setuid/setgid and
    file capabilities and refuses a device node with one line, leaving nothing behind."""
    _needs_seccomp()
    cmd = [sys.executable, "-c", DEFANG_SCRIPT, str(tmp_path)]
    proc = _restricted([], cmd, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "mode 0o755" in out, out
    assert "caps False" in out, out
    refused = next(line for line in out if line.startswith("refused"))
    assert "device node 'kmsg'" in refused, refused
    assert "layers_mount_options" in refused, refused
    assert "left []" in out, out
