"""The ``imgci`` command line: argument parsing, the docker-like commands, and the error boundary.

Contract: this is the only module that prints. Every ``ImgciError`` is reported as ``error: <message>`` (plus a
``hint:`` line) on stderr with exit status 1 and no traceback (``--debug`` adds it); a usage error exits 2;
Ctrl-C exits 130. Heavy modules (requests, the registry client, archive code) are imported by the command that
needs them, so ``imgci ls`` and ``imgci version`` start fast.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from imgci import __version__
from imgci.errors import ImgciError, UsageError
from imgci.ui import Progress, human_ago, human_created, human_size, table

Handler = Callable[[argparse.Namespace], int]


def _store(args: argparse.Namespace) -> Any:
    from imgci.store import Store

    return Store(Path(args.state) if args.state else None)


def _platform(args: argparse.Namespace) -> Any:
    from imgci.oci import Platform

    return Platform.parse(args.platform) if getattr(args, "platform", None) else Platform.host()


def _insecure(args: argparse.Namespace) -> set[str]:
    hosts = set(getattr(args, "insecure_registry", None) or [])
    hosts |= {h.strip() for h in os.environ.get("IMGCI_INSECURE_REGISTRIES", "").split(",") if h.strip()}
    return hosts


def _client_factory(args: argparse.Namespace) -> Any:
    """One registry client per registry for this command, sharing a token cache (a ``ClientPool``)."""
    from imgci.registry import ClientPool, RetryPolicy

    return ClientPool(insecure_registries=_insecure(args), retry=RetryPolicy(attempts=_retries(args)))


def _retries(args: argparse.Namespace) -> int:
    attempts = args.retries if args.retries is not None else int(os.environ.get("IMGCI_REGISTRY_RETRIES", "5") or 5)
    if attempts < 1:
        raise UsageError("--retries must be at least 1")
    return int(attempts)


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(getattr(args, "progress", "auto") or "auto")


# -- commands ----------------------------------------------------------------------------------------------------
def cmd_version(args: argparse.Namespace) -> int:
    import platform

    print(f"imgci version {__version__}")
    print(f"python:   {platform.python_version()} ({sys.executable})")
    print(f"platform: {platform.system().lower()}/{platform.machine()}")
    from imgci.store import default_root

    print(f"state:    {args.state or default_root()}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from imgci.images import list_images

    store = _store(args)
    images = list_images(store, args.filter)
    if args.quiet:
        for img in images:
            print(img.digest.value if args.digests else img.familiar)
        return 0
    if args.format == "json":
        print(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "digest": i.digest.value,
                        "mediaType": i.media_type,
                        "size": i.size,
                        "created": i.created,
                        "updated": i.updated,
                        "platforms": list(i.platforms),
                    }
                    for i in images
                ],
                indent=2,
            )
        )
        return 0
    rows = [["NAME", "SIZE", "CREATED AT", "UPDATED AT", "DIGEST"]]
    now = time.time()
    for i in images:
        rows.append(
            [i.familiar, human_size(i.size), human_created(i.created, now), human_ago(i.updated, now), i.digest.value]
        )
    table(rows, sys.stdout)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from imgci.images import tag

    tag(_store(args), args.source, args.target)
    print(f"Successfully tagged {args.source} as {args.target}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from imgci.images import remove

    removed, blobs, freed = remove(_store(args), args.images)
    for rec in removed:
        print(f"Untagged: {rec.name}")
    print(f"Deleted {blobs} blobs, reclaimed {human_size(freed)}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    from imgci.images import disk_usage

    rows_data = disk_usage(_store(args))
    if args.filter:
        for f in args.filter:
            key, _, value = f.partition("=")
            if key != "reclaimable" or value not in ("true", "false"):
                raise UsageError(f"invalid du filter {f!r}: supported is reclaimable=true|false")
            rows_data = [r for r in rows_data if r.reclaimable == (value == "true")]
    rows = [["ID", "RECLAIMABLE", "SIZE", "DESCRIPTION"]]
    for r in rows_data:
        rows.append([r.digest.value, str(r.reclaimable).lower(), human_size(r.size), r.description])
    table(rows, sys.stdout)
    print(f"Reclaimable:\t{human_size(sum(r.size for r in rows_data if r.reclaimable))}")
    print(f"Total:\t\t{human_size(sum(r.size for r in rows_data))}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from imgci.images import disk_usage

    store = _store(args)
    cache_removed = _prune_cache(store, args)
    candidates = [r for r in disk_usage(store) if r.reclaimable]
    blobs, freed = store.gc(dry_run=args.dry_run)
    layers_removed = 0
    if not args.dry_run and (store.root / "layers").is_dir():
        # Unpacked layers are a cache: keep those of images still in the store, drop the rest.
        from imgci.build.layerstore import LayerStore
        from imgci.images import manifests_of

        keep = set()
        for rec in store.list_refs():
            for manifest, _plat in manifests_of(store, rec.digest, rec.media_type):
                keep.update(store.read_config(manifest.config.digest).diff_ids)
        with LayerStore(store) as layer_store:
            layers_removed, layer_bytes = layer_store.gc_unpacked(keep)
            freed += layer_bytes
            if any((store.root / d).is_dir() for d in ("snapshots", "tmp", "cache/mounts")):
                from imgci.build.sandbox.cleanup import sweep

                _, sandbox_bytes = sweep(store.root, layer_store, keep)
                freed += sandbox_bytes
    rows = [["ID", "RECLAIMABLE", "SIZE", "DESCRIPTION"]]
    for r in candidates:
        rows.append([r.digest.value, "true", human_size(r.size), r.description])
    if len(rows) > 1:
        table(rows, sys.stdout)
    verb = "Would reclaim" if args.dry_run else "Reclaimed"
    cache = f", {cache_removed} build cache entries" if cache_removed else ""
    print(f"{verb}:\t{human_size(freed)} ({blobs} blobs, {layers_removed} unpacked layers{cache})")
    return 0


def _prune_cache(store: Any, args: argparse.Namespace) -> int:
    """Drop build cache records as ``--all``, ``--filter until=``, ``--keep-storage`` ask (their blobs go with gc)."""
    from imgci.cache.local import LocalCache
    from imgci.units import parse_duration, parse_size

    until = None
    for item in args.filter:
        key, _, value = item.partition("=")
        if key != "until" or not value:
            raise UsageError(f"invalid --filter {item!r}: only until=DURATION is supported (e.g. until=24h)")
        try:
            until = parse_duration(value)
        except ValueError as e:
            raise UsageError(f"--filter {item}: {e}") from None
    keep = None
    if args.keep_storage is not None:
        try:
            keep = parse_size(args.keep_storage)
        except ValueError as e:
            raise UsageError(f"--keep-storage: {e}") from None
    if not (args.all or until is not None or keep is not None):
        return 0
    local = LocalCache(store)
    if args.dry_run:
        return len(local.records()) if args.all else 0
    return local.prune(until=until, keep_storage=keep, everything=args.all)


def cmd_fsck(args: argparse.Namespace) -> int:
    store = _store(args)
    problems = store.fsck()
    for p in problems:
        print(f"problem: {p}")
    if problems:
        print(f"{len(problems)} problem(s) found in {store.root}", file=sys.stderr)
        return 1
    print(f"ok: {sum(1 for _ in store.iter_blobs())} blobs and {len(store.list_refs())} refs verified")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from imgci.images import config_of, resolve

    store = _store(args)
    rec = resolve(store, args.image)
    platform = _platform(args) if args.platform else None
    if args.type == "index":
        sys.stdout.write(store.read_blob(rec.digest).decode() + "\n")
        return 0
    manifest, cfg = config_of(store, rec, platform)
    if args.type == "manifest":
        sys.stdout.write(manifest.raw.decode() + "\n")
    elif args.type == "config":
        print(json.dumps(cfg.doc, indent=2))
    else:
        out = {
            "Name": rec.name,
            "Digest": rec.digest.value,
            "MediaType": rec.media_type,
            "Manifest": json.loads(manifest.raw),
            "Config": cfg.doc,
        }
        print(json.dumps(out, indent=2))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from imgci import reference
    from imgci.transfer import pull_image

    store = _store(args)
    ref = reference.parse(args.image)
    print(f"Pulling {ref}...")
    progress = _progress(args)
    pool = _client_factory(args)
    try:
        platform = _platform(args) if args.platform else None  # explicit --platform is strict, as in docker
        result = pull_image(store, ref, platform=platform, client_factory=pool, progress=progress)
    finally:
        progress.close()
        pool.close()
    print(f"Digest: {result.digest}")
    print(f"Size: {human_size(result.size)}")
    print(f"Pulled {result.name}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from imgci import reference
    from imgci.images import resolve
    from imgci.transfer import push_image

    store = _store(args)
    rec = resolve(store, args.image)
    dest = reference.parse(args.destination or args.image)
    print(f"Pushing {dest}...")
    progress = _progress(args)
    pool = _client_factory(args)
    try:
        result = push_image(store, rec.name, dest, client_factory=pool, progress=progress)
    finally:
        progress.close()
        pool.close()
    print(
        f"Uploaded {result.uploaded_blobs} blobs ({human_size(result.uploaded_bytes)}), "
        f"{result.skipped_blobs} already present, {result.mounted_blobs} mounted"
    )
    print(f"Successfully pushed {dest}@{result.digest}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from imgci.archive import save_archive
    from imgci.images import resolve

    store = _store(args)
    images = []
    for name in args.images:
        rec = resolve(store, name)
        images.append((rec.name, rec.digest))
    if not args.output and sys.stdout.isatty():
        raise UsageError("refusing to write a tar archive to a terminal; use -o FILE or redirect stdout")
    save_archive(store, images, args.format, args.output, sys.stdout.buffer)
    if args.output:
        print(f"Saved {', '.join(args.images)} to {args.output}", file=sys.stderr)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from imgci.archive import load_archive

    store = _store(args)
    if args.input:
        with open(args.input, "rb") as f:
            names = load_archive(store, f)
    else:
        names = load_archive(store, sys.stdin.buffer)
    for n in names:
        print(f"Loaded image: {n}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from imgci.images import config_of, resolve
    from imgci.layerfs import unpack_image

    store = _store(args)
    rec = resolve(store, args.image)
    manifest, _cfg = config_of(store, rec, _platform(args) if args.platform else None)
    target = Path(args.output or "rootfs").absolute()
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"output directory {target} is not empty")
    # A failure (a hostile layer, a full disk) leaves no half-written rootfs: what was unpacked is removed, and the
    # target itself when this command made it (the parent directory is never written to otherwise).
    from imgci.build.sandbox.snapshots import remove_tree

    made = not target.exists()
    try:
        stats = unpack_image(store, manifest, target)
    except BaseException:
        if made:
            remove_tree(target)
        elif target.is_dir():
            for child in list(target.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    remove_tree(child)
                else:
                    child.unlink()
        raise
    for w in getattr(stats, "warnings", []) or []:
        print(f"warning: {w}", file=sys.stderr)
    print(f"Successfully unpacked rootfs for {args.image} to: {target}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from imgci import reference
    from imgci.archive import import_rootfs

    store = _store(args)
    changes = _parse_changes(args.change or [])
    name = str(reference.parse(args.name)) if args.name else None
    src = sys.stdin.buffer if args.file == "-" else Path(args.file)
    desc = import_rootfs(store, src, platform=_platform(args), changes=changes, compression=args.compression)
    if name:
        store.set_ref(name, desc)
        print(f"Imported {args.file} as {name}")
    print(desc.digest.value)
    return 0


_MULTI_CHANGES = {"env", "label", "labels", "expose", "exposedports", "volume", "volumes"}


def _parse_changes(items: list[str]) -> dict[str, Any]:
    """``--change`` values as docker spells them (``CMD ["sh"]``, ``ENV A=1``) or as ``KEY=VALUE``."""
    import re

    changes: dict[str, Any] = {}
    for c in items:
        m = re.match(r"^\s*([A-Za-z]+)(?:\s+|=)(.*)$", c, re.S)
        if not m:
            raise UsageError(f"invalid --change {c!r}: expected INSTRUCTION VALUE, e.g. 'CMD [\"sh\"]' or 'ENV A=1'")
        key, value = m.group(1), m.group(2).strip()
        if key.lower() in _MULTI_CHANGES:
            if key.lower() == "env" and "=" not in value and " " in value:  # ENV KEY VALUE (legacy form)
                value = "=".join(value.split(None, 1))
            if key.lower() in ("expose", "volume"):
                values = value.split()
            elif key.lower() in ("env", "label", "labels"):
                import shlex

                values = shlex.split(value)  # ENV A=1 B="two words"
            else:
                values = [value]
            changes.setdefault(key, []).extend(values)
        else:
            changes[key] = value
    return changes


def cmd_login(args: argparse.Namespace) -> int:
    from imgci.registry import login

    server = args.server or "docker.io"
    username = args.username
    password = args.password
    if args.password_stdin:
        if password:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        password = sys.stdin.readline().rstrip("\r\n")
    elif password:
        print("warning: using --password on the command line is insecure; use --password-stdin", file=sys.stderr)
    if not username:
        if not sys.stdin.isatty():
            raise UsageError("login needs --username (and --password-stdin) when stdin is not a terminal")
        username = input("Username: ")
    if not password:
        import getpass

        password = getpass.getpass("Password: ")
    registry = login(server, username, password, insecure=server in _insecure(args))
    print(f"Login Succeeded ({registry})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from imgci.registry import logout

    registry = logout(args.server or "docker.io")
    print(f"Removing login credentials for {registry}")
    return 0


class _LazyPool:
    """A ClientPool made on first use: a build whose base images are all in the store never imports the HTTP stack
    (``requests`` alone costs ~30 ms of a 0.15 s cached rebuild)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._pool: Any = None
        self._lock = threading.Lock()  # a push warm-up thread and the build's pulls may ask at once
        _retries(args)  # bad --retries is a usage error now, not at the first pull

    def __call__(self, registry: str) -> Any:
        with self._lock:
            if self._pool is None:
                self._pool = _client_factory(self._args)
            pool = self._pool
        return pool(registry)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()


def cmd_build_entry(args: argparse.Namespace) -> int:
    from imgci.cli_build import run_build

    store = _store(args)
    pool = _LazyPool(args)
    try:
        return run_build(args, store, pool)
    finally:
        pool.close()


# -- parser ------------------------------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument("-s", "--state", default=argparse.SUPPRESS, help="state directory (env IMGCI_STATE)")
    g.add_argument("-d", "--debug", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    g.add_argument(
        "--insecure-registry",
        action="append",
        default=argparse.SUPPRESS,
        metavar="HOST",
        help="allow plain HTTP / unverified TLS for HOST[:PORT] (repeatable; env IMGCI_INSECURE_REGISTRIES)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="attempts per registry request on transient errors (default 5; env IMGCI_REGISTRY_RETRIES)",
    )
    g.add_argument(
        "--progress",
        choices=["auto", "tty", "plain", "json", "quiet"],
        default=argparse.SUPPRESS,
        help="progress output (default auto: live on a terminal, plain lines in CI)",
    )
    return p


COMMANDS = frozenset(
    {
        *("build", "pull", "push", "tag", "ls", "rm", "save", "load", "unpack", "inspect", "import"),
        *("du", "prune", "fsck", "login", "logout", "run", "plan", "schema", "doctor", "version"),
    }
)
"""Every command :func:`build_parser` knows (a test holds the two together)."""


def command_index(argv: Sequence[str], common: argparse.ArgumentParser) -> int | None:
    """Where the command is in ``argv``: its first argument that is neither one of ``common``'s (global) options nor
    such an option's value; None if there is none."""
    with_value = {o for a in common._actions if a.nargs != 0 for o in a.option_strings}
    i = 0
    while i < len(argv):
        if argv[i].startswith("-"):
            i += 2 if argv[i] in with_value else 1
            continue
        return i
    return None


def build_parser(only: str | None = None, common: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """imgci's parser: every command, or (``only``) just that one's — what a command line naming a command needs.
    Building all ~20 sub-parsers is ~12 ms of every start (argparse looks up each help string's translation).
    ``common``: the global options' parser (:func:`_common`), when the caller has made it already."""
    common = common or _common()
    parser = argparse.ArgumentParser(
        prog="imgci",
        description="Daemon-less, unprivileged Dockerfile and OCI image builder for CI.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        sp.set_defaults(handler=handler)
        return sp

    def want(name: str) -> bool:
        return only is None or name == only

    if want("build"):
        from imgci.cli_build import add_parser as add_build

        add_build(sub, common)

    if want("pull"):
        p = add("pull", cmd_pull, "Pull an image from a registry.")
        p.add_argument("image", metavar="NAME[:TAG|@DIGEST]")
        p.add_argument("--platform", help="os/arch[/variant] to pull from a multi-platform image (default: host)")

    if want("push"):
        p = add("push", cmd_push, "Push an image to a registry.")
        p.add_argument("image", metavar="NAME[:TAG]")
        p.add_argument("destination", nargs="?", metavar="DEST[:TAG]", help="push under another name (default NAME)")

    if want("tag"):
        p = add("tag", cmd_tag, "Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE.")
        p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
        p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")

    if want("ls"):
        p = add("ls", cmd_ls, "List images and digests.")
        p.add_argument("-f", "--filter", action="append", default=[], help="reference=GLOB, digest=, label=K[=V], ...")
        p.add_argument("-q", "--quiet", action="store_true", help="only names")
        p.add_argument("--digests", action="store_true", help="with -q: print digests")
        p.add_argument("--format", choices=["table", "json"], default="table")

    if want("rm"):
        p = add("rm", cmd_rm, "Remove one or more images.")
        p.add_argument("images", nargs="+", metavar="IMAGE")

    if want("save"):
        p = add("save", cmd_save, "Save images to a tar archive (streamed to STDOUT by default).")
        p.add_argument("images", nargs="+", metavar="IMAGE")
        p.add_argument("-o", "--output", help="write to a file, instead of STDOUT")
        p.add_argument("--format", choices=["docker", "oci"], default="docker", help="archive format (default docker)")

    if want("load"):
        p = add("load", cmd_load, "Load images from a docker-archive or OCI-layout tar (STDIN by default).")
        p.add_argument("-i", "--input", help="read from a file instead of STDIN")

    if want("unpack"):
        p = add("unpack", cmd_unpack, "Unpack an image to a rootfs directory.")
        p.add_argument("image", metavar="IMAGE")
        p.add_argument("-o", "--output", help="directory to unpack to (default ./rootfs)")
        p.add_argument("--platform", help="platform to unpack from a multi-platform image")

    if want("inspect"):
        p = add("inspect", cmd_inspect, "Show an image's manifest and config as JSON.")
        p.add_argument("image", metavar="IMAGE")
        p.add_argument("--type", choices=["all", "manifest", "config", "index"], default="all")
        p.add_argument("--platform", help="platform to show from a multi-platform image")

    if want("import"):
        p = add("import", cmd_import, "Create an image from a rootfs tarball (like docker import).")
        p.add_argument("file", metavar="FILE|-", help="rootfs tarball (any compression), or - for STDIN")
        p.add_argument("name", nargs="?", metavar="NAME[:TAG]")
        p.add_argument(
            "-c",
            "--change",
            action="append",
            help="apply a Dockerfile instruction: 'CMD [\"sh\"]', 'ENV K=V', 'WORKDIR /app', ... (repeatable)",
        )
        p.add_argument("--platform", help="platform to record (default: host)")
        p.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")

    if want("du"):
        p = add("du", cmd_du, "Show disk usage of the state store.")
        p.add_argument("-f", "--filter", action="append", default=[], help="reclaimable=true|false")

    if want("prune"):
        p = add("prune", cmd_prune, "Remove blobs no image or cache entry references, and old build cache.")
        p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
        p.add_argument("-a", "--all", action="store_true", help="remove the whole build cache too")
        p.add_argument(
            "--keep-storage", metavar="SIZE", help="remove least recently used build cache above SIZE (e.g. 5g)"
        )
        p.add_argument(
            "--filter",
            action="append",
            default=[],
            metavar="until=DURATION",
            help="remove build cache unused for DURATION",
        )

    if want("fsck"):
        add("fsck", cmd_fsck, "Verify every blob's digest and every image's references.")

    if want("login"):
        p = add("login", cmd_login, "Log in to a registry (writes docker's config.json).")
        p.add_argument("server", nargs="?", metavar="SERVER", help="registry host (default Docker Hub)")
        p.add_argument("-u", "--username")
        p.add_argument("-p", "--password")
        p.add_argument("--password-stdin", action="store_true", help="take the password from STDIN")

    if want("logout"):
        p = add("logout", cmd_logout, "Log out from a registry.")
        p.add_argument("server", nargs="?", metavar="SERVER")

    if only is None or only in ("run", "plan", "schema"):
        from imgci.cli_run import add_parsers as add_run

        add_run(sub, common)
    if want("doctor"):
        from imgci.cli_doctor import add_parser as add_doctor

        add_doctor(sub, common)
    if want("version"):
        add("version", cmd_version, "Show the version information.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from imgci.cli_run import implicit_run

    common = _common()
    words = list(sys.argv[1:] if argv is None else argv)
    i = command_index(words, common)
    words = implicit_run(words, i, COMMANDS)
    command = words[i] if i is not None else None
    # A known command needs only its own sub-parser; anything else (no command, a typo, --help) gets the whole
    # parser, for its usage and its list of commands.
    parser = build_parser(command if command in COMMANDS else None, common)
    args = parser.parse_args(words)
    defaults: tuple[tuple[str, Any], ...] = (
        ("state", None),
        ("debug", False),
        ("insecure_registry", []),
        ("progress", "auto"),
        ("retries", None),
    )
    for name, default in defaults:
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.state is None and os.environ.get("IMGCI_STATE"):
        args.state = os.environ["IMGCI_STATE"]
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    if threading.current_thread() is threading.main_thread():
        # A CI job cancelled with SIGTERM stops like Ctrl-C: running steps are killed and cleaned up.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handler(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 2
    except ImgciError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `imgci save img | head`: the reader went away; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run() -> NoReturn:
    """The entry point of the ``imgci`` console script and ``python -m imgci``: :func:`main`, then the exit.

    Once the command is done, the interpreter's own teardown (destroying every module and object one by one) is
    ~15 ms of a cached build's ~0.12 s, and has nothing left to do for a process that exits: the exit handlers
    (logging's flush, temporary directories' finalizers, …) run and stdout/stderr are flushed, then
    :func:`os._exit`. Where another non-daemon thread still runs, Python's normal exit waits for it instead."""
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if others or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    try:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BrokenPipeError:
        code = code or 1
    except BaseException:
        sys.exit(code)  # the normal exit reports it
    os._exit(code)


if __name__ == "__main__":
    run()
