"""Errors are built whole by their constructors, pickle with their fields, and the glue never
turns an error into a test failure from inside an ``except`` block."""

from __future__ import annotations

import ast
import errno
import pickle
from pathlib import Path

import pytest

import pytest_layers
from pytest_layers.errors import LayerNotFoundError, LockTimeoutError, MountError


def test_mount_error_of_a_syscall() -> None:
    exc = MountError.of(errno.EINVAL, "fsconfig", "lowerdir", "overlayfs: bad lowerdir")
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EINVAL
    assert (exc.operation, exc.target) == ("fsconfig", "lowerdir")
    assert exc.reason == "Invalid argument (overlayfs: bad lowerdir)"
    assert (
        str(exc)
        == "[Errno 22] fsconfig(lowerdir) failed: Invalid argument (overlayfs: bad lowerdir)"
    )
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.operation, copy.target, copy.reason, str(copy)) == (
        exc.operation,
        exc.target,
        exc.reason,
        str(exc),
    )


def test_mount_error_without_target_or_detail() -> None:
    exc = MountError.of(errno.EPERM, "unshare", None)
    assert str(exc) == "[Errno 1] unshare failed: Operation not permitted"
    plain = MountError(errno.EBUSY, "still mounted")
    assert (plain.operation, plain.target, plain.reason) == ("", None, "")


def test_lock_timeout_error_names_key_and_lock() -> None:
    exc = LockTimeoutError("abc123", "/store/locks/abc123.lock", 2.5)
    assert isinstance(exc, TimeoutError)
    assert exc.errno == errno.ETIMEDOUT
    assert (exc.key, exc.lock_file, exc.waited) == ("abc123", "/store/locks/abc123.lock", 2.5)
    assert str(exc).startswith("waited 2.5 s for another process building cache key 'abc123'")
    assert "/store/locks/abc123.lock" in str(exc)
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.key, copy.lock_file, str(copy)) == (exc.key, exc.lock_file, str(exc))


def test_layer_not_found_is_a_lookup_error_with_its_where() -> None:
    exc = LayerNotFoundError(
        "nope", known=["b", "a"], hint="define it", where="@pytest.mark.layer: "
    )
    assert isinstance(exc, LookupError)
    assert str(exc) == "@pytest.mark.layer: unknown layer 'nope'; known layers: a, b (define it)"
    assert pickle.loads(pickle.dumps(exc)).where == exc.where


def _fails_inside_except(path: Path) -> list[int]:
    lines = []
    for handler in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(handler, ast.ExceptHandler):
            for node in ast.walk(handler):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "fail"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "pytest"
                ):
                    lines.append(node.lineno)
    return lines


def test_no_pytest_fail_inside_except(tmp_path: Path) -> None:
    """``pytest.fail`` in an ``except`` block prints the chained traceback the one-line
    report is meant to avoid: the glue raises after the block."""
    package = Path(pytest_layers.__file__).parent
    found = {str(p): _fails_inside_except(p) for p in package.rglob("*.py")}
    assert {p: lines for p, lines in found.items() if lines} == {}
    bad = tmp_path / "bad.py"
    bad.write_text("try:\n    pass\nexcept OSError:\n    pytest.fail('x')\n")
    assert _fails_inside_except(bad) == [4]


def test_unknown_layer_by_name_outside_a_test() -> None:
    from pytest_layers import definitions

    with pytest.raises(LookupError, match="unknown layer 'no_such_layer_anywhere'"):
        definitions.lookup("no_such_layer_anywhere")
