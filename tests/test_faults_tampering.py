"""Faults, group 4: a store that was tampered with, is too new, or cannot be written.

* One byte changed in a stored layer file: ``--layers-verify`` stops the session and
  ``pytest-layers verify`` exits 1, both naming the layer and the path (without the option the
  session does not look, which is what the option is for).
* ``VERSION`` naming a newer format: every entry point refuses with a message that says so and
  how to proceed, and no layer is written.
* A store directory the (ordinary) user cannot write: the problem is reported at session start,
  and tests needing a layer fail with that one clear message, not a traceback from inside the
  store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from faults_util import cli, out, pytest_command, run_session, write_project

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.requires_overlay]

CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    for i in range(10):
        (root / "etc" / f"f{i}").write_text(f"line {i}\\n" * 10)

@layer(parent=base)
def app(root):
    (root / "etc/app.conf").write_text("debug=false\\n")
"""

TESTS = """
import pytest

@pytest.mark.layer("app")
def test_reads(rootfs):
    assert (rootfs / "etc/app.conf").read_text() == "debug=false\\n"

def test_without_layers():
    pass
"""


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01  # same size: only the content digest can tell
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _layer_dir(store: Path, name: str) -> tuple[str, Path]:
    chain_id = json.loads((store / "refs" / "names" / name).read_text())["chain_id"]
    return chain_id, store / "layers" / chain_id.split(":", 1)[1]


def test_changed_byte_is_named_by_layers_verify_and_cli(pytester: pytest.Pytester) -> None:
    path = pytester.path
    store = write_project(path, CONFTEST, TESTS)
    first = run_session(path)
    assert first.returncode == 0, out(first)
    chain_id, layer_dir = _layer_dir(store, "base")
    _flip_byte(layer_dir / "diff" / "etc" / "f7")

    # The session without --layers-verify does not re-hash (that is the option's job).
    unchecked = run_session(path)
    assert unchecked.returncode == 0, out(unchecked)

    checked = run_session(path, "--layers-verify")
    assert checked.returncode == 1, out(checked)
    text = checked.stdout + checked.stderr
    assert "--layers-verify" in text, out(checked)
    assert "/etc/f7" in text, out(checked)
    assert f"layer {chain_id.split(':', 1)[1][:12]}" in text, out(checked)
    assert "(base)" in text, out(checked)
    assert "1 passed" in checked.stdout  # the test without layers still ran

    proc = cli(store, "verify")
    assert proc.returncode == 1, out(proc)
    assert "(base): /etc/f7" in proc.stdout, out(proc)
    assert "Traceback" not in proc.stderr

    # Verifying only a ref's chain finds it too; the other layer is clean.
    assert cli(store, "verify", "app").returncode == 1
    (layer_dir / "diff" / "etc" / "f7").unlink()
    proc = cli(store, "verify")
    assert "(base): /etc/f7" in proc.stdout, out(proc)
    assert "removed" in proc.stdout, out(proc)


def test_store_of_a_newer_format_is_refused(pytester: pytest.Pytester) -> None:
    path = pytester.path
    store = write_project(path, CONFTEST, TESTS)
    assert run_session(path).returncode == 0
    version = json.loads((store / "VERSION").read_text())
    version["format"] += 1
    (store / "VERSION").write_text(json.dumps(version))
    layers_before = sorted(p.name for p in (store / "layers").iterdir())

    proc = run_session(path)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, out(proc)
    assert f"format version {version['format']}" in text, out(proc)
    assert "newer" in text, out(proc)
    assert "upgrade pytest-layers" in text, out(proc)
    assert "Traceback" not in text, out(proc)
    assert "store.py:" not in text, out(proc)

    for verb in (["ls"], ["verify"], ["prune"]):
        res = cli(store, *verb)
        assert res.returncode == 1, out(res)
        assert "newer" in res.stderr, out(res)
        assert "Traceback" not in res.stderr, out(res)
        assert len(res.stderr.strip().splitlines()) == 1, out(res)
    assert sorted(p.name for p in (store / "layers").iterdir()) == layers_before


@pytest.mark.requires_user
def test_unwritable_store_is_a_clear_error_at_session_start(user_tmp_path: Path) -> None:
    from conftest import run_as_user

    path = user_tmp_path
    store = Path(f"{path}-root-store")
    store.mkdir(mode=0o755)  # root's, not writable by the test user
    try:
        write_project(path, CONFTEST, TESTS, store=store)
        proc = run_as_user(pytest_command(), cwd=path, env={"PYTHONDONTWRITEBYTECODE": "1"})
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, out(proc)
        header = text.split("collected", 1)[0]
        # Another user's store is refused before anything is written to it.
        assert f"{store} belongs to uid 0 (root), not to you" in header, out(proc)
        assert "--layers-store" in header, out(proc)
        # Mid-test: the same message, not a traceback through the store's code.
        assert "store.py:" not in text, out(proc)
        assert "Traceback" not in text, out(proc)
        assert "1 passed" in proc.stdout, out(proc)
        assert list(store.iterdir()) == []
    finally:
        for sub in sorted(store.rglob("*"), reverse=True):
            sub.rmdir() if sub.is_dir() else sub.unlink()
        store.rmdir()
