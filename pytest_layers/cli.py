"""The ``pytest-layers`` command: look into the store from outside pytest.

The debugging loop it serves: a test fails and its rw layer is committed as a snapshot;
``pytest-layers diff snapshot:NODEID`` shows what the test changed, ``shell snapshot:NODEID``
opens a throw-away writable view of it, ``export`` hands it to Docker or Podman.

Exit codes: 0 ok, 1 failure (one line on stderr naming what failed and the fix), 2 usage,
141 when the reader of the output went away (``| head``), as for a tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pytest_layers import _chroot
from pytest_layers import names as layer_names
from pytest_layers._fmt import human_size, short_digest
from pytest_layers.errors import LayersError

if TYPE_CHECKING:
    from pytest_layers.backends.base import Backend, View
    from pytest_layers.sandbox import Bind
    from pytest_layers.store import LayerInfo, SnapshotInfo, Store

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


#: Stores this command opened: their warnings (stray entries skipped) are printed at the end.
_opened: list[Store] = []


def _store(args: argparse.Namespace, *, create: bool = False) -> Store:
    from pytest_layers import _settings, runtime

    path = Path(args.store) if args.store else default_store_path()
    shared = getattr(args, "store_shared", None)
    if shared is None:
        shared = _settings.find_ini(Path.cwd()).values.get("layers_store_shared") or None
    store = runtime.open_store(
        path,
        shared_group=shared,
        missing=None
        if create
        else (
            f"no layer store at {path}; run pytest first, or pass --store PATH "
            "(the store a session used is printed in its report header)"
        ),
    )
    _opened.append(store)
    return store


def _print_warnings() -> None:
    for store in _opened:
        for line in store.warnings:
            print(f"{PROG}: warning: {line}", file=sys.stderr)


def _short(digest: str | None) -> str:
    return "-" if not digest else short_digest(digest)


def _created(info: LayerInfo | SnapshotInfo) -> str:
    value: Any = getattr(info, "created", None)
    if isinstance(value, (int, float)):
        return _iso(value)
    return str(value) if value is not None else "-"


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lowers(store: Store, chain: Sequence[LayerInfo]) -> list[Path]:
    return [store.layer_dir(info.chain_id) for info in reversed(chain)]


def _print_progress(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


#: C escapes ``ls -b`` uses; other non-printable characters become ``\ooo`` (octal).
_ESCAPES = {
    "\\": "\\\\",
    "\a": "\\a",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\v": "\\v",
    "\f": "\\f",
    "\r": "\\r",
}


def quote_name(name: str) -> str:
    """``name`` with backslash and every non-printable character escaped as ``ls -b`` does
    (``\\n``, ``\\t``, ``\\033``; bytes that are not UTF-8 as ``\\ooo``), so that one
    listed path is always one line: a name holding ``"\\nA /etc/shadow"`` cannot forge a
    line of ``diff`` output."""
    out = []
    for ch in name:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif "\udc80" <= ch <= "\udcff":  # an undecodable byte (surrogateescape)
            out.append(f"\\{ord(ch) - 0xDC00:03o}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _seen_chain(store: Store, ref: str, chain_id: str) -> str:
    """The chain a view of ``ref`` shows: for a snapshot whose test had init files, the image
    with the init layer under the rw layer (what the test saw); else ``chain_id`` itself."""
    snap = store.snapshot(ref)
    if snap is not None and snap.with_init is not None and store.has_layer(snap.with_init):
        return snap.with_init
    return chain_id


# --------------------------------------------------------------------------------------------
# verbs


def cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args)
    rows: list[tuple[str, str, str, str, str, str]] = []
    for name, cid in sorted(layer_names.listed(store.names()).items()):
        if store.has_layer(cid):
            info = store.layer_info(cid)
            rows.append(_ls_row(store, quote_name(name), cid, info.created, info.source))
    snaps = store.snapshots()
    for i, snap in enumerate(snaps):
        if store.has_layer(snap.chain_id):
            # The latest of a test answers to snapshot:NODEID (what its report printed); older
            # ones only by number. Every listed ref is one the other verbs accept.
            latest = i + 1 == len(snaps) or snaps[i + 1].test != snap.test
            ref = snap.ref if latest else snap.numbered_ref
            rows.append(_ls_row(store, quote_name(ref), snap.chain_id, snap.created, "snapshot"))
    if args.quiet:
        for row in rows:
            print(row[0])
        return 0
    header = ("REF", "CHAIN ID", "LAYERS", "DISK USE", "CREATED", "SOURCE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _ls_row(
    store: Store, ref: str, cid: str, created: float, source: str
) -> tuple[str, str, str, str, str, str]:
    chain = store.chain(cid)
    return (
        ref,
        _short(cid),
        str(len(chain)),
        human_size(store.disk_use(info.chain_id for info in chain)),
        _iso(created),
        source,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from pytest_layers.audit import privileged_content

    store = _store(args)
    out = []
    for ref in args.refs:
        cid = layer_names.resolve(store, ref)
        chain = store.chain(cid)
        top = chain[-1]
        snap = store.snapshot(ref)
        privileged = privileged_content(
            [store.layer_dir(info.chain_id) for info in chain], store.flavor
        )
        _warn_privileged(ref, privileged)
        # The names ls lists: bare, or PATH::NAME where the bare name is ambiguous.
        listed = layer_names.listed(store.names())
        names = sorted(name for name, named in listed.items() if named == cid)
        out.append(
            {
                "Id": cid,
                "Ref": ref,
                "Names": names,
                "Parent": top.parent,
                "Created": _created(snap or top),
                "Source": top.source,
                # Size: bytes of file content (as Layer.size); DiskUse: what du says.
                "Size": sum(info.size for info in chain),
                "DiskUse": store.disk_use(info.chain_id for info in chain),
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
                "Privileged": privileged,
            }
        )
        if snap is not None:
            out[-1]["Snapshot"] = {
                "Test": snap.test,
                "Number": snap.n,
                "Ref": snap.numbered_ref,
                "Created": _created(snap),
                # The chain the test saw (init layer under the rw layer); export leaves the
                # init layer out unless --with-init.
                "WithInit": snap.with_init,
            }
    print(json.dumps(out, indent=4))
    return 0


def _warn_privileged(ref: str, privileged: dict[str, list[str]]) -> None:
    labels = {
        "Capabilities": "file-capability",
        "Devices": "device",
        "WorldWritable": "world-writable",
    }
    counts = [
        f"{len(paths)} {labels.get(kind, kind.lower())}"
        for kind, paths in privileged.items()
        if paths
    ]
    if counts:
        print(
            f"{PROG}: warning: {ref} holds privileged content ({', '.join(counts)}; see "
            '"Privileged"); views and mounts of it are nosuid,nodev unless you opt out',
            file=sys.stderr,
        )


def cmd_diff(args: argparse.Namespace) -> int:
    from pytest_layers.changeset import Change, ImageView, layer_changes

    store = _store(args)
    cid = layer_names.resolve(store, args.ref)
    chain = store.chain(cid)
    image = _lowers(store, chain[:-1])
    changes = layer_changes(
        store.layer_dir(cid), ImageView(image, store.flavor), flavor=store.flavor
    )
    if args.init:
        seen = _seen_chain(store, args.ref, cid)
        if seen == cid:
            raise CommandError(
                f"{args.ref} has no init layer (--init shows a snapshot's init files, when its "
                "test had some); drop --init"
            )
        init = store.chain(seen)[-2]
        init_changes = layer_changes(
            store.layer_dir(init.chain_id), ImageView(image, store.flavor), flavor=store.flavor
        )
        # Both lists are against the image: a path either adds is "A", else the rw layer's.
        kinds = {c.path: c.kind for c in init_changes}
        for c in changes:
            kinds[c.path] = "A" if kinds.get(c.path) == "A" else c.kind
        changes = sorted(Change(kind, path) for path, kind in kinds.items())
    if args.json:
        print(json.dumps([{"Path": c.path, "Kind": c.kind} for c in changes], indent=4))
        return 0
    for change in changes:
        print(f"{change.kind} {quote_name(change.path)}")
    return 0


def _mounts_dir(store: Store) -> Path:
    return store.root / "mounts"


def _mount_key(target: Path) -> str:
    return hashlib.sha256(os.fsencode(target)).hexdigest()[:16]


def _mount_record(store: Store, target: Path) -> Path:
    return _mounts_dir(store) / f"{_mount_key(target)}.json"


def _is_mountpoint(path: Path) -> bool:
    from pytest_layers import namespaces

    return namespaces.mount_at(path) is not None


def _own_mounts_dir(store: Store) -> Path:
    """``STORE/mounts``, created 0700; refused unless it is a real directory of ours."""
    path = _mounts_dir(store)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise CommandError(
            f"{path} is not a directory owned by uid {os.geteuid()}; it was not made by "
            f"{PROG}: remove it after checking what it is"
        )
    return path


def _read_mount_record(record: Path, target: Path) -> dict[str, Any]:
    """The record ``mount`` wrote for ``target``; anything else (a link, another user's file,
    a record naming another directory) is refused, so a forged record cannot steer umount."""
    forged = (
        f"refusing the mount record {record}: it was not written by `{PROG} mount` for "
        f"{target} as uid {os.geteuid()}; nothing was unmounted or removed (check it, then "
        "delete it by hand)"
    )
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError:
        raise CommandError(forged) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 65536:
            raise CommandError(forged)
        raw = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw)
    except ValueError:
        raise CommandError(forged) from None
    if (
        not isinstance(info, dict)
        or info.get("dir") != os.fsdecode(target)
        or not isinstance(info.get("mnt_id"), int)
    ):
        raise CommandError(forged)
    return info


def cmd_mount(args: argparse.Namespace) -> int:
    from pytest_layers import _linux, namespaces
    from pytest_layers.backends.base import MountPolicy
    from pytest_layers.backends.overlay import OverlayBackend

    if os.geteuid() != 0:
        raise CommandError(
            "mount needs root: an ordinary user can only mount inside a user namespace, "
            "and that mount disappears when this command exits; use "
            f"`{PROG} shell {args.ref}` for a view that lives as long as a shell"
        )
    store = _store(args)
    cid = layer_names.resolve(store, args.ref)
    target = Path(os.path.realpath(args.dir))
    if not target.is_dir():
        raise CommandError(f"{target} is not a directory; create it first (mkdir -p {target})")
    if _is_mountpoint(target):
        raise CommandError(f"{target} is already a mount point; `{PROG} umount {target}` first")
    record = _mount_record(store, target)
    if os.path.lexists(record):
        raise CommandError(
            f"{target} is recorded as mounted by {PROG} ({record}); `{PROG} umount {target}`"
        )
    policy = MountPolicy(suid=args.suid, dev=args.dev)
    seen = _seen_chain(store, args.ref, cid)
    chain = store.chain(seen)
    key = _mount_key(target)
    scratch = _own_mounts_dir(store) / key
    scratch.mkdir()
    # prune must leave the image alone for as long as the mount exists, which outlives this
    # process: a pin, released by umount.
    store.pin(f"mount-{key}", [seen])
    backend: Backend = OverlayBackend(policy=policy)
    view: View | None = None
    mounted = False
    try:
        view = backend.open(
            _lowers(store, chain), scratch, readonly=not args.rw, flavor=store.flavor
        )
        _linux.mount(view.path, target, None, _linux.MS_BIND | _linux.MS_REC)
        mounted = True
        flags = _linux.MS_REMOUNT | _linux.MS_BIND | policy.ms_flags
        _linux.mount(None, target, None, flags | (0 if args.rw else _linux.MS_RDONLY))
        # The bind at target keeps the overlay alive; the view's own mount point in the
        # scratch dir is not needed any more and would only be one more mount to clean up.
        _linux.umount2(view.path, _linux.MNT_DETACH)
        entry = namespaces.mount_at(target)
        if entry is None:
            raise CommandError(f"{target} is not listed in /proc/self/mountinfo after mounting")
        info = {
            "dir": os.fsdecode(target),
            "chain_id": cid,
            "rw": bool(args.rw),
            "mnt_id": entry.mnt_id,
            "fstype": entry.fstype,
            "options": str(policy),
        }
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
    except BaseException:
        if mounted:
            _linux.umount2(target, _linux.MNT_DETACH)
        if view is not None:
            view.close()
        namespaces.remove_tree(scratch)
        store.unpin(f"mount-{key}")
        raise
    mode = "read-write (changes are thrown away at umount)" if args.rw else "read-only"
    print(
        f"mounted {args.ref} ({_short(cid)}) at {target}, {mode}, {policy}; "
        f"`{PROG} umount {target}`"
    )
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from pytest_layers import _linux, namespaces

    store = _store(args)
    target = Path(os.path.realpath(args.dir))
    record = _mount_record(store, target)
    try:
        info = _read_mount_record(record, target)
    except FileNotFoundError:
        raise CommandError(
            f"{target} was not mounted by `{PROG} mount` with this store ({store.root})"
        ) from None
    entry = namespaces.mount_at(target)
    if entry is not None:
        if entry.mnt_id != info["mnt_id"] or entry.fstype != info.get("fstype"):
            raise CommandError(
                f"{target} is mounted ({entry.fstype}, mount id {entry.mnt_id}), but not by "
                f"the mount {record} records; left alone: unmount it yourself, then run "
                f"`{PROG} umount {target}` again to drop the record"
            )
        _linux.umount2(target, _linux.MNT_DETACH | _linux.UMOUNT_NOFOLLOW)
    else:
        print(f"{PROG}: note: {target} was no longer mounted; dropping its record", file=sys.stderr)
    # Only ever the scratch dir named by the key, never a path read from the record.
    key = _mount_key(target)
    namespaces.remove_tree(_mounts_dir(store) / key)
    store.unpin(f"mount-{key}")
    record.unlink()
    print(f"unmounted {target}")
    return 0


def _exists_inside(root: Path, rel: str) -> bool:
    """Whether ``rel`` exists in ``root`` treating ``root`` as ``/`` (symlinks resolved inside)."""
    try:
        return os.path.lexists(_chroot.resolve(root, rel, strict=True))
    except OSError:  # missing, a symlink loop, or a component that is not a directory
        return False


def _borrow_host_tools(view_path: Path) -> list[Bind]:
    """The host's program directories the image has none of, to bind read-only into the sandbox
    (``--host-tools``). Links such as ``/bin -> usr/bin`` are copied into the throw-away view."""
    from pytest_layers.sandbox import Bind

    binds: list[Bind] = []
    links = []
    for name in _HOST_TOOL_DIRS:
        host = Path("/") / name
        if not os.path.lexists(host) or os.path.lexists(view_path / name):
            continue
        if host.is_symlink():  # merged-/usr systems: /bin -> usr/bin
            links.append((name, os.readlink(host)))
            continue
        binds.append(Bind(host, f"/{name}"))
    # A link such as /bin -> usr/bin lends the host's programs only when its target directory
    # was lent too; into an image with its own /usr it would point at the image's programs.
    lent = {bind.target for bind in binds}
    for name, target in links:
        parts = Path(target.lstrip("/")).parts
        if parts and f"/{parts[0]}" in lent:
            os.symlink(target, view_path / name)
    return binds


def _enter_namespace() -> bool:
    """Enter the command's own namespace (:func:`pytest_layers.runtime.enter_for_command`);
    False, with a note, when none is possible here."""
    from pytest_layers import runtime

    error = runtime.enter_for_command()
    if error is not None:
        print(f"{PROG}: note: {error}; using a copy of the image", file=sys.stderr)
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CommandError(f"name the program to run: `{PROG} run {args.ref} -- CMD ...`")
    env = {}
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CommandError(f"--env {item!r}: write KEY=VALUE")
        env[key] = value
    return _sandboxed(
        args, command, readonly=not args.rw, network=args.network, env=env, host_tools=False
    )


def cmd_shell(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return _sandboxed(
        args, command, readonly=False, network="none", env={}, host_tools=args.host_tools
    )


def _sandboxed(
    args: argparse.Namespace,
    command: list[str],
    *,
    readonly: bool,
    network: str,
    env: dict[str, str],
    host_tools: bool,
) -> int:
    """``shell`` and ``run``: ``command`` (the image's /bin/sh when empty) in a throw-away
    view of ``args.ref``, confined in the sandbox; its exit code."""
    import signal

    from pytest_layers import runtime
    from pytest_layers.sandbox import DEFAULT_PATH, Sandbox

    interactive = not command
    if interactive:
        # The image's own shell: a host $SHELL would not exist inside, nor run confined.
        command = ["/bin/sh"]
    store = _store(args)
    cid = layer_names.resolve(store, args.ref)
    seen = _seen_chain(store, args.ref, cid)
    chain = store.chain(seen)
    _enter_namespace()
    # The lease keeps prune away from the image's layers while the shell runs.
    with store.lease([seen]), store.staging() as scratch:
        view = runtime.Runtime.for_command(store, scratch, backend=args.backend).open_view(
            _lowers(store, chain), readonly=readonly
        )
        try:
            root = view.path
            binds = _borrow_host_tools(root) if host_tools else []
            if binds:
                print(
                    f"{PROG}: note: bound read-only from the host into the sandbox "
                    f"(--host-tools): {', '.join(b.target for b in binds)}",
                    file=sys.stderr,
                )
            # (With host tools lent, the sandbox itself says whether /bin/sh is found.)
            if interactive and not binds and not _exists_inside(root, "bin/sh"):
                raise CommandError(
                    f"{args.ref} has no /bin/sh; name a program of the image after `--` "
                    f"(`{PROG} shell {args.ref} -- /path/in/image`), or pass --host-tools to "
                    "bind the host's /usr, /bin, /lib read-only into it"
                )
            if interactive:
                print(
                    f"{PROG}: shell in {args.ref} ({_short(cid)}); changes are thrown away on exit",
                    file=sys.stderr,
                )
            # Only what the shell needs: the host's environment (tokens, paths) is not the
            # image's business.
            given, env = env, {"PATH": DEFAULT_PATH, "HOME": "/root", "PYTEST_LAYERS_REF": args.ref}
            if "TERM" in os.environ:
                env["TERM"] = os.environ["TERM"]
            if interactive:
                env["PS1"] = f"[layers {_short(cid)}] \\w \\$ "
            env.update(given)
            # One program per command: the fork helper would cost more to start than it saves.
            sandbox = Sandbox(
                root, network=network, hostname=f"layers-{_short(cid)}", binds=binds, helper=False
            )
            sys.stdout.flush()
            sys.stderr.flush()
            # Like system(3): ^C and ^\ belong to the program, which decides whether to die.
            saved = [signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)]
            try:
                rc = sandbox.run(command, env=env)
            finally:
                signal.signal(signal.SIGINT, saved[0])
                signal.signal(signal.SIGQUIT, saved[1])
            return 128 - rc if rc < 0 else rc
        finally:
            view.close()


def cmd_export(args: argparse.Namespace) -> int:
    from pytest_layers import oci
    from pytest_layers.store import disk_use

    store = _store(args)
    cid = layer_names.resolve(store, args.ref)
    if args.with_init:
        seen = _seen_chain(store, args.ref, cid)
        if seen == cid:
            raise CommandError(
                f"{args.ref} has no init layer (--with-init adds a snapshot's init files, "
                "when its test had some); drop --with-init"
            )
        cid = seen
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
    kind = ("gzipped tar" if result.gzipped else "tar") if result.tar else "directory"
    print(
        f"exported {args.ref} ({len(result.diff_ids)} layers, "
        f"{human_size(disk_use([result.path]))} disk use) to {result.path} as {args.format} "
        f"{kind} in {time.monotonic() - started:.1f}s; manifest {result.manifest_digest}"
    )
    return 0


def _size(text: str) -> int:
    from pytest_layers import layertar

    try:
        return layertar.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_import(args: argparse.Namespace) -> int:
    from pytest_layers import imageref, layertar, oci

    source = imageref.parse(args.path)
    if source.transport == "docker":
        return cmd_pull(args, source)
    if source.tag and args.ref and source.tag != args.ref:
        raise UsageError(f"{args.path} names tag {source.tag!r} but --ref says {args.ref!r}")
    limits = layertar.Limits.from_env(
        max_layer_size=args.max_layer_size, max_ratio=args.max_ratio, max_header=args.max_header
    )
    store = _store(args, create=True)
    _enter_namespace()
    started = time.monotonic()
    result = oci.import_image(
        store,
        Path(source.path),
        name=args.name,
        ref=args.ref or source.tag,
        progress=None if args.quiet else _print_progress,
        limits=limits,
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
    cid = layer_names.resolve(store, args.ref)
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
        f"sent ({human_size(result.size)}), {result.existed} already there, {result.mounted} "
        f"mounted, in {time.monotonic() - started:.1f}s; manifest {result.manifest_digest}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    chain_ids = None
    if args.refs:
        wanted: list[str] = []
        for ref in args.refs:
            for info in store.chain(layer_names.resolve(store, ref)):
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


def cmd_doctor(args: argparse.Namespace) -> int:
    """Which backends work here, why the others do not, the fix, and the cost per test."""
    import tempfile

    from pytest_layers import namespaces, runtime
    from pytest_layers.backends import detect
    from pytest_layers.backends.base import trial_whiteout

    store = (Path(args.store) if args.store else default_store_path()).absolute()
    # Trials run beside the store, on its filesystem (which decides the whiteout flavor),
    # without creating the store.
    near = store
    while not (os.path.isdir(near) and os.access(near, os.W_OK | os.X_OK)) and near != near.parent:
        near = near.parent
    if not os.access(near, os.W_OK | os.X_OK):
        near = Path(tempfile.gettempdir())
    scratch = Path(tempfile.mkdtemp(prefix=".pytest-layers-doctor-", dir=near))
    try:
        probe = scratch / "flavor"
        probe.mkdir()
        flavor = trial_whiteout(probe, "x")
        entered = runtime.enter_for_command()
        ns_reason = entered.reason if entered is not None else ""
        where = "on overlayfs or similar" if flavor != "overlay" else "ok for kernel overlay"
        print(f"user {_user_name()}, store {store} ({where})")
        from pytest_layers import _subids

        print(_subids.describe())
        from pytest_layers import _cinit

        print(f"sandbox {_cinit.describe()}")
        findings = detect.diagnose(scratch / "trials", flavor=flavor, namespace_reason=ns_reason)
        for finding in findings:
            print(finding.line())
            if args.verbose and finding.detail:
                print(f"{'':<10}detail: {finding.detail}")
        picked = next((f for f in findings if f.works), None)
        if picked is None:
            print("auto picks: nothing works here; apply a fix above")
            return 1
        backend = detect.get_backend(picked.backend.split(" ")[0])
        cost = detect.measure_cost(backend, scratch / "cost")
        print(
            f"auto picks: {picked.backend}, {cost:.1f} ms per test "
            "(open, write, close on a 1,000-file image; median of 5)"
        )
        return 0
    finally:
        namespaces.remove_tree(scratch)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def cmd_prune(args: argparse.Namespace) -> int:
    # Opened (and its owners checked) first: inside a user namespace every unmapped owner
    # reads as nobody.
    store = _store(args)
    if os.geteuid() != 0:
        from pytest_layers import _subids, runtime

        if _subids.for_session():
            # Snapshots may hold files a program inside gave to the user's subordinate ids:
            # only in a user namespace mapping them may we remove them (as sessions do);
            # without one, prune removes what it can.
            runtime.enter_for_command()
    report = store.prune(keep_snapshots=args.keep_snapshots)
    print(
        f"removed {len(report.removed_layers)} layer(s), {len(report.removed_snapshots)} "
        f"snapshot(s), {report.removed_tmp} stale temporary dir(s); freed "
        f"{human_size(report.freed_bytes)} disk use; {report.kept_layers} layer(s) kept"
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
        "chain id (else of a diff_id), snapshot:NODEID (that test's latest snapshot) or "
        "snapshot:NODEID@N (its snapshot N); `ls -q` lists them. Sizes are disk use, as du "
        "counts it.",
    )
    parser.add_argument(
        "--store",
        metavar="PATH",
        help="Layer store (default: as pytest run here would use: ini layers_store, else "
        "<cache_dir>/layers, .pytest_cache/layers under the rootdir)",
    )
    parser.add_argument(
        "--store-shared",
        metavar="GROUP",
        help="The store is shared with the members of GROUP (default: ini layers_store_shared, "
        "else the store is yours alone)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("ls", help="List named layers and snapshots")
    p.add_argument("-q", "--quiet", action="store_true", help="Print refs only (each one a REF)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="Show an image as JSON (RootFS layers, chain ids, sizes)")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "diff",
        help="Changes of a layer against its parent, as docker diff",
        description="One line per change, `KIND /path` (A added, C changed, D deleted); "
        "backslash and non-printable characters in a path are escaped as `ls -b` does "
        "(\\n, \\t, \\ooo).",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument(
        "--init",
        action="store_true",
        help="For a snapshot: include its test's init files (what the test saw)",
    )
    p.add_argument(
        "--json", action="store_true", help='JSON list of {"Path", "Kind"}, paths unescaped'
    )
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
    p.add_argument(
        "--suid",
        action="store_true",
        help="Honour setuid/setgid bits and file capabilities (default: nosuid; trusted images "
        "only: anyone who can reach DIR runs them with their owner's rights)",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help="Honour device nodes (default: nodev; trusted images only)",
    )
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="Unmount a DIR mounted by `pytest-layers mount`")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser(
        "shell",
        help="Run the image's /bin/sh (or CMD) confined in a throw-away view of REF",
        description="Open a private writable view of REF, run the image's /bin/sh (or CMD) "
        "inside it, confined in namespaces with the view as its root (pivot_root, no new "
        "privileges, reduced capabilities, network: loopback only), and throw the view away on "
        "exit. The exit code is CMD's.",
        usage=f"{PROG} shell [-h] [--backend NAME] [--host-tools] REF [-- CMD ...]",
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
        "--host-tools",
        dest="host_tools",
        action="store_true",
        help="Bind the host's /usr, /bin, /lib read-only into an image that has none",
    )
    # The default until 0.x was to borrow; the old opt-out stays accepted.
    p.add_argument(
        "--no-host-tools", dest="host_tools", action="store_false", help=argparse.SUPPRESS
    )
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser(
        "run",
        help="Run CMD confined inside REF (its exit code passes through)",
        description="Run CMD with a view of REF as its root, confined as `shell` confines "
        "(namespaces, pivot_root, no new privileges, reduced capabilities). The view is "
        "read-only unless --rw (then writes are thrown away on exit). The exit code is CMD's.",
        usage=f"{PROG} run [-h] [--rw] [--env K=V] [--network none|host] REF -- CMD ...",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    p.add_argument("--rw", action="store_true", help="A writable (throw-away) view")
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="Set K in CMD's environment"
    )
    p.add_argument(
        "--network",
        default="none",
        choices=("none", "host"),
        help="none: loopback only (default); host: the host's network",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "overlay", "fuse", "copy"),
        help="Mount backend (default: auto)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "export",
        help="Export an image as an OCI layout or docker-archive",
        description="PATH's name picks the output: *.tar a tar, *.tar.gz or *.tgz a gzipped "
        "tar, any other name a directory (oci) or a tar (docker-archive); --tar/--dir "
        "override it. A snapshot is exported without its test's init layer unless --with-init.",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="Output (must not exist)")
    p.add_argument("--format", choices=("oci", "docker-archive"), default="oci")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--tar", action="store_true", help="Write a tar (default for *.tar)")
    form.add_argument("--dir", action="store_true", help="Write a directory (oci only)")
    p.add_argument(
        "--with-init",
        action="store_true",
        help="For a snapshot: keep its test's init layer (under the rw layer) in the image",
    )
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
    p.add_argument(
        "--max-layer-size",
        type=_size,
        metavar="SIZE",
        help="Largest uncompressed layer (default 8G; env PYTEST_LAYERS_MAX_LAYER_SIZE)",
    )
    p.add_argument(
        "--max-ratio",
        type=int,
        metavar="N",
        help="Largest compression ratio past 256M (default 100; env PYTEST_LAYERS_MAX_RATIO)",
    )
    p.add_argument(
        "--max-header",
        type=_size,
        metavar="SIZE",
        help="Largest tar PAX/long-name header (default 1M; env PYTEST_LAYERS_MAX_HEADER)",
    )
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

    p = sub.add_parser(
        "verify", help="Re-hash layers and report damage (all, or the chains of the REFs)"
    )
    p.add_argument("refs", nargs="*", metavar="REF")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "doctor",
        help="Say which backends work here, why the others do not and the fix, and the "
        "per-test cost of the one auto picks",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="Also print each full reason")
    p.set_defaults(func=cmd_doctor)

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


def _output_closed() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as a Unix tool does.

    The recipe of the Python docs (signal module, "Note on SIGPIPE"): point stdout at
    /dev/null so that the interpreter's own flush at exit does not raise again. The status is
    the shell's for a program killed by SIGPIPE (a pipeline without ``pipefail`` reports the
    reader's status anyway)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


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
        rc = int(args.func(args))
        _print_warnings()
        sys.stdout.flush()  # here, so that a closed pipe is seen below and not at exit
        return rc
    except BrokenPipeError:
        return _output_closed()
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
