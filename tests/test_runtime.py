"""The runtime (``pytest_layers.runtime``) without a pytest session: a store opened, a backend
chosen and described, the session's scratch made and removed. Entering a namespace is left to
the plugin's and the CLI's own tests (it would move this test process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_layers import runtime
from pytest_layers.backends.copy import CopyBackend
from pytest_layers.backends.detect import Reason
from pytest_layers.errors import LayersError
from pytest_layers.runtime import Choice, Runtime


def test_a_joined_runtime_uses_the_given_choice_and_cleans_up(tmp_path: Path) -> None:
    rt = Runtime.join(tmp_path / "store", Choice(name="copy", label="copy", namespace="host"))
    session = rt.start(tmp_path)
    assert rt.backend is not None
    assert rt.backend.name == "copy"
    assert session.backend is rt.backend
    assert rt.scratch is not None
    assert rt.scratch.is_dir()
    assert rt.scratch.parent == tmp_path / "store" / "scratch" / "views"
    assert rt.pool() is None  # no pool unless a depth is given
    rt.close()
    assert not rt.scratch.exists()
    assert os.listdir(tmp_path / "store" / "scratch" / "views") == []


def test_the_default_choice_tries_the_candidates_in_order(tmp_path: Path) -> None:
    rt = Runtime.join(tmp_path / "store", Choice())
    made = rt.choose(["copy"])
    assert made is not None
    assert made[0].name == "copy"
    assert str(made[1]) == ""
    rt.store.close()


def test_the_choice_says_why_in_full_and_in_a_few_words() -> None:
    before = Choice(reason="no user namespace: disabled", why="no user namespace", namespace="host")
    reason = Reason("overlay: needs a namespace; fuse: /dev/fuse is missing", "overlay; fuse")
    got = runtime._compose(before, CopyBackend(), reason)
    assert got.name == "copy"
    assert got.namespace == "host"
    assert got.reason == (
        "no user namespace: disabled; overlay: needs a namespace; fuse: /dev/fuse is missing"
    )
    # The namespace is the cause: overlay's own short reason only repeats it.
    assert got.why == "no user namespace; fuse"
    assert Choice.from_dict(got.to_dict()) == Choice(
        name=got.name, label=got.label, reason=got.reason, why=got.why, namespace="host"
    )


def test_a_runtime_without_a_backend_opens_no_view(tmp_path: Path) -> None:
    rt = Runtime.join(tmp_path / "store", Choice())
    with pytest.raises(LayersError, match="no backend yet"):
        rt.open_view([])
    rt.store.close()


def test_a_command_runtime_opens_views_in_its_scratch(tmp_path: Path) -> None:
    store = runtime.open_store(tmp_path / "store")
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "a").write_text("x")
    with store.staging() as scratch:
        rt = Runtime.for_command(store, scratch, backend="copy")
        view = rt.open_view([layer])
        assert view.path.is_relative_to(scratch)
        assert (view.path / "a").read_text() == "x"
        view.close()
    store.close()


def test_open_store_names_what_is_wrong(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(LayersError, match="file"):
        runtime.open_store(afile)
    with pytest.raises(FileNotFoundError, match=r"^no store here$"):
        runtime.open_store(tmp_path / "nothing", missing="no store here")
    assert not (tmp_path / "nothing").exists()
