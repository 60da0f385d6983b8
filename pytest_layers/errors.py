"""Errors raised by pytest-layers.

Every error derives from :class:`LayersError` *and* from the built-in exception with the same
meaning, so callers can catch either (``except LookupError`` works for an unknown layer). Extra
fields are plain attributes, and every class pickles, because pytest-xdist ships errors between
processes.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from typing import Any

__all__ = [
    "LayersError",
    "LayerNotFoundError",
    "StoreFormatError",
    "StoreError",
    "LockTimeoutError",
    "AmbiguousRefError",
    "UnsafeEntryError",
    "InvalidLayerError",
    "BackendUnavailableError",
    "MountError",
    "TooManyLayersError",
    "LayerBuildError",
    "LayerDefinitionError",
    "NoSpaceError",
    "InvalidImageError",
    "SandboxError",
    "RegistryError",
    "RegistryAuthError",
    "RegistryNotFoundError",
    "RegistryUnreachableError",
]


class LayersError(Exception):
    """Base class of every error pytest-layers raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep attributes set after __init__ (filelock does the same for Timeout) so that the
        # error survives the trip from an xdist worker to the controller.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[LayersError], args: tuple[Any, ...], state: dict[str, Any]) -> LayersError:
    err = cls.__new__(cls, *args)
    (OSError if issubclass(cls, OSError) else Exception).__init__(err, *args)
    err.__dict__.update(state)
    return err


class LayerNotFoundError(LayersError, LookupError):
    """A layer name, ref or chain id that the store or the session does not know."""

    def __init__(
        self, ref: str, known: list[str] | None = None, hint: str = "", *, where: str = ""
    ) -> None:
        self.ref = ref
        self.known = sorted(known) if known is not None else None
        #: What named the layer (``"@pytest.mark.layer: "``), the message's prefix.
        self.where = where
        msg = f"{where}unknown layer {ref!r}"
        if self.known is not None:
            msg += f"; known layers: {', '.join(self.known) if self.known else '(none)'}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class StoreError(LayersError, OSError):
    """The store cannot be used as it is (permissions, ownership, corruption, layout).

    Built as ``StoreError(errno, message[, path])``: it prints as the message alone, a
    sentence that names the path already (OSError's ``[Errno N] message: 'path'`` said the
    path twice)."""

    def __str__(self) -> str:
        if self.strerror:
            return str(self.strerror)
        return super().__str__()


class LockTimeoutError(StoreError, TimeoutError):
    """Waiting for a store lock (a build-cache key, for one) took longer than its timeout.

    ``key`` is the build-cache key, ``lock_file`` the lock's path, ``waited`` the seconds."""

    def __init__(self, key: str, lock_file: str, waited: float) -> None:
        self.key = key
        self.lock_file = lock_file
        self.waited = waited
        super().__init__(
            _errno.ETIMEDOUT,
            f"waited {waited:g} s for another process building cache key {key!r} "
            f"(lock {lock_file}); if no pytest-layers process is running, the holder is "
            "stuck: stop it, or raise the timeout",
        )


class AmbiguousRefError(LayersError, LookupError):
    """A hex prefix matches more than one chain id (or diff_id); ``candidates`` lists them."""

    def __init__(self, ref: str, candidates: list[str], hint: str = "") -> None:
        self.ref = ref
        self.candidates = sorted(candidates)
        super().__init__(
            f"ambiguous layer reference {ref!r} matches {len(self.candidates)} layers: "
            f"{', '.join(self.candidates)}; {hint or 'give more hex digits'}"
        )


class StoreFormatError(LayersError, ValueError):
    """The store was written by an unknown or newer format version."""


class UnsafeEntryError(LayersError, ValueError):
    """A tar entry or tree entry would escape the root, or is not allowed in a layer.

    ``entry`` names the offending path as it appears in the input.
    """

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        self.reason = reason
        super().__init__(f"{entry!r}: {reason}")


class InvalidLayerError(LayersError, ValueError):
    """A layer's content breaks the OCI layer rules (a real file named ``.wh.*``, for one).
    ``path``: the entry at fault, relative to the layer, when the error is about one."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class BackendUnavailableError(LayersError, OSError):
    """A mount backend cannot work on this machine; ``reason`` says why in one line."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(_errno.ENOTSUP, f"{backend}: {reason}")

    def __str__(self) -> str:
        return f"{self.backend} backend unavailable: {self.reason}"


class MountError(LayersError, OSError):
    """A mount or unmount failed; carries errno and the target.

    ``MountError(errno, message)`` for a failure we describe ourselves;
    ``MountError.of(errno, operation, target, detail)`` for a failed syscall: the message is
    ``operation(target) failed: reason``, where ``reason`` is ``os.strerror(errno)`` and, when
    given, the kernel's own ``detail`` (an fs_context log)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        operation: str = "",
        target: str | None = None,
        reason: str = "",
    ) -> None:
        self.operation = operation  # the syscall, e.g. "fsconfig"
        self.target = target  # its path or key
        self.reason = reason  # os.strerror(errno), and what the kernel said
        super().__init__(code, message)

    @classmethod
    def of(cls, code: int, operation: str, target: str | None, detail: str = "") -> MountError:
        """The error of the syscall ``operation`` on ``target`` failing with ``code``."""
        reason = _os.strerror(code) + (f" ({detail})" if detail else "")
        where = f"{operation}({target})" if target is not None else operation
        return cls(
            code, f"{where} failed: {reason}", operation=operation, target=target, reason=reason
        )


class TooManyLayersError(LayersError, ValueError):
    """An image has more layers than the kernel can stack in one overlay mount."""


class NoSpaceError(LayersError, OSError):
    """The store's filesystem ran out of space while writing a layer."""

    def __init__(self, what: str, path: str) -> None:
        self.what = what
        self.path = path  # also after a trip through xdist, which keeps only errno and strerror
        super().__init__(_errno.ENOSPC, f"no space left on device while writing {what}", path)

    def __str__(self) -> str:
        return (
            f"[Errno {self.errno}] {self.strerror} to the store {self.path}: free space on its "
            "filesystem, or point the store at a bigger one (pytest --layers-store PATH, ini "
            "layers_store; pytest-layers --store PATH)"
        )


class LayerBuildError(LayersError, RuntimeError):
    """A ``@layer`` builder raised, or left content a layer may not hold."""


class LayerDefinitionError(LayersError, ValueError):
    """A ``@layer`` or ``@pytest.mark.layer`` is used wrongly (bad argument, cycle, bad path)."""


class InvalidImageError(LayersError, ValueError):
    """An OCI image or docker-archive that cannot be imported: a missing or corrupt blob, an
    unknown media type, a DiffID that does not match the image config.

    ``what`` names the culprit (a layer, a blob, a file of the layout).
    """

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class SandboxError(LayersError, OSError):
    """A program could not be started inside an image: the sandbox could not be set up, or the
    program is not in the image (``errno.ENOENT``). The message names the step and the cause."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


class RegistryError(LayersError, OSError):
    """A registry refused or failed a request, or cannot be used as configured.

    ``registry`` is ``HOST[:PORT]``, ``repository`` the repository (or ``""``); no credential
    ever appears in the message.
    """

    def __init__(self, registry: str, repository: str, reason: str, code: int = 0) -> None:
        self.registry = registry
        self.repository = repository
        self.reason = reason
        where = f"{registry}/{repository}" if repository else registry
        super().__init__(code or _errno.EIO, f"{where}: {reason}" if where else reason)

    def __str__(self) -> str:
        return str(self.strerror)


class RegistryAuthError(RegistryError, PermissionError):
    """The registry wants credentials we do not have, or refused the ones we sent (401/403)."""


class RegistryNotFoundError(RegistryError, FileNotFoundError):
    """The registry has no such repository, tag, manifest or blob (404)."""


class RegistryUnreachableError(RegistryError, ConnectionError):
    """The registry cannot be reached, or the connection broke during a transfer."""
