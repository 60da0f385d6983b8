"""The ``pytest-layers`` command: look into the store from outside pytest.

The debugging loop it serves: a test fails and its rw layer is committed as a snapshot;
``pytest-layers diff snapshot:NODEID`` shows what the test changed, ``shell snapshot:NODEID``
opens a throw-away writable view of it, ``export`` hands it to Docker or Podman.

Exit codes: 0 ok, 1 failure (one line on stderr naming what failed and the fix), 2 usage.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pytest_layers.errors import LayersError

if TYPE_CHECKING:
    from pytest_layers.backends.base import Backend, View
    from pytest_layers.store import LayerInfo, Store

__all__ = ["main", "build_parser", "default_store_path"]

PROG = "pytest-layers"
#: Top-level host directories a ``shell`` may borrow when the image has no programs of its own.
_HOST_TOOL_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


class UsageError(Exception):
    """Bad command line that argparse cannot see (exit code 2)."""


class CommandError(Exception):
    """A failure the CLI itself detects (exit code 1)."""


def default_store_path(cwd: Path | None = None) -> Path:
    """The store a pytest session started in ``cwd`` uses by default: ini ``layers_store``, else
    ``<cache_dir>/layers`` (``.pytest_cache/layers`` unless ini ``cache_dir`` moves it), under
    the rootdir pytest would pick (the nearest directory upward with a pytest config file)."""
    from pytest_layers import _settings

    ini = _settings.find_ini(cwd or Path.cwd())
    return _settings.store_path(
        ini.rootdir,
        layers_store=ini.values.get("layers_store"),
        cache_dir=ini.values.get("cache_dir"),
    )


# --------------------------------------------------------------------------------------------
# helpers


def _store(args: argparse.Namespace, *, create: bool = False) -> Store:
    from pytest_layers.store import Store

    path = Path(args.store) if args.store else default_store_path()
    if not create and not path.is_dir():
        raise CommandError(
            f"no layer store at {path}; run pytest first, or pass --store PATH "
            "(the store a session used is printed in its report header)"
        )
    return Store(path)


def _short(digest: str | None) -> str:
    return "-" if not digest else digest.split(":", 1)[-1][:12]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _created(info: LayerInfo) -> str:
    value: Any = getattr(info, "created", None)
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(value, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value) if value is not None else "-"


def _lowers(store: Store, chain: Sequence[LayerInfo]) -> list[Path]:
    return [store.layer_dir(info.chain_id) for info in reversed(chain)]


def _print_progress(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# verbs


def cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args)
    rows: list[tuple[str, str, str, str, str, str]] = []
    for name, cid in sorted(store.names().items()):
        if store.has_layer(cid):
            rows.append(_ls_row(store, name, cid))
    for snap in store.snapshots():
        if store.has_layer(snap.chain_id):
            rows.append(_ls_row(store, f"{snap.ref} #{snap.n}", snap.chain_id))
    if args.quiet:
        for row in rows:
            print(row[0])
        return 0
    header = ("REF", "CHAIN ID", "LAYERS", "SIZE", "CREATED", "SOURCE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _ls_row(store: Store, ref: str, cid: str) -> tuple[str, str, str, str, str, str]:
    chain = store.chain(cid)
    top = chain[-1]
    size = sum(info.size for info in chain)
    return (
        ref,
        _short(cid),
        str(len(chain)),
        _human(size),
        _created(top),
        top.source,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    out = []
    for ref in args.refs:
        cid = store.resolve(ref)
        chain = store.chain(cid)
        top = chain[-1]
        names = sorted(name for name, named in store.names().items() if named == cid)
        out.append(
            {
                "Id": cid,
                "Ref": ref,
                "Names": names,
                "Parent": top.parent,
                "Created": _created(top),
                "Source": top.source,
                "Size": sum(info.size for info in chain),
                "RootFS": {"Type": "layers", "Layers": [info.diff_id for info in chain]},
                "ChainIDs": [info.chain_id for info in chain],
                "Layers": [
                    {
                        "ChainID": info.chain_id,
                        "DiffID": info.diff_id,
                        "Name": info.name,
                        "Size": info.size,
                        "Files": info.files,
                        "Created": _created(info),
                        "Source": info.source,
                    }
                    for info in chain
                ],
            }
        )
    print(json.dumps(out, indent=4))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from pytest_layers.changeset import ImageView, layer_changes

    store = _store(args)
    cid = store.resolve(args.ref)
    chain = store.chain(cid)
    parent = ImageView(_lowers(store, chain[:-1]), store.flavor)
    for change in layer_changes(store.layer_dir(cid), parent, flavor=store.flavor):
        print(str(change))
    return 0


def _mounts_dir(store: Store) -> Path:
    return store.root / "mounts"


def _mount_record(store: Store, target: Path) -> Path:
    key = hashlib.sha256(os.fsencode(target)).hexdigest()[:16]
    return _mounts_dir(store) / f"{key}.json"


def _is_mountpoint(path: Path) -> bool:
    target = os.fsdecode(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            mnt = line.split(" ")[4]
            mnt = mnt.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            mnt = mnt.replace("\\134", "\\")
            if mnt == target:
                return True
    return False


def cmd_mount(args: argparse.Namespace) -> int:
    from pytest_layers import _linux
    from pytest_layers.backends.overlay import OverlayBackend

    if os.geteuid() != 0:
        raise CommandError(
            "mount needs root: an ordinary user can only mount inside a user namespace, "
            "and that mount disappears when this command exits; use "
            f"`{PROG} shell {args.ref}` for a view that lives as long as a shell"
        )
    store = _store(args)
    cid = store.resolve(args.ref)
    target = Path(os.path.abspath(args.dir))
    if not target.is_dir():
        raise CommandError(f"{target} is not a directory; create it first (mkdir -p {target})")
    if _is_mountpoint(target):
        raise CommandError(f"{target} is already a mount point; `{PROG} umount {target}` first")
    record = _mount_record(store, target)
    if record.exists():
        raise CommandError(
            f"{target} is recorded as mounted by {PROG} ({record}); `{PROG} umount {target}`"
        )
    chain = store.chain(cid)
    _mounts_dir(store).mkdir(parents=True, exist_ok=True)
    scratch = _mounts_dir(store) / record.stem
    scratch.mkdir()
    backend: Backend = OverlayBackend()
    view: View | None = None
    try:
        view = backend.open(
            _lowers(store, chain), scratch, readonly=not args.rw, flavor=store.flavor
        )
        flags = _linux.MS_BIND | _linux.MS_REC
        _linux.mount(view.path, target, None, flags)
        if not args.rw:
            _linux.mount(None, target, None, _linux.MS_REMOUNT | _linux.MS_BIND | _linux.MS_RDONLY)
        # The bind at target keeps the overlay alive; the view's own mount point in the
        # scratch dir is not needed any more and would only be one more mount to clean up.
        _linux.umount2(view.path, _linux.MNT_DETACH)
        record.write_text(
            json.dumps(
                {
                    "dir": os.fsdecode(target),
                    "scratch": os.fsdecode(scratch),
                    "chain_id": cid,
                    "rw": bool(args.rw),
                }
            )
        )
    except BaseException:
        if _is_mountpoint(target):
            _linux.umount2(target, _linux.MNT_DETACH)
        if view is not None:
            view.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    mode = "read-write (changes are thrown away at umount)" if args.rw else "read-only"
    print(f"mounted {args.ref} ({_short(cid)}) at {target}, {mode}; `{PROG} umount {target}`")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from pytest_layers import _linux

    store = _store(args)
    target = Path(os.path.abspath(args.dir))
    record = _mount_record(store, target)
    if not record.exists():
        raise CommandError(
            f"{target} was not mounted by `{PROG} mount` with this store ({store.root})"
        )
    info = json.loads(record.read_text())
    if _is_mountpoint(target):
        _linux.umount2(target, _linux.MNT_DETACH)
    scratch = Path(info["scratch"])
    # Only ever remove a scratch dir that sits where cmd_mount puts them.
    if scratch.parent == _mounts_dir(store):
        shutil.rmtree(scratch, ignore_errors=True)
    record.unlink()
    print(f"unmounted {target}")
    return 0


def _find_program(root: Path, program: str) -> bool:
    if "/" in program:
        rel = program.lstrip("/")
        return _exists_inside(root, rel)
    for d in ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"):
        if _exists_inside(root, f"{d}/{program}"):
            return True
    return False


def _exists_inside(root: Path, rel: str) -> bool:
    """Whether ``rel`` exists in ``root`` treating ``root`` as ``/`` (symlinks resolved inside)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    current: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if current:
                current.pop()
            continue
        path = root.joinpath(*current, part)
        if path.is_symlink():
            hops += 1
            if hops > 40:
                return False
            target = os.readlink(path)
            if target.startswith("/"):
                current = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        if not os.path.lexists(path):
            return False
        current.append(part)
    return True


def _borrow_host_tools(view_path: Path) -> list[str]:
    """Bind the host's program directories, read-only, where the image has none of its own."""
    from pytest_layers import _linux

    borrowed: list[str] = []
    links = []
    for name in _HOST_TOOL_DIRS:
        host = Path("/") / name
        inside = view_path / name
        if not os.path.lexists(host) or os.path.lexists(inside):
            continue
        if host.is_symlink():  # merged-/usr systems: /bin -> usr/bin
            links.append((name, os.readlink(host)))
            continue
        inside.mkdir()
        _linux.mount(host, inside, None, _linux.MS_BIND | _linux.MS_REC)
        _linux.mount(None, inside, None, _linux.MS_REMOUNT | _linux.MS_BIND | _linux.MS_RDONLY)
        borrowed.append(f"/{name}")
    # A link such as /bin -> usr/bin lends the host's programs only when its target directory
    # was lent too; into an image with its own /usr it would point at the image's programs.
    for name, target in links:
        parts = Path(target.lstrip("/")).parts
        if parts and f"/{parts[0]}" in borrowed:
            os.symlink(target, view_path / name)
            borrowed.append(f"/{name}")
    return borrowed


def _enter_namespace() -> bool:
    """Enter a private mount namespace (root) or a user + mount namespace (anyone else), so
    that every mount this command makes vanishes with it, whatever happens to it. False when
    neither is possible here (then only the copy backend works, and there is no chroot)."""
    from pytest_layers import namespaces
    from pytest_layers.errors import BackendUnavailableError

    # A namespace inherited from a pytest session (its marker is in the environment) is not
    # ours: its mounts are the session's, and an exec'd process keeps only the capabilities the
    # session made ambient (no CAP_SYS_CHROOT). A fresh one nested inside it has everything.
    os.environ.pop(namespaces.ENV_VAR, None)
    try:
        if os.geteuid() == 0:
            namespaces.enter_private_mount_namespace()
        else:
            namespaces.enter_user_namespace()
    except BackendUnavailableError as exc:
        print(f"{PROG}: note: {exc}; using a copy of the image", file=sys.stderr)
        return False
    return True


def cmd_shell(args: argparse.Namespace) -> int:
    from pytest_layers.backends import detect

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    interactive = not command
    if interactive:
        command = [os.environ.get("SHELL") or "/bin/sh"]
    store = _store(args)
    cid = store.resolve(args.ref)
    chain = store.chain(cid)
    isolated = _enter_namespace()
    with store.staging() as scratch_root:
        backend, _skipped = detect.choose_backend(
            args.backend, scratch_root / "probe", flavor=store.flavor
        )
        scratch = scratch_root / "view"
        scratch.mkdir()
        view = backend.open(_lowers(store, chain), scratch, flavor=store.flavor)
        try:
            root = view.path
            chroot = isolated
            if isolated and not _find_program(root, command[0]):
                borrowed = _borrow_host_tools(root) if args.host_tools else []
                if _find_program(root, command[0]) or (
                    "/" not in command[0] and shutil.which(command[0]) and borrowed
                ):
                    if borrowed:
                        print(
                            f"{PROG}: note: the image has no {command[0]}; the host's "
                            f"{', '.join(borrowed)} are bound read-only into this throw-away view",
                            file=sys.stderr,
                        )
                else:
                    chroot = False
                    print(
                        f"{PROG}: note: the image has no {command[0]} and the host's programs "
                        f"cannot be borrowed without hiding its own /usr or /bin; running "
                        f"{command[0]} from the host in {root} (absolute paths are the host's)",
                        file=sys.stderr,
                    )
            if interactive:
                print(
                    f"{PROG}: shell in {args.ref} ({_short(cid)}); changes are thrown away on exit",
                    file=sys.stderr,
                )
            env = dict(os.environ)
            env["PYTEST_LAYERS_REF"] = args.ref
            if interactive:
                env.setdefault("PS1", f"[layers {_short(cid)}] \\w \\$ ")
            preexec = None
            if chroot:
                root_s = os.fsdecode(root)

                def preexec() -> None:
                    os.chroot(root_s)
                    os.chdir("/")

            sys.stdout.flush()
            sys.stderr.flush()
            try:
                proc = subprocess.run(
                    command,
                    cwd=None if chroot else root,
                    env=env,
                    preexec_fn=preexec,
                    check=False,
                )
            except FileNotFoundError:
                raise CommandError(
                    f"{command[0]}: command not found in the view of {args.ref}"
                ) from None
            rc = proc.returncode
            return 128 - rc if rc < 0 else rc
        finally:
            view.close()


def cmd_export(args: argparse.Namespace) -> int:
    from pytest_layers import oci

    store = _store(args)
    cid = store.resolve(args.ref)
    tar = True if args.tar else (False if args.dir else None)
    started = time.monotonic()
    result = oci.export_image(
        store,
        cid,
        Path(args.output),
        format=args.format,
        tar=tar,
        gzip_layers=args.gzip,
        tag=args.tag or oci.default_tag(args.ref),
        progress=None if args.quiet else _print_progress,
    )
    kind = "tar" if result.tar else "directory"
    print(
        f"exported {args.ref} ({len(result.diff_ids)} layers, {_human(result.size)}) to "
        f"{result.path} as {args.format} {kind} in {time.monotonic() - started:.1f}s; "
        f"manifest {result.manifest_digest}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pytest_layers import imageref, oci

    source = imageref.parse(args.path)
    if source.transport == "docker":
        return cmd_pull(args, source)
    if source.tag and args.ref and source.tag != args.ref:
        raise UsageError(f"{args.path} names tag {source.tag!r} but --ref says {args.ref!r}")
    store = _store(args, create=True)
    _enter_namespace()
    started = time.monotonic()
    result = oci.import_image(
        store,
        Path(source.path),
        name=args.name,
        ref=args.ref or source.tag,
        progress=None if args.quiet else _print_progress,
    )
    named = f" as {args.name}" if args.name else ""
    print(
        f"imported {args.path}{named}: {len(result.chain_ids)} layers "
        f"({len(result.imported)} new) in {time.monotonic() - started:.1f}s; "
        f"chain id {result.chain_id}"
    )
    return 0


def _registry_options(args: argparse.Namespace) -> Any:
    from pytest_layers import registry

    return registry.Options(
        ca_file=args.registry_ca, insecure=tuple(getattr(args, "insecure_registry", None) or ())
    )


def cmd_pull(args: argparse.Namespace, source: Any = None) -> int:
    from pytest_layers import imageref, registry

    ref = source or imageref.parse(args.path)
    if ref.transport != "docker":
        raise UsageError(
            f"pull takes docker://HOST/REPO[:TAG]; {args.path!r} is a file: use `{PROG} import`"
        )
    store = _store(args, create=True)
    _enter_namespace()
    started = time.monotonic()
    pulled = registry.pull(
        store,
        ref,
        name=args.name,
        opts=_registry_options(args),
        progress=None if args.quiet else _print_progress,
    )
    result = pulled.result
    named = f" as {args.name}" if args.name else ""
    print(
        f"pulled {ref}{named}: {len(result.chain_ids)} layers ({len(result.imported)} new) "
        f"in {time.monotonic() - started:.1f}s; manifest {pulled.digest}; "
        f"chain id {result.chain_id}"
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from pytest_layers import imageref, registry

    dest = imageref.parse(args.dest)
    if dest.transport != "docker" or dest.digest:
        raise UsageError(
            f"push takes docker://HOST/REPO:TAG; for {args.dest!r} use `{PROG} export`"
        )
    store = _store(args)
    cid = store.resolve(args.ref)
    started = time.monotonic()
    result = registry.push(
        store,
        cid,
        dest,
        opts=_registry_options(args),
        progress=None if args.quiet else _print_progress,
    )
    print(
        f"pushed {args.ref} ({len(result.diff_ids)} layers) to {dest}: {result.sent} blobs "
        f"sent ({_human(result.size)}), {result.existed} already there, {result.mounted} "
        f"mounted, in {time.monotonic() - started:.1f}s; manifest {result.manifest_digest}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    chain_ids = None
    if args.refs:
        wanted: list[str] = []
        for ref in args.refs:
            for info in store.chain(store.resolve(ref)):
                if info.chain_id not in wanted:
                    wanted.append(info.chain_id)
        chain_ids = wanted
    problems = store.verify(chain_ids)
    for problem in problems:
        print(str(problem))
    if problems:
        print(
            f"{PROG}: {len(problems)} problem(s); `{PROG} prune` drops damaged layers that "
            "nothing needs, then the next pytest run rebuilds them",
            file=sys.stderr,
        )
        return 1
    print("ok" if chain_ids is None else f"ok ({len(chain_ids)} layers)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    store = _store(args)
    report = store.prune(keep_snapshots=args.keep_snapshots)
    print(
        f"removed {len(report.removed_layers)} layer(s), {len(report.removed_snapshots)} "
        f"snapshot(s), {report.removed_tmp} stale temporary dir(s); freed "
        f"{_human(report.freed_bytes)}; {report.kept_layers} layer(s) kept"
    )
    return 0


# --------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``pytest-layers`` command (one subparser per verb)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, diff, shell into, export and import the layers of a "
        "pytest-layers store.",
        epilog="REF: a layer name (its latest build), sha256:HEX or a unique hex prefix of a "
        "chain id, or snapshot:NODEID (that test's latest snapshot).",
    )
    parser.add_argument(
        "--store",
        metavar="PATH",
        help="Layer store (default: .pytest_cache/layers under the pytest rootdir)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("ls", help="List named layers and snapshots")
    p.add_argument("-q", "--quiet", action="store_true", help="Print refs only")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="Show an image as JSON (RootFS layers, chain ids, sizes)")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("diff", help="Changes of a layer against its parent, as docker diff")
    p.add_argument("ref", metavar="REF")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "mount",
        help="Mount an image at DIR (root only; read-only unless --rw)",
        description="Mount the image REF at DIR in the host mount namespace until "
        "`pytest-layers umount DIR`. Needs root; ordinary users use `shell`.",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--rw", action="store_true", help="Writable, with a throw-away upper layer")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="Unmount a DIR mounted by `pytest-layers mount`")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser(
        "shell",
        help="Run a shell (or CMD) in a writable throw-away view of REF",
        description="Open a private writable view of REF, run $SHELL (or CMD) with the view "
        "as its root, and throw the view away on exit. The exit code is CMD's.",
        usage=f"{PROG} shell [-h] [--backend NAME] [--no-host-tools] REF [-- CMD ...]",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "overlay", "fuse", "copy"),
        help="Mount backend (default: auto)",
    )
    p.add_argument(
        "--no-host-tools",
        dest="host_tools",
        action="store_false",
        help="Do not bind the host's /usr, /bin, /lib into an image that has no programs",
    )
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("export", help="Export an image as an OCI layout or docker-archive")
    p.add_argument("ref", metavar="REF")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="Output (must not exist)")
    p.add_argument("--format", choices=("oci", "docker-archive"), default="oci")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--tar", action="store_true", help="Write a tar (default for *.tar)")
    form.add_argument("--dir", action="store_true", help="Write a directory (oci only)")
    p.add_argument("--gzip", action="store_true", help="gzip the layer blobs")
    p.add_argument("--tag", help="Image name:tag recorded in the output")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress lines")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="Import an image: PATH, oci:DIR[:TAG], docker-archive:PATH, docker://..."
    )
    p.add_argument("path", metavar="IMAGE")
    _registry_args(p)
    p.add_argument("--name", help="Layer name for the image's top layer")
    p.add_argument("--ref", help="Tag to pick when the archive holds several images")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress lines")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("pull", help="Pull docker://HOST[:PORT]/REPO[:TAG|@DIGEST] into the store")
    p.add_argument("path", metavar="IMAGE")
    p.add_argument("--name", help="Layer name for the image's top layer")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress lines")
    _registry_args(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("push", help="Push REF's image to docker://HOST[:PORT]/REPO:TAG")
    p.add_argument("ref", metavar="REF")
    p.add_argument("dest", metavar="IMAGE")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress lines")
    _registry_args(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("verify", help="Re-hash layers and report damage (all, or REF's chain)")
    p.add_argument("refs", nargs="*", metavar="REF")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="Remove layers no name, cache entry or snapshot needs")
    p.add_argument(
        "--keep-snapshots",
        type=int,
        default=3,
        metavar="N",
        help="Snapshots kept per test (default: 3)",
    )
    p.set_defaults(func=cmd_prune)
    return parser


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry-ca", metavar="PATH", help="Also trust this CA file for registries (PEM)"
    )
    p.add_argument(
        "--insecure-registry",
        action="append",
        metavar="HOST",
        help="Allow plain HTTP to HOST[:PORT] (loopback hosts always are); repeatable",
    )


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pytest-layers`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        parser.error(str(exc))
    except (LayersError, CommandError) as exc:
        _fail(str(exc))
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
