"""Choosing a backend: the fastest that really works here, proven by a trial mount.

``auto`` tries, in order: kernel overlay as root, kernel overlay in a user namespace (an
ordinary user whose session entered one), fuse-overlayfs, copy. Each candidate gets a real trial
mount (:meth:`Backend.check`); the first that passes wins, and every faster one that was skipped
leaves a one-line reason for the report header. The fuse and copy modules are imported only
when they are tried.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_layers import namespaces
from pytest_layers.backends.base import Backend, MountPolicy
from pytest_layers.errors import BackendUnavailableError

if TYPE_CHECKING:
    from pytest_layers.layertar import Flavor

__all__ = [
    "BACKEND_NAMES",
    "Finding",
    "Reason",
    "backend_label",
    "choose_backend",
    "diagnose",
    "explain",
    "fixes_for",
    "get_backend",
    "join_reasons",
    "measure_cost",
    "shorten",
    "skipped_short",
]

#: Every backend, fastest first; ``auto`` tries them in this order.
BACKEND_NAMES = ("overlay", "fuse", "copy")

_CLASSES = {
    "overlay": ("pytest_layers.backends.overlay", "OverlayBackend"),
    "fuse": ("pytest_layers.backends.fuse", "FuseBackend"),
    "copy": ("pytest_layers.backends.copy", "CopyBackend"),
}

_FIX = {
    "overlay": "run as root, or as an ordinary user with user namespaces enabled "
    "(layers_mount_namespace=private), or choose --layers-backend=fuse or copy",
    "fuse": "install fuse-overlayfs and make /dev/fuse usable, or choose --layers-backend=copy",
    "copy": "make the scratch directory writable",
}


def shorten(text: str, limit: int = 60) -> str:
    """The first clause of ``text`` (up to `` (``, ``;`` or ``. ``), at most ``limit`` chars."""
    cut = len(text)
    for sep in (" (", "; ", ". "):
        at = text.find(sep)
        if 0 < at < cut:
            cut = at
    head = text[:cut]
    return head if len(head) <= limit else head[: limit - 1].rstrip() + "\u2026"


class Reason(str):
    """Why a backend was skipped: the full text (the str value, for ``-v`` and diagnostics)
    and ``short``, a few words for one-line reports such as the pytest report header."""

    short: str

    def __new__(cls, text: str, short: str | None = None) -> Reason:
        self = super().__new__(cls, text)
        if short is None:
            # "BACKEND: reason" keeps its label whole: "overlay (user namespace): ..."
            label, sep, rest = text.partition(": ")
            short = f"{label}: {shorten(rest)}" if sep and len(label) <= 30 else shorten(text)
        self.short = short
        return self


def join_reasons(reasons: list[Reason]) -> Reason:
    """Several reasons as one: full texts and short forms each joined with ``"; "``."""
    return Reason("; ".join(reasons), "; ".join(r.short for r in reasons))


# Trial mounts passed in this process, keyed by what could change their outcome.
_proven: set[tuple[str, int, str]] = set()


def get_backend(name: str, policy: MountPolicy | None = None) -> Backend:
    """A fresh, unchecked instance of the backend called ``name``, mounting views as ``policy``
    says (default: ``nosuid,nodev``)."""
    try:
        module_name, class_name = _CLASSES[name]
    except KeyError:
        raise BackendUnavailableError(
            name, f"unknown backend; choose auto, {', '.join(BACKEND_NAMES)}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = cls(policy=policy or MountPolicy())
    return backend


def backend_label(backend: Backend) -> str:
    """How the report header names ``backend``: ``"overlay (user namespace)"`` for an
    unprivileged kernel overlay, else its name."""
    if backend.name == "overlay" and os.geteuid() != 0:
        return "overlay (user namespace)"
    return backend.name


def _label(name: str) -> str:
    if name == "overlay" and os.geteuid() != 0:
        return "overlay (user namespace)"
    return name


def _precondition(name: str, flavor: str) -> str | None:
    """Why ``name`` cannot work here without even trying, or None."""
    if name != "overlay":
        return None
    if flavor != "overlay":
        return (
            f"the store spells whiteouts as {flavor!r} files (it sits on a filesystem without "
            "0/0 device files, such as overlayfs), which kernel overlay cannot use as lowers; "
            "to fix: put the store (--layers-store) on ext4, xfs, btrfs or tmpfs, or choose "
            "--layers-backend=fuse or copy"
        )
    if os.geteuid() != 0:
        inside = namespaces.inside_our_namespace()
        if inside is None or inside.kind != "userns":
            # Short first clause: the report header shows it. Being in *a* user namespace (a
            # parent's) is not enough: the session must have entered one of its own.
            return (
                "not root and not in a user namespace of its own (a pytest session enters one "
                "unless layers_mount_namespace = host; other callers must call "
                "namespaces.enter_user_namespace() first)"
            )
    return None


def skipped_short(exc: BackendUnavailableError) -> str:
    """``"backend: first clause of the reason"``, the header's form of a skipped backend."""
    return f"{exc.backend}: {shorten(exc.reason)}"


def _try(name: str, scratch: Path, flavor: str, policy: MountPolicy | None) -> Backend:
    why = _precondition(name, flavor)
    if why is not None:
        raise BackendUnavailableError(_label(name), why)
    try:
        backend = get_backend(name, policy)
    except ImportError as exc:
        raise BackendUnavailableError(name, f"cannot import its module: {exc}") from exc
    key = (name, os.geteuid(), namespaces.current_namespace())
    if key in _proven:
        return backend
    # A dir of our own: sessions sharing a store start at the same time, and one's cleanup
    # must not pull another's trial mount from under it.
    scratch.mkdir(parents=True, exist_ok=True)
    trial = Path(tempfile.mkdtemp(prefix=f"trial-{name}-{os.getpid()}-", dir=scratch))
    try:
        backend.check(trial)
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(_label(name), exc.reason) from exc
    except OSError as exc:
        raise BackendUnavailableError(_label(name), f"trial mount failed: {exc}") from exc
    finally:
        namespaces.remove_tree(trial)
    _proven.add(key)
    return backend


def choose_backend(
    name: str, scratch: Path, *, flavor: Flavor = "overlay", policy: MountPolicy | None = None
) -> tuple[Backend, list[Reason]]:
    """The backend to use and, for ``auto``, one :class:`Reason` per faster backend skipped.

    ``scratch`` is a directory for the trial mounts (created if missing, left empty).
    ``flavor`` is the store's whiteout flavor; ``policy`` how views are mounted. With an
    explicit ``name``, a backend that cannot work raises :class:`BackendUnavailableError`
    with the reason and the fix.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    if name != "auto":
        if name not in _CLASSES:
            raise BackendUnavailableError(
                name, f"unknown backend; choose auto, {', '.join(BACKEND_NAMES)}"
            )
        try:
            return _try(name, scratch, flavor, policy), []
        except BackendUnavailableError as exc:
            if "to fix:" in exc.reason:
                raise
            raise BackendUnavailableError(
                exc.backend, f"{exc.reason}; to fix: {_FIX[name]}"
            ) from exc
    skipped: list[Reason] = []
    for candidate in BACKEND_NAMES:
        try:
            return _try(candidate, scratch, flavor, policy), skipped
        except BackendUnavailableError as exc:
            skipped.append(Reason(f"{exc.backend}: {exc.reason}", skipped_short(exc)))
    raise BackendUnavailableError("auto", "no backend works here: " + " | ".join(skipped))


# ---- doctor: what works here, why not, and the fix ------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One backend on this machine: whether it ``works``, ``why`` not in a user's words,
    ``fix``, the exact change that would make it work (``""`` when none is known), and
    ``detail``, the full technical reason."""

    backend: str
    works: bool
    why: str = ""
    fix: str = ""
    detail: str = ""

    def line(self) -> str:
        """``"overlay   no   why; fix: ..."``, as ``pytest-layers doctor`` prints it."""
        if self.works:
            return f"{self.backend:<9} works"
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.backend:<9} no: {self.why}{fix}"


_DOCKER_MOUNT = "docker run --privileged, or --cap-add SYS_ADMIN --security-opt seccomp=unconfined"

_NOT_ENTERED_FIX = "remove layers_mount_namespace = host, or run as root"

# (words found in a backend's reason, the reason in a user's words, the fix), first match wins;
# causes that block every mount come before the store's place, which alone leaves fuse and copy.
# The last item is the fix in the few words the one-line report header has room for.
_ADVICE: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (
        (namespaces.USERNS_NO_MOUNT, "apparmor_restrict_unprivileged_userns"),
        "AppArmor lets this user create a user namespace but not mount in it (Ubuntu 23.10+, "
        "GitHub's ubuntu-24.04 runners)",
        namespaces.APPARMOR_SYSCTL_FIX,
        namespaces.APPARMOR_SYSCTL_FIX,
    ),
    (
        ("max_user_namespaces = 0",),
        "user namespaces are switched off",
        "sudo sysctl -w user.max_user_namespaces=15000",
        "sudo sysctl -w user.max_user_namespaces=15000",
    ),
    (
        ("unprivileged_userns_clone = 0",),
        "unprivileged user namespaces are switched off",
        "sudo sysctl -w kernel.unprivileged_userns_clone=1",
        "sudo sysctl -w kernel.unprivileged_userns_clone=1",
    ),
    (
        ("refused an unprivileged user namespace",),
        "the kernel refuses user namespaces to this process (a seccomp filter, as Docker's "
        "default profile)",
        "docker run --security-opt seccomp=unconfined, or run the tests as root with "
        "--cap-add SYS_ADMIN",
        "docker run --security-opt seccomp=unconfined",
    ),
    (
        (namespaces.MOUNT_REFUSED,),
        "mounting is refused (Docker's default seccomp profile, or no CAP_SYS_ADMIN)",
        _DOCKER_MOUNT,
        "docker run --privileged",
    ),
    (
        ("whiteouts as 'marker'",),
        "the store is on overlayfs (a container's own filesystem), which kernel overlay cannot "
        "stack on",
        "put the store on a volume: docker run -v layers-store:/store ... and "
        "pytest --layers-store=/store (any ext4, xfs, btrfs or tmpfs directory works)",
        "a volume for --layers-store",
    ),
    (
        ("not root and not in a user namespace",),
        "not root, and the session does not enter a user namespace",
        _NOT_ENTERED_FIX,
        "remove layers_mount_namespace = host",
    ),
    (
        ("fuse-overlayfs is not installed",),
        "fuse-overlayfs is not installed",
        "sudo apt-get install fuse-overlayfs",
        "apt-get install fuse-overlayfs",
    ),
    (
        ("/dev/fuse does not exist",),
        "/dev/fuse is missing (a container gets none by default)",
        "docker run --device /dev/fuse --cap-add SYS_ADMIN --security-opt seccomp=unconfined "
        "(outside a container: sudo modprobe fuse)",
        "docker run --device /dev/fuse",
    ),
    (
        ("/dev/fuse is not usable",),
        "/dev/fuse is not readable and writable by this user",
        "sudo chmod 0666 /dev/fuse",
        "chmod 0666 /dev/fuse",
    ),
    (
        ("Operation not permitted", "Permission denied"),
        "mounting is refused (a seccomp filter or missing capabilities)",
        _DOCKER_MOUNT,
        "docker run --privileged",
    ),
)


def explain(backend: str, reason: str) -> Finding:
    """The :class:`Finding` of a backend that failed with ``reason``: its cause in a user's
    words and this machine's fix, or the reason itself when no known cause matches."""
    for needles, why, fix, _short in _ADVICE:
        if any(n in reason for n in needles):
            return Finding(backend, False, why, fix, reason)
    return Finding(backend, False, shorten(reason, 100), "", reason)


def diagnose(
    scratch: Path,
    *,
    flavor: Flavor = "overlay",
    policy: MountPolicy | None = None,
    namespace_reason: str = "",
) -> list[Finding]:
    """Try every backend here (each its own trial mount) and say what works and, for each
    that does not, why and the fix. ``namespace_reason`` is why the process could not enter
    its namespace (root's private one or a user namespace): overlay's real cause then."""
    findings = []
    for name in BACKEND_NAMES:
        try:
            _try(name, scratch, flavor, policy)
        except BackendUnavailableError as exc:
            reason = exc.reason
            if name == "overlay" and os.geteuid() != 0 and "not permitted here" in reason:
                # Inside a user namespace (ours, inherited) and still refused: AppArmor's
                # restriction withholds the namespace's capabilities exactly so.
                reason = f"{namespaces.USERNS_NO_MOUNT}: {reason}"
            finding = explain(exc.backend, reason)
            if name == "overlay" and namespace_reason:
                # The namespace is the first thing overlay needs: its failure comes first.
                first = explain(exc.backend, namespace_reason)
                if first.why != finding.why and flavor != "overlay":
                    first = Finding(
                        first.backend,
                        False,
                        f"{first.why}; and {finding.why}",
                        "; and ".join(f for f in (first.fix, finding.fix) if f),
                        f"{namespace_reason}; {exc.reason}",
                    )
                finding = first
            findings.append(finding)
            continue
        findings.append(Finding(_label(name), True))
    return findings


def measure_cost(backend: Backend, scratch: Path, *, files: int = 1000, rounds: int = 5) -> float:
    """The median milliseconds of one test's view (open, one write, close) on an image of
    ``files`` small files made in ``scratch`` (removed after)."""
    import statistics
    import time

    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cost-", dir=scratch))
    try:
        lower = work / "lower"
        for i in range(files):
            sub = lower / f"d{i // 100}"
            if i % 100 == 0:
                sub.mkdir(parents=True)
            (sub / f"f{i}").write_bytes(b"x" * 64)
        times = []
        for r in range(rounds):
            view_scratch = work / f"view{r}"
            view_scratch.mkdir()
            start = time.perf_counter()
            view = backend.open([lower], view_scratch)
            try:
                (view.path / "written").write_bytes(b"test\n")
            finally:
                view.close()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    finally:
        namespaces.remove_tree(work)


def fixes_for(reasons: str, *, short: bool = False) -> list[str]:
    """Every known fix for the causes named in ``reasons`` (the session's joined reasons for
    skipping faster backends), most decisive first; ``short``: the few words the one-line
    report header has room for."""
    found = [
        (fix, brief) for needles, _why, fix, brief in _ADVICE if any(n in reasons for n in needles)
    ]
    if len(found) > 1:
        # Overlay's "not in a user namespace" only repeats a namespace failure named before.
        found = [f for f in found if f[0] != _NOT_ENTERED_FIX]
    return list(dict.fromkeys(brief if short else fix for fix, brief in found))
