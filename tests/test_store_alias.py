"""Store aliases: a stored layer recorded at another chain position (a union image's) without a
copy of its tree; layer_dir, chain, prune, verify and export go through the alias."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from treeutil import make_tree

from pytest_layers import errors, layertar, oci
from pytest_layers.store import Store


def _add(store: Store, spec: dict[str, str], parent: str | None = None) -> str:
    with store.staging() as staged:
        make_tree(staged, spec)
        return store.add_layer(staged, parent=parent, name=None, source="build").chain_id


@pytest.fixture
def union(tmp_path: Path) -> tuple[Store, dict[str, str]]:
    """base <- tools, and other (a second base): ``tools`` placed on ``other`` is the alias."""
    store = Store(tmp_path / "store")
    ids = {"base": _add(store, {"etc/os-release": "ID=demo\n"})}
    ids["tools"] = _add(store, {"bin/tool": "#!/bin/sh\n"}, parent=ids["base"])
    ids["other"] = _add(store, {"srv/data": "d" * 100})
    tools = store.layer_info(ids["tools"])
    other = store.layer_info(ids["other"])
    ids["alias"] = layertar.chain_id([other.diff_id, tools.diff_id])
    return store, ids


def test_alias_shares_the_target_tree(union: tuple[Store, dict[str, str]]) -> None:
    store, ids = union
    size_before = store.size()
    info = store.add_alias(ids["alias"], ids["tools"], parent=ids["other"])
    assert (info.chain_id, info.parent, info.alias_of) == (ids["alias"], ids["other"], ids["tools"])
    assert info.diff_id == store.layer_info(ids["tools"]).diff_id
    # No copy: the alias's tree is the target's own directory, same inodes, and the store's
    # size (bytes held) did not grow.
    assert store.layer_dir(ids["alias"]) == store.layer_dir(ids["tools"])
    alias_root = store.root / "layers" / ids["alias"][7:]
    assert sorted(os.listdir(alias_root)) == ["layer.json"]
    target_file = store.layer_dir(ids["tools"]) / "bin/tool"
    assert (store.layer_dir(ids["alias"]) / "bin/tool").stat().st_ino == target_file.stat().st_ino
    assert store.size() == size_before
    # A fresh instance (nothing cached) reads the same.
    fresh = Store(store.root)
    assert fresh.layer_dir(ids["alias"]) == fresh.layer_dir(ids["tools"])
    assert [i.chain_id for i in fresh.chain(ids["alias"])] == [ids["other"], ids["alias"]]
    assert json.loads((alias_root / "layer.json").read_text())["alias_of"] == ids["tools"]
    # Idempotent, and a commit on top of the alias is an ordinary layer.
    assert store.add_alias(ids["alias"], ids["tools"], parent=ids["other"]) == info
    top = _add(store, {"bin/tool": "patched"}, parent=ids["alias"])
    assert [i.chain_id for i in store.chain(top)] == [ids["other"], ids["alias"], top]
    assert store.verify() == []


def test_alias_of_an_alias_points_at_the_real_layer(union: tuple[Store, dict[str, str]]) -> None:
    store, ids = union
    store.add_alias(ids["alias"], ids["tools"], parent=ids["other"])
    third = _add(store, {"x": "x"})
    again = layertar.chain_id(
        [store.layer_info(third).diff_id, store.layer_info(ids["tools"]).diff_id]
    )
    info = store.add_alias(again, ids["alias"], parent=third)
    assert info.alias_of == ids["tools"]
    assert store.layer_dir(again) == store.layer_dir(ids["tools"])


def test_bad_aliases_are_refused(union: tuple[Store, dict[str, str]]) -> None:
    store, ids = union
    with pytest.raises(ValueError, match="that position's chain id is sha256:"):
        store.add_alias(ids["alias"], ids["tools"], parent=ids["base"])
    with pytest.raises(errors.LayerNotFoundError):
        store.add_alias(ids["alias"], "sha256:" + "0" * 64, parent=ids["other"])
    assert not store.has_layer(ids["alias"])
    assert os.listdir(store.root / "tmp") == []


def test_prune_keeps_the_target_while_an_alias_is_reachable(
    union: tuple[Store, dict[str, str]],
) -> None:
    store, ids = union
    store.add_alias(ids["alias"], ids["tools"], parent=ids["other"])
    top = _add(store, {"bin/tool": "patched"}, parent=ids["alias"])
    store.add_snapshot("test_x.py::test_union", top, keep=3)
    report = store.prune()
    # Only the snapshot refers to anything: its chain is other <- alias <- top, and the alias
    # keeps tools (its tree) and so tools' parent base.
    assert report.removed_layers == []
    assert (store.layer_dir(top) / "bin/tool").read_text() == "patched"
    assert (store.layer_dir(ids["alias"]) / "bin/tool").read_text() == "#!/bin/sh\n"
    # Disk use counts the alias's tree (its target's) once, and its own small layer.json.
    freed_expected = store.disk_use([*ids.values(), top])
    report = store.prune(keep_snapshots=0)
    assert sorted(report.removed_layers) == sorted([*ids.values(), top])
    assert report.freed_bytes == freed_expected
    assert store.layers() == []


def test_verify_hashes_the_target_once_and_checks_the_alias(
    union: tuple[Store, dict[str, str]],
) -> None:
    store, ids = union
    store.add_alias(ids["alias"], ids["tools"], parent=ids["other"])
    (store.layer_dir(ids["tools"]) / "bin/tool").write_text("#!/bin/bash\n")
    problems = store.verify()
    assert [(p.chain_id, p.path) for p in problems] == [(ids["tools"], "bin/tool")]
    # Verifying only the alias still reaches the tree it reads, named after the real layer.
    problems = Store(store.root).verify([ids["alias"]])
    assert [(p.chain_id, p.path) for p in problems] == [(ids["tools"], "bin/tool")]
    (store.layer_dir(ids["tools"]) / "bin/tool").write_text("#!/bin/sh\n")
    # An alias whose layer.json disagrees with its target is reported.
    path = store.root / "layers" / ids["alias"][7:] / "layer.json"
    data = json.loads(path.read_text())
    data["diff_id"] = "sha256:" + "1" * 64
    path.write_text(json.dumps(data))
    messages = [str(p) for p in Store(store.root).verify([ids["alias"]])]
    assert any("alias of " + ids["tools"] in m for m in messages), messages


def test_alias_exports_as_an_ordinary_image(
    union: tuple[Store, dict[str, str]], tmp_path: Path
) -> None:
    store, ids = union
    store.add_alias(ids["alias"], ids["tools"], parent=ids["other"])
    result = oci.export_image(store, ids["alias"], tmp_path / "img", format="oci", tar=False)
    diff_ids = [store.layer_info(ids["other"]).diff_id, store.layer_info(ids["tools"]).diff_id]
    assert result.diff_ids == diff_ids
    assert result.chain_ids == [ids["other"], ids["alias"]]
    other = Store(tmp_path / "other-store")
    imported = oci.import_image(other, tmp_path / "img")
    assert imported.chain_id == ids["alias"]
    assert (other.layer_dir(ids["alias"]) / "bin/tool").read_text() == "#!/bin/sh\n"
