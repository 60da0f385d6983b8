"""What the ``pytest-layers`` command prints and accepts: every listed thing is a REF, diff_id
prefixes, snapshot numbers, quoting of hostile names, closed pipes, export targets, disk use."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_cli import run
from test_cli import store as store  # the fixture: base and app
from treeutil import build_layer, make_tree

from pytest_layers import layertar
from pytest_layers._storerecords import _ref_filename
from pytest_layers.store import Store, disk_use

CLI = [sys.executable, "-m", "pytest_layers.cli"]


def _top(store: Path, ref: str) -> tuple[str, str]:
    st = Store(store)
    info = st.layer_info(st.resolve(ref))
    return info.chain_id, info.diff_id


# -- item 1: chain id and diff_id prefixes --------------------------------------------------


def test_short_chain_id_and_diff_id_prefixes_are_refs(store: Path, tmp_path: Path) -> None:
    chain_id, diff_id = _top(store, "app")
    assert chain_id != diff_id  # app sits on base: its chain id is not its diff_id
    expected = ["C /etc", "A /etc/app.conf", "D /etc/gone", "C /etc/x"]
    for ref in (chain_id[7:19], diff_id[7:19], diff_id, chain_id):
        proc = run("diff", ref, store=store)
        assert proc.returncode == 0, (ref, proc.stderr)
        assert proc.stdout.splitlines() == expected
        assert json.loads(run("inspect", ref, store=store).stdout)[0]["Id"] == chain_id
        assert run("verify", ref, store=store).stdout.strip() == "ok (2 layers)"
    out = tmp_path / "by-diff-id"
    assert run("export", diff_id[7:19], "-o", str(out), "-q", store=store).returncode == 0


def test_a_diff_id_on_two_parents_is_ambiguous_and_lists_both(store: Path, tmp_path: Path) -> None:
    st = Store(store)
    app, diff_id = _top(store, "app")
    other = build_layer(st, None, make_tree(tmp_path / "o", {"opt/o": "o\n"}), "other")
    # The same layer content on another parent (as a union makes): same diff_id, new chain id.
    elsewhere = layertar.chain_id([st.layer_info(other).diff_id, diff_id])
    st.add_alias(elsewhere, app, parent=other)
    proc = run("diff", diff_id[7:19], store=store)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert f"ambiguous layer reference {diff_id[7:19]!r} matches 2 layers" in proc.stderr
    assert app in proc.stderr
    assert elsewhere in proc.stderr
    assert "give one of their chain ids" in proc.stderr
    # Each chain id still names one image.
    assert json.loads(run("inspect", elsewhere[7:19], store=store).stdout)[0]["ChainIDs"] == [
        other,
        elsewhere,
    ]


@pytest.mark.parametrize(
    ("ini", "where"),
    [("layers_store = custom/store", "custom/store"), ("cache_dir = .mycache", ".mycache/layers")],
)
def test_store_default_follows_the_ini(tmp_path: Path, ini: str, where: str) -> None:
    (tmp_path / "proj/sub").mkdir(parents=True)
    (tmp_path / "proj/pytest.ini").write_text(f"[pytest]\n{ini}\n")
    st = Store(tmp_path / "proj" / where)
    build_layer(st, None, make_tree(tmp_path / "t", {"a": "a"}), "found")
    proc = run("ls", "-q", cwd=tmp_path / "proj/sub")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "found\n"


def test_inspect_and_verify_take_several_refs(store: Path) -> None:
    assert len(json.loads(run("inspect", "app", "base", store=store).stdout)) == 2
    assert run("verify", "app", "base", store=store).stdout.strip() == "ok (2 layers)"


# -- item 2: every line of ls -q is a ref ----------------------------------------------------


def test_every_ls_q_line_is_accepted_by_inspect_and_diff(store: Path) -> None:
    st = Store(store)
    app, base = st.resolve("app"), st.resolve("base")
    test = "tests/test_x.py::test_p[a@1 b]"  # a parameter with "@" and a space
    for cid in (base, app, base):
        st.add_snapshot(test, cid, keep=3)
    st.add_snapshot("tests/test_y.py::test_one", app, keep=3)
    # The snapshot's own time, far from its layer's: CREATED must show this one.
    ref_file = store / "refs" / "snapshots" / _ref_filename(test) / "2"
    data = json.loads(ref_file.read_text())
    ref_file.write_text(json.dumps({**data, "created": 1e9}))

    lines = run("ls", "-q", store=store).stdout.splitlines()
    assert lines == [
        "app",
        "base",
        f"snapshot:{test}@1",
        f"snapshot:{test}@2",
        f"snapshot:{test}",
        "snapshot:tests/test_y.py::test_one",
    ]
    want = {f"snapshot:{test}@1": base, f"snapshot:{test}@2": app, f"snapshot:{test}": base}
    for ref in lines:
        proc = run("inspect", ref, store=store)
        assert proc.returncode == 0, (ref, proc.stderr)
        assert json.loads(proc.stdout)[0]["Id"] == want.get(ref, st.resolve(ref))
        proc = run("diff", ref, store=store)
        assert proc.returncode == 0, (ref, proc.stderr)
    assert run("inspect", f"snapshot:{test}@3", store=store).stdout == run(
        "inspect", f"snapshot:{test}", store=store
    ).stdout.replace(f'"Ref": "snapshot:{test}"', f'"Ref": "snapshot:{test}@3"')
    snap = json.loads(run("inspect", f"snapshot:{test}@2", store=store).stdout)[0]
    assert snap["Created"] == "2001-09-09T01:46:40Z"
    assert snap["Snapshot"]["Number"] == 2
    table = run("ls", store=store).stdout.splitlines()
    row = next(line for line in table if line.startswith(f"snapshot:{test}@2 "))
    assert "2001-09-09T01:46:40Z" in row
    assert row.split()[-1] == "snapshot"
    proc = run("diff", f"snapshot:{test}@9", store=store)
    assert proc.returncode == 1
    assert f"kept: snapshot:{test}@1, snapshot:{test}@2, snapshot:{test}@3" in proc.stderr


# -- item 3: a closed pipe ends the command quietly -------------------------------------------


@pytest.fixture
def big(store: Path, tmp_path: Path) -> Path:
    """``big``: app plus 3,000 files, so that ``diff big`` overflows a pipe's buffer."""
    st = Store(store)
    tree = make_tree(tmp_path / "big", {f"srv/{'f' * 40}{i:05d}": "" for i in range(3000)})
    build_layer(st, None, tree, "big")
    return store


@pytest.mark.parametrize(
    "args", [["diff", "big"], ["inspect", *["big"] * 200], ["ls"]], ids=["diff", "inspect", "ls"]
)
def test_a_closed_pipe_ends_quietly(big: Path, args: list[str]) -> None:
    # A real pipe whose reader is already gone: the first write fails with EPIPE, whatever
    # the output's size.
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [*CLI, "--store", str(big), *args], stdout=w, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(w)
    assert proc.stderr == b""
    assert proc.returncode == 141  # as the shell reports a tool killed by SIGPIPE


def test_diff_into_head(big: Path) -> None:
    cli = " ".join([*CLI, "--store", str(big)])
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {cli} diff big | head -1; echo rc=$?"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout == "A /srv\nrc=141\n"
    assert proc.stderr == ""


# -- item 4: export writes what the output's name says -------------------------------------------


def _tar_names(path: Path, mode: str) -> set[str]:
    with tarfile.open(path, mode) as tf:
        return set(tf.getnames())


@pytest.mark.requires_tool("skopeo")
@pytest.mark.parametrize("name", ["image.tar.gz", "image.tgz"])
def test_export_to_tar_gz_writes_a_gzipped_oci_archive(
    store: Path, tmp_path: Path, name: str
) -> None:
    out = tmp_path / name
    proc = run("export", "app", "-o", str(out), "-q", store=store)
    assert proc.returncode == 0, proc.stderr
    assert "as oci gzipped tar" in proc.stdout
    assert out.is_file()
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert {"index.json", "oci-layout"} <= _tar_names(out, "r:gz")
    skopeo = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci-archive:{out}"], capture_output=True, text=True
    )
    assert skopeo.returncode == 0, skopeo.stderr
    assert len(json.loads(skopeo.stdout)["layers"]) == 2
    # The same image as the plain tar: the blobs inside are byte-identical.
    plain = tmp_path / "plain.tar"
    assert run("export", "app", "-o", str(plain), "-q", store=store).returncode == 0
    with tarfile.open(plain) as a, tarfile.open(out, "r:gz") as b:
        for member in a.getmembers():
            if member.isfile():
                fa, fb = a.extractfile(member), b.extractfile(member.name)
                assert fa is not None
                assert fb is not None
                assert fa.read() == fb.read()


@pytest.mark.requires_tool("skopeo")
def test_export_docker_archive_tar_gz(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "image.tar.gz"
    proc = run("export", "app", "-o", str(out), "--format", "docker-archive", store=store)
    assert proc.returncode == 0, proc.stderr
    assert "manifest.json" in _tar_names(out, "r:gz")
    # docker load and podman load read a gzipped archive; skopeo's docker-archive: wants it
    # unpacked, so judge the tar inside.
    inner = tmp_path / "inner.tar"
    with gzip.open(out) as f:
        inner.write_bytes(f.read())
    skopeo = subprocess.run(
        ["skopeo", "inspect", "--raw", f"docker-archive:{inner}"], capture_output=True, text=True
    )
    assert skopeo.returncode == 0, skopeo.stderr
    assert len(json.loads(skopeo.stdout)["layers"]) == 2


@pytest.mark.parametrize(
    ("name", "kind"), [("image.tar", "tar"), ("image", "dir"), ("image.oci", "dir")]
)
def test_export_tar_or_directory_by_name(store: Path, tmp_path: Path, name: str, kind: str) -> None:
    out = tmp_path / name
    assert run("export", "app", "-o", str(out), "-q", store=store).returncode == 0
    if kind == "tar":
        assert "index.json" in _tar_names(out, "r:")  # "r:" fails on a gzip stream
    else:
        assert (out / "index.json").is_file()


@pytest.mark.parametrize("name", ["image.tar.xz", "image.zip", "image.gz", "image.tar.zst"])
def test_export_refuses_an_archive_name_it_cannot_write(
    store: Path, tmp_path: Path, name: str
) -> None:
    proc = run("export", "app", "-o", str(tmp_path / name), store=store)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert f"{name}: export writes a directory, a .tar or a gzipped .tar.gz/.tgz" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"]


# -- item 7: one notion of size, disk use ---------------------------------------------------------


def _du(*paths: Path) -> int:
    out = subprocess.run(
        ["du", "-s", "-c", "--block-size=1", *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.splitlines()[-1].split()[0])


def test_disk_use_is_what_du_says(store: Path, tmp_path: Path) -> None:
    st = Store(store)
    tree = make_tree(
        tmp_path / "links", {"big": "x" * 100_000, "again": ("hardlink", "big"), "d": None}
    )
    links = build_layer(st, None, tree, "links")
    assert disk_use([store]) == st.disk_use() == _du(store)
    layer_dir = store / "layers" / links[7:]
    # The hard link is counted once, as du does; the content bytes are another number.
    assert st.disk_use([links]) == _du(layer_dir)
    assert st.layer_info(links).size == 200_000
    assert st.disk_use([links]) < 200_000
    out = tmp_path / "links.tar"
    proc = run("export", "links", "-o", str(out), "-q", store=store)
    assert proc.returncode == 0, proc.stderr
    kib = _du(out) / 1024
    assert f"(1 layers, {kib:.1f} KiB disk use)" in proc.stdout
    row = next(line for line in run("ls", store=store).stdout.splitlines() if "links" in line)
    assert f"{st.disk_use([links]) / 1024:.1f} KiB" in row


# -- issue 10: names cannot forge lines ------------------------------------------------------------


def test_control_characters_in_names_are_escaped(store: Path, tmp_path: Path) -> None:
    st = Store(store)
    evil = "evil\nA /etc/shadow"
    tree = make_tree(tmp_path / "evil", {evil: "x", "tab\there": "t", "back\\slash": "b"})
    os.mknod(tree / os.fsdecode(b"raw\xff\x1b"))
    build_layer(st, None, tree, "evil")
    # Without quoting, the directory "evil\nA " holding etc/shadow prints a line of its own
    # that reads "A /etc/shadow": a change the layer does not have.
    proc = run("diff", "evil", store=store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "A /back\\\\slash",
        "A /evil\\nA ",
        "A /evil\\nA /etc",
        "A /evil\\nA /etc/shadow",
        "A /raw\\377\\033",
        "A /tab\\there",
    ]
    assert "A /etc/shadow" not in proc.stdout.splitlines()
    # --json keeps the names as they are.
    paths = [c["Path"] for c in json.loads(run("diff", "evil", "--json", store=store).stdout)]
    assert f"/{evil}" in paths
    assert "/tab\there" in paths
    st.set_name("two\nlines", st.resolve("evil"))
    assert "two\\nlines" in run("ls", "-q", store=store).stdout.splitlines()


# -- item 8: a snapshot keeps the init layer its test saw ------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_example() -> str:
    text = README.read_text()
    start = text.index("```python\n", text.index("## Example")) + len("```python\n")
    return text[start : text.index("```", start)]


def _readme_snapshot(pytester: pytest.Pytester) -> tuple[Path, str]:
    """Run the README's example, keeping its snapshot; returns (store, snapshot ref)."""
    pytester.makepyfile(test_app=_readme_example())
    result = pytester.runpytest_subprocess("--layers-keep=always", "-rP")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["init layer kept: shell/mount show it; export leaves it out (--with-init)"]
    )
    return pytester.path / ".pytest_cache" / "layers", "snapshot:test_app.py::test_enable_debug"


@pytest.mark.slow
@pytest.mark.requires_overlay
def test_readme_snapshot_shows_its_init_files_and_exports_without_them(
    pytester: pytest.Pytester,
) -> None:
    store, ref = _readme_snapshot(pytester)
    cli = [*CLI, "--store", str(store)]

    def cli_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)

    # What the test asserted on is there in the shell (and the test's own write). The README's
    # image has no programs of its own: the host's tools are lent, read-only.
    proc = cli_run("shell", "--host-tools", ref, "--", "cat", "/etc/hostname", "/etc/app.conf")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "web-1\ndebug=true\n"
    # diff is the test's own changes, as rootfs.diff() said; --init adds the init files.
    assert cli_run("diff", ref).stdout.splitlines() == ["C /etc", "C /etc/app.conf"]
    assert cli_run("diff", "--init", ref).stdout.splitlines() == [
        "C /etc",
        "C /etc/app.conf",
        "A /etc/hostname",
    ]
    assert "has no init layer" in cli_run("diff", "--init", "app").stderr

    # export leaves the init layer out: base, app, the rw layer, as the snapshot's chain id says.
    st = Store(store)
    snap = st.snapshot(ref)
    assert snap is not None
    assert snap.with_init is not None
    diff_ids = [x.diff_id for x in st.chain(snap.chain_id)]
    for with_init, want in ((False, diff_ids), (True, [*diff_ids[:2], "init", diff_ids[2]])):
        out = pytester.path / f"out-{with_init}"
        proc = cli_run("export", ref, "-o", str(out), "-q", *(["--with-init"] if with_init else []))
        assert proc.returncode == 0, proc.stderr
        index = json.loads((out / "index.json").read_text())
        blobs = out / "blobs" / "sha256"
        manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
        config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
        got = config["rootfs"]["diff_ids"]
        assert len(got) == len(want)
        assert [g for g, w in zip(got, want, strict=True) if w != "init"] == diff_ids
        names: list[str] = []
        for layer in manifest["layers"]:
            with tarfile.open(blobs / layer["digest"][7:]) as tf:
                names += tf.getnames()
        assert ("etc/hostname" in names) is with_init
    # The snapshot's chain id did not change: the rw layer on the image, as without init files.
    assert layertar.chain_id(diff_ids) == snap.chain_id
    assert st.layer_info(snap.chain_id).parent == st.resolve("app")
    # The init layer lives as long as its snapshot: prune keeps it, then drops it with it.
    assert cli_run("prune").returncode == 0
    assert [st.layer_info(c).source for c in st.layers()].count("init") == 1
    assert cli_run("prune", "--keep-snapshots", "0").returncode == 0
    assert sorted(st.layer_info(c).name for c in Store(store).layers()) == ["app", "base"]


@pytest.mark.slow
@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_mount_of_a_snapshot_shows_its_init_files(pytester: pytest.Pytester) -> None:
    store, ref = _readme_snapshot(pytester)
    target = pytester.path / "mnt"
    target.mkdir()
    try:
        proc = run("mount", ref, str(target), store=store)
        assert proc.returncode == 0, proc.stderr
        assert (target / "etc/hostname").read_text() == "web-1\n"
        assert (target / "etc/app.conf").read_text() == "debug=true\n"
    finally:
        run("umount", str(target), store=store)
    assert list(target.iterdir()) == []


# -- qualified layer names (PATH::NAME) -----------------------------------------------------


def test_a_name_two_definitions_built_differently_is_ambiguous(tmp_path: Path) -> None:
    """The store knows ``a/conftest.py::base`` and ``b/conftest.py::base``: the bare name is
    refused with both qualified forms, each qualified form works, ``ls`` lists them."""
    from pytest_layers import errors, names

    st = Store(tmp_path / "store")
    a = build_layer(st, None, make_tree(tmp_path / "a", {"etc/who": "a\n"}), "base")
    b = build_layer(st, None, make_tree(tmp_path / "b", {"etc/who": "b\n"}), "base")
    st.set_name("a/conftest.py::base", a)
    st.set_name("b/conftest.py::base", b)
    with pytest.raises(errors.AmbiguousRefError) as info:
        names.resolve(st, "base")
    assert isinstance(info.value, LookupError)
    assert "a/conftest.py::base" in str(info.value)
    assert "b/conftest.py::base" in str(info.value)
    assert "PATH::NAME" in str(info.value)
    assert names.resolve(st, "a/conftest.py::base") == a
    assert names.resolve(st, "b/conftest.py::base") == b
    assert sorted(names.listed(st.names())) == ["a/conftest.py::base", "b/conftest.py::base"]
    proc = run("ls", "-q", store=tmp_path / "store")
    assert proc.stdout.splitlines() == ["a/conftest.py::base", "b/conftest.py::base"]
    proc = run("diff", "base", store=tmp_path / "store")
    assert proc.returncode == 1
    assert "ambiguous layer reference 'base'" in proc.stderr
    shown = json.loads(run("inspect", "b/conftest.py::base", store=tmp_path / "store").stdout)
    assert shown[0]["Names"] == ["b/conftest.py::base"]
    assert run("diff", "b/conftest.py::base", store=tmp_path / "store").stdout.split() == [
        "A",
        "/etc",
        "A",
        "/etc/who",
    ]


def test_a_name_with_one_definition_stays_bare(tmp_path: Path) -> None:
    """One definition (or several that built the same layer): the bare name works and is
    what ``ls`` shows, as before qualified names existed."""
    from pytest_layers import names

    st = Store(tmp_path / "store")
    a = build_layer(st, None, make_tree(tmp_path / "a", {"etc/who": "a\n"}), "base")
    st.set_name("conftest.py::base", a)
    st.set_name("other/conftest.py::base", a)
    assert names.resolve(st, "base") == a
    assert names.listed(st.names()) == {"base": a}
    shown = json.loads(run("inspect", "base", store=tmp_path / "store").stdout)
    assert shown[0]["Names"] == ["base"]  # as before: qualified names stay out of sight
