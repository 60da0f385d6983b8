"""Kernel overlay backend: deep stacks, long paths, fallbacks, readonly views, caveats.

Mounting code runs in a child process that first enters its own namespace (a private mount
namespace as root, a user namespace as the test user), so a failure leaks no mount.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_as_user

from pytest_layers import namespaces
from pytest_layers.backends import overlay
from pytest_layers.errors import BackendUnavailableError, TooManyLayersError

_PRELUDE = """
import errno, json, os, shutil, stat, sys
from pathlib import Path
from pytest_layers import namespaces
from pytest_layers.backends.overlay import OverlayBackend
if os.getuid() == 0:
    namespaces.enter_private_mount_namespace()
else:
    namespaces.enter_user_namespace()
base = Path(sys.argv[1])
"""


def _run(body: str, base: Path, *, as_user: bool = False) -> dict[str, object]:
    code = _PRELUDE + textwrap.dedent(body)
    if as_user:
        proc = run_as_user([sys.executable, "-c", code, str(base)], cwd="/")
    else:
        env = {k: v for k, v in os.environ.items() if k != namespaces.ENV_VAR}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(base)], capture_output=True, text=True, env=env
        )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


_DEEP = """
lowers = []
for i in range(200):
    # 200-character directory names: 200 of them are ~40 KB of paths, ten times what the
    # legacy mount(2) string could carry.
    layer = base / (f"{i:03d}-" + "x" * 196)
    layer.mkdir()
    (layer / f"only-{i}").write_text(str(i))
    (layer / "shared").write_text(f"layer {i}")
    lowers.append(layer)
backend = OverlayBackend(api=API)
scratch = base / "scratch"
scratch.mkdir()
view = backend.open(lowers[::-1], scratch)  # top first: layer 199 on top
try:
    result = {
        "api": backend.api,
        "shared": (view.path / "shared").read_text(),
        "bottom": (view.path / "only-0").read_text(),
        "top": (view.path / "only-199").read_text(),
        "count": len(os.listdir(view.path)),
    }
    (view.path / "only-0").write_text("changed")
    result["bottom_lower_untouched"] = (lowers[0] / "only-0").read_text()
finally:
    view.close()
result["scratch_removed"] = not scratch.exists()
print(json.dumps(result))
"""


@pytest.mark.requires_root
@pytest.mark.requires_overlay
@pytest.mark.parametrize("api", ["fd", "string", "legacy"])
def test_200_layers_with_long_paths_as_root(tmp_path: Path, api: str) -> None:
    out = _run(_DEEP.replace("API", repr(api)), tmp_path)
    assert out == {
        "api": api,
        "shared": "layer 199",
        "bottom": "0",
        "top": "199",
        "count": 201,
        "bottom_lower_untouched": "0",
        "scratch_removed": True,
    }


@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_200_layers_with_long_paths_as_ordinary_user(user_tmp_path: Path) -> None:
    out = _run(_DEEP.replace("API", "None"), user_tmp_path, as_user=True)
    assert out["api"] == "fd"
    assert out["shared"] == "layer 199"
    assert out["bottom"] == "0"
    assert out["top"] == "199"
    assert out["count"] == 201
    assert out["scratch_removed"] is True


def test_501_layers_fail_clearly(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    lowers = [tmp_path / f"l{i}" for i in range(501)]
    with pytest.raises(TooManyLayersError) as info:
        overlay.OverlayBackend().open(lowers, scratch)
    message = str(info.value)
    assert "501 layers" in message
    assert "at most 500" in message
    assert "squash" in message
    assert os.listdir(scratch) == []  # checked before anything is made


def test_legacy_option_string_over_the_page_limit_is_refused() -> None:
    # Eight-digit fds make 500 layers overflow the 4095 bytes mount(2) copies; the check
    # must fire before the syscall, whose kernel would silently truncate.
    fds = list(range(10_000_000, 10_000_500))
    with pytest.raises(TooManyLayersError, match=r"more than the 4095 that mount\(2\) accepts"):
        overlay._mount_legacy(fds, 3, 4, Path("/nonexistent"), False)


def test_marker_flavor_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="marker"):
        overlay.OverlayBackend().open([tmp_path], tmp_path / "s", flavor="marker")


def test_unknown_api_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="api must be one of"):
        overlay.OverlayBackend(api="magic")


_SEMANTICS = """
lower = base / "lower"
(lower / "dir" / "sub").mkdir(parents=True)
(lower / "dir" / "sub" / "f").write_text("lower")
(lower / "file").write_text("lower")
(lower / "gone").write_text("lower")
result = {}
backend = OverlayBackend()

# readonly views: one layer (padded with an empty lower) and two layers
for n in (1, 2):
    scratch = base / f"ro{n}"
    scratch.mkdir()
    extra = base / "lower2"
    extra.mkdir(exist_ok=True)
    view = backend.open([lower, extra][:n], scratch, readonly=True)
    try:
        (view.path / "new").write_text("x")
        result[f"ro{n}"] = "writable"
    except OSError as exc:
        result[f"ro{n}"] = errno.errorcode[exc.errno]
    result[f"ro{n}_upper"] = view.upper
    result[f"ro{n}_sees"] = sorted(os.listdir(view.path))
    view.close()

scratch = base / "rw"
scratch.mkdir()
view = backend.open([lower], scratch)
m = view.path
(m / "gone").unlink()
whiteout = os.lstat(view.upper / "gone")
result["whiteout"] = [stat.S_ISCHR(whiteout.st_mode), whiteout.st_rdev]
# rename(2) of a lower directory: EXDEV without redirect_dir
try:
    os.rename(m / "dir", m / "moved")
    result["rename_lower_dir"] = "ok"
except OSError as exc:
    result["rename_lower_dir"] = errno.errorcode[exc.errno]
shutil.move(m / "dir", m / "moved")
result["after_move"] = [sorted(os.listdir(m)), (m / "moved" / "sub" / "f").read_text()]
os.rename(m / "file", m / "file2")  # files are copied up, then renamed: fine
(m / "mine").mkdir()
os.rename(m / "mine", m / "mine2")  # a directory of the upper only: fine
result["renamed"] = sorted(os.listdir(m))
result["lower"] = sorted(os.listdir(lower))
view.close()
view.close()  # idempotent
result["scratch_removed"] = not scratch.exists()
result["mounted"] = [l.split()[4] for l in open("/proc/self/mountinfo") if str(base) in l]
print(json.dumps(result))
"""


def _check_semantics(out: dict[str, object]) -> None:
    assert out["ro1"] == out["ro2"] == "EROFS"
    assert out["ro1_upper"] is None
    assert out["ro1_sees"] == out["ro2_sees"] == ["dir", "file", "gone"]
    assert out["whiteout"] == [True, 0]
    assert out["rename_lower_dir"] == "EXDEV"
    assert out["after_move"] == [["file", "moved"], "lower"]
    assert out["renamed"] == ["file2", "mine2", "moved"]
    assert out["lower"] == ["dir", "file", "gone"]
    assert out["scratch_removed"] is True
    assert out["mounted"] == []


@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_readonly_whiteouts_and_rename_exdev_as_root(tmp_path: Path) -> None:
    _check_semantics(_run(_SEMANTICS, tmp_path))


@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_readonly_whiteouts_and_rename_exdev_as_ordinary_user(user_tmp_path: Path) -> None:
    _check_semantics(_run(_SEMANTICS, user_tmp_path, as_user=True))


_CHANGES = """
from pytest_layers.changeset import ImageView, to_changes
lower = base / "lower"
(lower / "etc").mkdir(parents=True)
(lower / "etc" / "os-release").write_text("ID=demo\\n")
(lower / "etc" / "app.conf").write_text("debug=false\\n")
scratch = base / "s"
scratch.mkdir()
backend = OverlayBackend()
with backend.open([lower], scratch) as view:
    (view.path / "etc" / "app.conf").write_text("debug=true\\n")
    (view.path / "etc" / "os-release").unlink()
    (view.path / "new").write_text("new\\n")
    changes = [str(c) for c in to_changes(backend.changes(view, ImageView([lower], "overlay")))]
print(json.dumps({"changes": changes}))
"""


@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_changes_come_from_the_upper_dir(tmp_path: Path) -> None:
    assert _run(_CHANGES, tmp_path)["changes"] == [
        "C /etc",
        "C /etc/app.conf",
        "D /etc/os-release",
        "A /new",
    ]


_CHECK = """
from pytest_layers.backends import detect
scratch = base / "trial"
backend, skipped = detect.choose_backend("auto", scratch)
explicit, none_skipped = detect.choose_backend("overlay", scratch)
print(json.dumps({"name": backend.name, "label": detect.backend_label(backend),
                  "skipped": skipped, "explicit": explicit.name, "left": os.listdir(scratch)}))
"""


@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_auto_picks_overlay_as_root(tmp_path: Path) -> None:
    out = _run(_CHECK, tmp_path)
    assert out == {
        "name": "overlay",
        "label": "overlay",
        "skipped": [],
        "explicit": "overlay",
        "left": [],
    }


@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_auto_picks_overlay_in_user_namespace(user_tmp_path: Path) -> None:
    out = _run(_CHECK, user_tmp_path, as_user=True)
    assert out["label"] == "overlay (user namespace)"
    assert out["skipped"] == []


@pytest.mark.requires_user
def test_explicit_overlay_without_namespace_says_why_and_how(user_tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from pytest_layers.backends import detect
        from pytest_layers.errors import BackendUnavailableError
        try:
            detect.choose_backend("overlay", Path(sys.argv[1]) / "trial")
        except BackendUnavailableError as exc:
            print(exc)
        """
    )
    proc = run_as_user([sys.executable, "-c", code, str(user_tmp_path)], cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "overlay (user namespace) backend unavailable: not root" in proc.stdout
    assert "to fix: run as root, or as an ordinary user with user namespaces" in proc.stdout
