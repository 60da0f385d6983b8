"""pkginstall against layered system images.

Every test installs, upgrades or removes packages in its own private copy-on-write root, so tests
cannot see each other's changes, and ``rootfs.diff()`` says exactly which paths the installer
touched: ``A`` added, ``C`` changed (the parents of a change included), ``D`` deleted.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from pytest_layers import Rootfs

# Installing hello on `minimal`, as `docker diff` would print it.
HELLO_CHANGES = [
    "C /usr",
    "C /usr/bin",
    "A /usr/bin/hello",
    "C /usr/share",
    "C /usr/share/doc",
    "A /usr/share/doc/hello",
    "A /usr/share/doc/hello/README",
    "C /usr/share/man",
    "C /usr/share/man/man1",
    "A /usr/share/man/man1/hello.1",
    "C /var",
    "C /var/lib",
    "C /var/lib/pkgdb",
    "A /var/lib/pkgdb/hello",
    "A /var/lib/pkgdb/hello/files",
    "A /var/lib/pkgdb/hello/info",
]

SITECUSTOMIZE = "etc/python3.11/sitecustomize.py"
LOCAL_EDIT = "import faulthandler\n\nfaulthandler.enable()\n"


def changes(rootfs: Rootfs) -> list[str]:
    return [str(c) for c in rootfs.diff()]


def run(rootfs: Rootfs, command: str, *args: str) -> str:
    """Run a program the test installed, from inside the rootfs."""
    return subprocess.run(
        [str(rootfs / command), *args], capture_output=True, text=True, check=True
    ).stdout


# ---- queries: they never write, so they work on a read-only root --------------------------


@pytest.mark.layer("minimal", readonly=True)
class TestReadOnlyRoot:
    def test_list_and_verify(self, pkg):
        assert pkg("list") == (0, "base-files 12.4\nlibc 2.36\n", "")
        assert pkg("verify") == (0, "", "")

    def test_owner(self, pkg):
        assert pkg("owner", "/usr/lib/libc.so.6") == (0, "libc\n", "")
        assert pkg("owner", "/usr/share/man/man1") == (0, "base-files\n", "")
        assert pkg("owner", "/etc/hostname") == (
            1,
            "",
            "pkginstall: /etc/hostname: no package owns it\n",
        )

    def test_install_fails_with_a_message_not_a_traceback(self, pkg):
        assert pkg("install", "hello-2.12") == (
            1,
            "",
            "pkginstall: install failed at /usr/bin/hello: Read-only file system\n",
        )


# ---- installing and removing on the minimal image ------------------------------------------


@pytest.mark.layer("minimal")
class TestInstall:
    def test_install_adds_the_files_and_a_database_entry(self, pkg, rootfs):
        assert pkg("install", "hello-2.12") == (0, "", "")
        assert run(rootfs, "usr/bin/hello") == "Hello, world!\n"
        assert changes(rootfs) == HELLO_CHANGES
        assert pkg("files", "hello")[1] == (
            "/usr/\n/usr/bin/\n/usr/bin/hello\n/usr/share/\n/usr/share/doc/\n"
            "/usr/share/doc/hello/\n/usr/share/doc/hello/README\n/usr/share/man/\n"
            "/usr/share/man/man1/\n/usr/share/man/man1/hello.1\n"
        )
        assert pkg("verify", "hello") == (0, "", "")

    def test_each_test_starts_from_the_pristine_image(self, pkg, rootfs):
        # The test above installed hello into its own rw layer, which is gone now.
        assert not (rootfs / "usr/bin/hello").exists()
        assert pkg("list")[1] == "base-files 12.4\nlibc 2.36\n"

    def test_remove_takes_back_everything_install_added(self, pkg, rootfs):
        pkg("install", "hello-2.12")
        assert pkg("remove", "hello") == (0, "", "")
        # Not one file or directory left behind, nor a shared directory removed.
        assert changes(rootfs) == []

    def test_reinstalling_the_same_version_changes_nothing(self, pkg, rootfs):
        pkg("install", "hello-2.12")
        before = rootfs.diff()
        assert pkg("install", "hello-2.12") == (
            0,
            "pkginstall: hello 2.12 is already installed\n",
            "",
        )
        assert rootfs.diff() == before

    def test_missing_dependency_is_refused_before_any_write(self, pkg, rootfs):
        assert pkg("install", "python3-pip-23.0.1") == (
            1,
            "",
            "pkginstall: python3-pip 23.0.1: missing dependencies: python3 (install them first)\n",
        )
        assert changes(rootfs) == []

    def test_file_owned_by_another_package_is_refused(self, pkg, rootfs):
        pkg("install", "hello-2.12")
        assert pkg("install", "hello-ng-1.0") == (
            1,
            "",
            "pkginstall: hello-ng: usr/bin/hello is already owned by hello (remove hello first)\n",
        )
        assert changes(rootfs) == HELLO_CHANGES
        assert run(rootfs, "usr/bin/hello") == "Hello, world!\n"


# The init layer puts per-test files into the image; they are not changes of the test.
@pytest.mark.layer("minimal", init={"usr/bin/hello": "#!/bin/sh\necho 'hello, built locally'\n"})
def test_unowned_file_in_the_way_is_never_overwritten(pkg, rootfs):
    assert pkg("install", "hello-2.12") == (
        1,
        "",
        "pkginstall: hello: usr/bin/hello exists in the filesystem and no package owns it\n",
    )
    assert (rootfs / "usr/bin/hello").read_text() == "#!/bin/sh\necho 'hello, built locally'\n"
    assert changes(rootfs) == []


@pytest.mark.layer(
    "minimal",
    init={
        "etc/pkginstall.conf": "path-exclude = usr/share/doc/*\npath-exclude = usr/share/man/*\n"
    },
)
def test_path_exclude_keeps_docs_off_a_slim_image(pkg, rootfs):
    assert pkg("install", "hello-2.12") == (0, "", "")
    assert changes(rootfs) == [
        "C /usr",
        "C /usr/bin",
        "A /usr/bin/hello",
        "C /var",
        "C /var/lib",
        "C /var/lib/pkgdb",
        "A /var/lib/pkgdb/hello",
        "A /var/lib/pkgdb/hello/files",
        "A /var/lib/pkgdb/hello/info",
    ]
    # Excluded paths are not recorded either, so verify does not call them missing.
    assert "/usr/share/doc/hello/README" not in pkg("files", "hello")[1]
    assert pkg("verify") == (0, "", "")


# ---- upgrades, removals and config files on the python image -------------------------------


@pytest.mark.layer("with_python")
class TestPythonImage:
    def test_image_chain(self, rootfs, pkg):
        assert [x.name for x in rootfs.layers] == ["minimal", "with_python"]
        assert pkg("list")[1] == "base-files 12.4\nlibc 2.36\npython3 3.11.2\n"
        assert run(rootfs, "usr/bin/python3", "--version") == "Python 3.11.2\n"

    def test_dependency_present_in_the_image(self, pkg, rootfs):
        assert pkg("install", "python3-pip-23.0.1") == (0, "", "")
        assert run(rootfs, "usr/bin/pip3").startswith("pip 23.0.1 ")
        assert [c for c in changes(rootfs) if c.startswith("A ")] == [
            "A /usr/bin/pip3",
            "A /usr/lib/python3",
            "A /usr/lib/python3/dist-packages",
            "A /usr/lib/python3/dist-packages/pip",
            "A /usr/lib/python3/dist-packages/pip/__init__.py",
            "A /usr/lib/python3/dist-packages/pip/__main__.py",
            "A /usr/share/doc/python3-pip",
            "A /usr/share/doc/python3-pip/README",
            "A /var/lib/pkgdb/python3-pip",
            "A /var/lib/pkgdb/python3-pip/files",
            "A /var/lib/pkgdb/python3-pip/info",
        ]

    def test_remove_deletes_the_package_and_keeps_shared_directories(self, pkg, rootfs):
        assert pkg("remove", "python3") == (0, "", "")
        assert changes(rootfs) == [
            "C /etc",
            "D /etc/python3.11",
            "C /usr",
            "C /usr/bin",
            "D /usr/bin/python3",
            "C /usr/lib",
            "D /usr/lib/python3.11",
            "C /usr/share",
            "C /usr/share/doc",
            "D /usr/share/doc/python3",
            "C /usr/share/man",
            "C /usr/share/man/man1",
            "D /usr/share/man/man1/python3.1",
            "C /var",
            "C /var/lib",
            "C /var/lib/pkgdb",
            "D /var/lib/pkgdb/python3",
        ]
        assert pkg("owner", "/usr/share/man/man1") == (0, "base-files\n", "")

    def test_remove_refuses_while_another_package_needs_it(self, pkg, rootfs):
        assert pkg("remove", "libc") == (
            1,
            "",
            "pkginstall: libc: required by python3 (remove those first)\n",
        )
        assert changes(rootfs) == []

    def test_upgrade_replaces_changed_files_and_drops_retired_ones(self, pkg, rootfs):
        assert pkg("install", "python3-3.11.4") == (
            0,
            "pkginstall: upgraded python3 3.11.2 -> 3.11.4\n",
            "",
        )
        assert run(rootfs, "usr/bin/python3") == "Python 3.11.4\n"
        # json/ is byte-identical in both versions: rewritten, yet no change.
        assert changes(rootfs) == [
            "C /etc",
            "C /etc/python3.11",
            "C /etc/python3.11/sitecustomize.py",
            "C /usr",
            "C /usr/bin",
            "C /usr/bin/python3",
            "C /usr/lib",
            "C /usr/lib/python3.11",
            "D /usr/lib/python3.11/asynchat.py",
            "C /usr/lib/python3.11/os.py",
            "C /usr/lib/python3.11/site.py",
            "C /usr/share",
            "C /usr/share/doc",
            "C /usr/share/doc/python3",
            "C /usr/share/doc/python3/README",
            "C /usr/share/man",
            "C /usr/share/man/man1",
            "C /usr/share/man/man1/python3.1",
            "C /var",
            "C /var/lib",
            "C /var/lib/pkgdb",
            "C /var/lib/pkgdb/python3",
            "C /var/lib/pkgdb/python3/files",
            "C /var/lib/pkgdb/python3/info",
        ]
        assert pkg("verify") == (0, "", "")

    def test_upgrade_keeps_an_edited_config_and_writes_the_new_default_beside_it(self, pkg, rootfs):
        conf = rootfs / SITECUSTOMIZE
        conf.write_text(LOCAL_EDIT)
        assert pkg("install", "python3-3.11.4") == (
            0,
            f"pkginstall: {SITECUSTOMIZE} was edited locally: new default as .pkgnew\n"
            "pkginstall: upgraded python3 3.11.2 -> 3.11.4\n",
            "",
        )
        assert conf.read_text() == LOCAL_EDIT
        assert "ResourceWarning" in (rootfs / f"{SITECUSTOMIZE}.pkgnew").read_text()
        assert [c for c in changes(rootfs) if c.startswith("A ")] == [f"A /{SITECUSTOMIZE}.pkgnew"]

    def test_remove_saves_an_edited_config(self, pkg, rootfs):
        (rootfs / SITECUSTOMIZE).write_text(LOCAL_EDIT)
        assert pkg("remove", "python3") == (
            0,
            f"pkginstall: {SITECUSTOMIZE} was edited locally: saved as .pkgsave\n",
            "",
        )
        assert changes(rootfs)[:4] == [
            "C /etc",
            "C /etc/python3.11",
            f"D /{SITECUSTOMIZE}",
            f"A /{SITECUSTOMIZE}.pkgsave",
        ]
        assert (rootfs / f"{SITECUSTOMIZE}.pkgsave").read_text() == LOCAL_EDIT

    def test_verify_finds_tampered_and_missing_files_but_not_config_edits(self, pkg, rootfs):
        (rootfs / "usr/lib/python3.11/os.py").write_text("import evil\n")
        (rootfs / "usr/lib/python3.11/json/decoder.py").unlink()
        (rootfs / SITECUSTOMIZE).write_text(LOCAL_EDIT)
        assert pkg("verify") == (
            1,
            "python3: usr/lib/python3.11/os.py: modified\n"
            "python3: usr/lib/python3.11/json/decoder.py: missing\n",
            "",
        )


# ---- two images built apart, stacked into one system ---------------------------------------


@pytest.mark.layer("with_python", "with_docs")
class TestStackedImages:
    def test_databases_merge(self, pkg, rootfs):
        # minimal is shared by both chains and appears once, at the bottom.
        assert [x.name for x in rootfs.layers] == ["minimal", "with_docs", "with_python"]
        assert pkg("list")[1] == "base-files 12.4\nlibc 2.36\nmanpages 6.03\npython3 3.11.2\n"
        assert pkg("verify") == (0, "", "")
        assert sorted(os.listdir(rootfs / "usr/share/man/man1")) == [
            "cp.1",
            "ls.1",
            "mv.1",
            "python3.1",
            "rm.1",
        ]

    def test_remove_from_the_lower_image(self, pkg, rootfs):
        assert pkg("remove", "manpages") == (0, "", "")
        assert [c for c in changes(rootfs) if not c.startswith("C ")] == [
            "D /usr/share/doc/manpages",
            "D /usr/share/man/man1/cp.1",
            "D /usr/share/man/man1/ls.1",
            "D /usr/share/man/man1/mv.1",
            "D /usr/share/man/man1/rm.1",
            "D /usr/share/man/man5/fstab.5",
            "D /usr/share/man/man5/passwd.5",
            "D /usr/share/man/man7",
            "D /var/lib/pkgdb/manpages",
        ]
        assert os.listdir(rootfs / "usr/share/man/man1") == ["python3.1"]


# ---- the snapshot workflow -----------------------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("PYTEST_LAYERS_DEMO_FAILURE") != "1",
    reason="fails on purpose to show a failed test's snapshot; "
    "run with PYTEST_LAYERS_DEMO_FAILURE=1 (see examples/README.md)",
)
@pytest.mark.layer("with_python")
def test_demo_failure_upgrade_overwrites_an_edited_config(pkg, rootfs):
    """Fails on purpose: it expects an upgrade to replace an edited config file.

    pkginstall keeps the admin's edit and puts the new default beside it, as the test above
    says. The failure report names this test's snapshot: ``pytest-layers diff`` on it lists
    ``A /etc/python3.11/sitecustomize.py.pkgnew``, and ``pytest-layers shell`` lets you read
    both files.
    """
    (rootfs / SITECUSTOMIZE).write_text(LOCAL_EDIT)
    assert pkg("install", "python3-3.11.4")[0] == 0
    assert "ResourceWarning" in (rootfs / SITECUSTOMIZE).read_text()
