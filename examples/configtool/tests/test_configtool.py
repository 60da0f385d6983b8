"""configtool against layered /etc trees: each test gets a private copy-on-write /etc."""

from __future__ import annotations

import pytest


def test_get_default(configtool):
    assert configtool("get", "log.level") == (0, "info\n", "")


def test_get_missing(configtool):
    code, _, err = configtool("get", "nope")
    assert code == 1
    assert "nope: not set" in err


def test_set_writes_only_the_local_file(configtool, rootfs):
    assert configtool("set", "app.debug", "true")[0] == 0
    assert configtool("get", "app.debug")[1] == "true\n"
    assert [str(c) for c in rootfs.diff()] == [
        "C /etc",
        "C /etc/configtool.d",
        "A /etc/configtool.d/99-local.conf",
    ]


def test_each_test_starts_pristine(configtool, rootfs):
    # test_set_writes_only_the_local_file wrote 99-local.conf; this test never sees it.
    assert not (rootfs / "etc/configtool.d/99-local.conf").exists()
    assert configtool("get", "app.debug")[1] == "false\n"


@pytest.mark.layer("etc_app")
class TestWithApp:
    def test_app_overrides_defaults(self, configtool):
        assert configtool("list")[1] == (
            "app.debug = false\napp.port = 8080\napp.workers = 4\nlog.level = info\n"
        )

    def test_unset_removes_key_everywhere(self, configtool, rootfs):
        assert configtool("unset", "app.debug")[0] == 0
        assert configtool("get", "app.debug")[0] == 1
        changes = [str(c) for c in rootfs.diff()]
        assert "C /etc/configtool.d/00-defaults.conf" in changes
        assert "C /etc/configtool.d/50-app.conf" in changes

    def test_image_chain(self, rootfs):
        assert [x.name for x in rootfs.layers] == ["etc_base", "etc_app"]
        assert not (rootfs / "etc/hosts").exists()


@pytest.mark.layer("etc_app", init={"etc/hostname": "web-1\n"})
def test_init_files_are_not_changes(configtool, rootfs):
    assert (rootfs / "etc/hostname").read_text() == "web-1\n"
    configtool("set", "log.level", "debug")
    assert "/etc/hostname" not in [c.path for c in rootfs.diff()]


@pytest.mark.layer("etc_app", readonly=True)
def test_readonly_rootfs_refuses_writes(configtool):
    code, _, err = configtool("set", "a", "b")
    assert code != 0
    assert "Read-only file system" in err


@pytest.mark.layer("zoneinfo", "etc_app")
@pytest.mark.parametrize("n", range(20))
def test_large_tree_costs_nothing_per_test(rootfs, configtool, n):
    # 10,000 files are visible to every test without a copy: the view is an overlay.
    region = rootfs / f"usr/share/zoneinfo/region{n:02d}"
    assert len(list(region.iterdir())) == 100
    (region / "city00").write_text("changed\n")
    assert configtool("get", "app.workers")[1] == "4\n"
    assert [str(c) for c in rootfs.diff()][-1] == f"C /usr/share/zoneinfo/region{n:02d}/city00"
