"""The sandbox's compiled init: which init runs sandboxes here, and building it.

``PYTEST_LAYERS_INIT`` chooses: ``auto`` (the default: the compiled init when it builds and
starts, else the Python init, with the reason), ``compiled`` (a missing compiler or a refused
start is an error) or ``python``. The compiled init (``_init/init.c``, protocol described at its
top) is built once per process at first use (in ``auto`` again should it go away) with
``$CC``, else ``cc``, else ``gcc``, into
``$XDG_CACHE_HOME/pytest-layers/init/init-<hash of source and compiler>`` (default
``~/.cache``), written under a temporary name and renamed into place. The binary runs with the
caller's privileges and sees everything it is given, so the cache must be this user's alone:
every directory from the cache root down, and the binary, must belong to the user and be
writable by no one else, or it is refused.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODES", "Choice", "mode", "choose", "refused", "forget", "describe"]

MODES = ("auto", "compiled", "python")
VERSION = "pytest-layers-init/2"
#: The starter's exit status when clone3 is refused (see ``_init/init.c``).
CLONE_REFUSED = 126
SOURCE = Path(__file__).parent / "_init" / "init.c"
FLAGS = (
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-D_FORTIFY_SOURCE=2",
    "-fstack-protector-strong",
)


@dataclass(frozen=True)
class Choice:
    """The init this process uses: ``binary`` (the compiled init's path) or None with
    ``reason`` (why the Python init runs sandboxes)."""

    binary: str | None
    reason: str = ""


_choice: Choice | None = None


def mode() -> str:
    """``PYTEST_LAYERS_INIT``, checked (ValueError names the variable and the choices)."""
    value = os.environ.get("PYTEST_LAYERS_INIT", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"PYTEST_LAYERS_INIT={value!r}: use one of {', '.join(MODES)} (default auto)"
        )
    return value


def choose() -> Choice:
    """The init to use, decided once per process (built at the first call)."""
    wanted = mode()
    if _choice is not None and _choice_key == (os.getpid(), wanted):
        return _choice
    if wanted == "python":
        found = Choice(None, "PYTEST_LAYERS_INIT=python")
    else:
        try:
            found = Choice(_build())
        except _Unusable as exc:
            found = Choice(None, str(exc))
    _remember(found)
    return found


def refused(reason: str) -> None:
    """The compiled init built but cannot start sandboxes here (clone3 refused): the Python
    init runs them from now on, and says why."""
    _remember(Choice(None, f"the compiled init cannot start here: {reason}"))


def forget() -> None:
    """Decide again at the next :func:`choose` (the built binary went away: build it anew)."""
    global _choice
    _choice = None


def describe() -> str:
    """One line for the report header and ``doctor``: the init in use, why when not compiled."""
    try:
        choice = choose()
    except ValueError as exc:
        return f"init: {exc}"
    if choice.binary is not None:
        return f"init: compiled ({choice.binary})"
    return f"init: python ({choice.reason})"


#: Whose and for which mode ``_choice`` was made: a forked child or a changed
#: ``PYTEST_LAYERS_INIT`` decides again.
_choice_key: tuple[int, str] = (0, "")


def _remember(choice: Choice) -> None:
    global _choice, _choice_key
    _choice, _choice_key = choice, (os.getpid(), mode())


class _Unusable(Exception):
    """Why the compiled init cannot be used (one line)."""


def _compiler() -> list[str]:
    cc = os.environ.get("CC", "").strip()
    if cc:
        words = shlex.split(cc)
        if shutil.which(words[0]) is None:
            raise _Unusable(f"no compiler: CC={cc!r} is not found")
        return words
    for name in ("cc", "gcc"):
        found = shutil.which(name)
        if found is not None:
            return [found]
    raise _Unusable("no C compiler (cc, gcc; or set CC): install gcc and libc6-dev")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    try:
        root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    except (RuntimeError, KeyError):
        raise _Unusable("no cache directory: set HOME or XDG_CACHE_HOME") from None
    path = root / "pytest-layers" / "init"
    # Every directory made or met from the cache root down must be ours and private.
    for directory in (root, root / "pytest-layers", path):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _Unusable(f"cannot make the init's cache {directory}: {exc.strerror}") from None
        _check_private(directory, "directory")
    return path


def _check_private(path: Path, what: str) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise _Unusable(f"cannot check {path}: {exc.strerror}") from None
    kind_ok = stat.S_ISDIR(st.st_mode) if what == "directory" else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        raise _Unusable(f"refusing the init's cache: {path} is not a {what}")
    if st.st_uid != os.geteuid():
        raise _Unusable(
            f"refusing the init's cache: {path} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.geteuid()}); set XDG_CACHE_HOME to a directory of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _Unusable(
            f"refusing the init's cache: {path} is writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); chmod go-w it"
        )


def _build() -> str:
    cc = _compiler()
    try:
        source = SOURCE.read_bytes()
        ident = subprocess.run(
            [*cc, "--version"], capture_output=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unusable(f"cannot use the compiler {shlex.join(cc)}: {exc}") from None
    digest = hashlib.sha256()
    for part in (source, shlex.join(cc).encode(), ident, " ".join(FLAGS).encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    binary = _cache_dir() / f"init-{digest.hexdigest()[:32]}"
    found = None
    if binary.exists() or binary.is_symlink():
        _check_private(binary, "regular file")
        found = _check(binary)
    if found is None:
        # Not built yet, or truncated or damaged (a crash mid-write elsewhere, a disk error):
        # built (again), replacing it atomically.
        _compile(cc, binary)
        found = _check(binary)
        if found is None:
            raise _Unusable(f"the compiled init {binary} does not start")
    if found:
        raise _Unusable(f"the compiled init cannot start here: {found}")
    return str(binary)


def _check(binary: Path) -> str | None:
    """Run ``init --check``: "" when it works here, why when clone3 into new namespaces is
    refused (Docker's seccomp profile answers ENOSYS: found now and named, not at the first
    run), None when the binary is broken."""
    try:
        done = subprocess.run([str(binary), "--check"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    out = done.stdout.decode(errors="replace").strip()
    if done.returncode == 0 and out == VERSION:
        return ""
    if done.returncode == CLONE_REFUSED and out.startswith("clone3: "):
        return out
    return None


def _compile(cc: list[str], binary: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".init-", dir=binary.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*cc, *FLAGS, "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise _Unusable(f"cannot compile the init with {shlex.join(cc)}: {first}")
        os.chmod(tmp, 0o700)
        os.rename(tmp, binary)
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unusable(f"cannot compile the init with {shlex.join(cc)}: {exc}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
