"""The store, the change-list engine, the tar engine and the OCI module are split into rooms
with one job each; their public faces keep every name users and tests import."""

from __future__ import annotations

import importlib
import inspect

import pytest

FACES = [
    "pytest_layers.store",
    "pytest_layers.changeset",
    "pytest_layers.layertar",
    "pytest_layers.oci",
]


@pytest.mark.parametrize("face", FACES)
def test_every_public_name_is_there_and_its_classes_say_where(face: str) -> None:
    module = importlib.import_module(face)
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) and not issubclass(value, BaseException):
            assert value.__module__ == face, f"{face}.{name} says it lives in {value.__module__}"


def test_the_names_earlier_releases_imported_still_import() -> None:
    from pytest_layers.changeset import (  # noqa: F401
        Change,
        Entry,
        ImageView,
        changes_from_tree,
        changes_from_upper,
        data_extents,
        write_layer,
    )
    from pytest_layers.layertar import (  # noqa: F401
        DEFAULT_EPOCH,
        InvalidLayerError,
        Limits,
        apply_layer_tar,
        chain_id,
        stream_layer,
        write_layer_tar,
    )
    from pytest_layers.oci import (  # noqa: F401
        MEDIA_TYPE_LAYER,
        ExportResult,
        default_tag,
        export_image,
        import_image,
    )
    from pytest_layers.store import (  # noqa: F401
        MAX_CHAIN_LENGTH,
        LayerInfo,
        Store,
        build_manifest,
        disk_use,
        filesystem_type,
        preflight,
        probe_flavor,
    )


def test_store_is_assembled_from_its_rooms() -> None:
    from pytest_layers import _storecore, _storegc, _storerefs, _storewrite
    from pytest_layers.store import Store

    assert issubclass(Store, _storewrite._StoreWriter)
    assert issubclass(Store, _storegc._StoreMaintenance)
    assert issubclass(Store, _storerefs._StoreRefs)
    assert issubclass(Store, _storecore._StoreCore)
    # Each public method is defined once, in one room.
    for name in ("add_layer", "write_layer", "prune", "verify", "resolve", "chain", "staging"):
        owners = [c for c in Store.__mro__ if name in vars(c)]
        assert len(owners) == 1, (name, owners)
