"""Conformance harness: case contexts, image normalisation and comparison.

Contract:

* A *case* is a directory ``cases/<name>/`` holding a ``Dockerfile``, an optional ``context/`` tree (kept in git)
  and a ``case.json`` that says how to build it (build args, ``--target``, which image the delta is taken
  against, context entries git cannot keep faithfully: modes, symlinks, hardlinks, empty dirs, generated
  archives; files served over HTTP). :func:`load_case` reads it, :func:`materialise_context` writes the build
  context into a directory with exact modes and a fixed mtime.
* :func:`normalise_archive` turns a ``docker save`` archive or an OCI-layout tar (``imgci save --format oci``)
  into a plain dict: the config fields a Dockerfile controls, the history entries the build added, every
  layer the build added (one entry per tar member) and the file-system *delta* (final root file system minus
  the base image's). The expected results in ``expected/<name>.json`` have that shape plus provenance.
* :func:`compare` lists readable differences between an expected and an actual normalised image, ignoring
  what :data:`DEFAULT_IGNORES` documents as builder-specific.

It does not import imgci: like ``tests/infra`` it checks imgci's output independently (stdlib only; zstd
layers need the ``zstandard`` package).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import gzip
import hashlib
import http.server
import io
import json
import lzma
import os
import shutil
import socketserver
import stat
import tarfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tests.infra.rootfs import GROUP, PASSWD, make_busybox_rootfs_tar, make_tar

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
EXPECTED_DIR = HERE / "expected"
FIXTURES_DIR = HERE / "fixtures"

#: mtime of every entry of a materialised build context (2022-04-15); archives in case.json default to it too
CONTEXT_MTIME = 1_650_000_000
#: what a build-time mtime (a directory the builder created or changed, "now") is normalised to
BUILD_TIME = "build-time"

# -- the base image ----------------------------------------------------------------------------------------------
#: users and groups of the base image, so that --chown/USER by name can be resolved
BASE_PASSWD = PASSWD + (
    b"app:x:1000:1000:app:/home/app:/bin/sh\n"
    b"svc:x:1001:50:svc:/nonexistent:/bin/false\n"  # primary group staff (50), not a group of its own
)
BASE_GROUP = GROUP + b"staff:x:50:\napp:x:1000:\nother:x:2000:\n"
BASE_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the base image's config, identical on the reference side (docker import -c) and imgci's (imgci import)
BASE_CHANGES = (f"ENV {BASE_PATH_ENV}", 'CMD ["sh"]')


#: directories the base has besides tests/infra's minimal rootfs, as the busybox image on Docker Hub does (0555
#: like Debian's): without ``/sys`` the reference's runtime creates it as a mount point in the first RUN layer
#: of every case (``run_mountpoints`` checks that on a bare root file system instead)
BASE_EXTRA_DIRS = {"sys": 0o555}


def make_base_rootfs(path: str | Path) -> Path:
    """The busybox root file system every case builds on (``ARG BASE`` / ``FROM $BASE``): tests/infra's
    busybox rootfs with :data:`BASE_PASSWD`, :data:`BASE_GROUP` and :data:`BASE_EXTRA_DIRS`, members sorted
    by name, byte-for-byte reproducible."""
    target = make_busybox_rootfs_tar(path, extra_files={"etc/passwd": BASE_PASSWD, "etc/group": BASE_GROUP})
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(target) as tar:
        mtime = 0
        for ti in tar:
            f = tar.extractfile(ti) if ti.isfile() else None
            members.append((ti, f.read() if f is not None else b""))
            mtime = max(mtime, int(ti.mtime))
    names = {ti.name.rstrip("/") for ti, _ in members}
    for name, mode in BASE_EXTRA_DIRS.items():
        if name not in names:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, mtime
            info.uname = info.gname = "root"
            members.append((info, b""))
    members.sort(key=lambda m: m[0].name.rstrip("/"))
    return make_tar(target, members)


# -- cases ---------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    dir: Path
    spec: dict[str, Any]

    @property
    def dockerfile(self) -> Path:
        return self.dir / "Dockerfile"

    @property
    def build_args(self) -> dict[str, str]:
        return dict(self.spec.get("build_args", {}))

    @property
    def target(self) -> str | None:
        return self.spec.get("target")

    @property
    def base(self) -> str:
        """What the delta is taken against: ``busybox`` (the default), ``scratch``, or ``case:<name>``."""
        return str(self.spec.get("base", "busybox"))

    @property
    def needs(self) -> list[dict[str, str]]:
        """Images other cases must have built first: ``[{"case": name, "arg": BUILD_ARG}]``."""
        return list(self.spec.get("needs", []))

    @property
    def http(self) -> dict[str, Any] | None:
        """Files to serve on 127.0.0.1 during the build; the URL is passed as build arg ``http["arg"]``."""
        return self.spec.get("http")

    @property
    def reference_dockerfile(self) -> Path:
        """What a reference builder builds: ``case.json``'s ``reference_dockerfile`` (an equivalent Dockerfile
        for syntax the references here cannot parse, e.g. RUN here-documents), else :attr:`dockerfile`."""
        name = self.spec.get("reference_dockerfile")
        return self.dir / name if name else self.dockerfile

    @property
    def reference_history(self) -> dict[int, str]:
        """``created_by`` strings that replace a reference build's (by index into the build's history entries)
        when it built :attr:`reference_dockerfile` instead of the case's own Dockerfile."""
        return {int(k): str(v) for k, v in self.spec.get("reference_history", {}).items()}

    @property
    def manual(self) -> str | None:
        """For an expectation written by hand: where the behaviour is documented."""
        return self.spec.get("manual")

    @property
    def expected_path(self) -> Path:
        return EXPECTED_DIR / f"{self.name}.json"

    def expected(self) -> dict[str, Any]:
        return json.loads(self.expected_path.read_text())


def load_case(name: str) -> Case:
    d = CASES_DIR / name
    spec_path = d / "case.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    return Case(name, d, spec)


def list_cases() -> list[str]:
    return sorted(p.name for p in CASES_DIR.iterdir() if (p / "Dockerfile").exists())


def build_order(names: list[str]) -> list[str]:
    """``names`` plus the cases they need, each after the cases it needs."""
    out: list[str] = []

    def visit(n: str, stack: tuple[str, ...]) -> None:
        if n in out:
            return
        if n in stack:
            raise ValueError(f"cases need each other: {' -> '.join((*stack, n))}")
        for need in load_case(n).needs:
            visit(need["case"], (*stack, n))
        out.append(n)

    for n in names:
        visit(n, ())
    return out


# -- contexts ------------------------------------------------------------------------------------------------------
def _content(spec: Mapping[str, Any]) -> bytes:
    if "content_b64" in spec:
        return base64.b64decode(spec["content_b64"])
    if "repeat" in spec:  # {"repeat": "ab", "times": 1000}
        return (str(spec["repeat"]) * int(spec.get("times", 1))).encode()
    return str(spec.get("content", "")).encode()


def _mode(spec: Mapping[str, Any], default: int) -> int:
    m = spec.get("mode")
    return default if m is None else int(str(m), 8)


def archive_bytes(spec: Mapping[str, Any]) -> bytes:
    """A tar archive from ``{"compression": "none|gz|xz|bz2", "entries": [...]}``, byte-for-byte reproducible.

    Entries: ``{"path", "type": "file|dir|symlink|hardlink", "content", "mode", "uid", "gid", "mtime",
    "target"}`` written in the given order (PAX format, uname/gname empty)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in spec["entries"]:
            kind = e.get("type", "file")
            info = tarfile.TarInfo(e["path"])
            info.uid, info.gid = int(e.get("uid", 0)), int(e.get("gid", 0))
            info.uname = info.gname = ""
            info.mtime = int(e.get("mtime", CONTEXT_MTIME))
            data = b""
            if kind == "file":
                data = _content(e)
                info.size = len(data)
                info.mode = _mode(e, 0o644)
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, _mode(e, 0o755)
            elif kind == "symlink":
                info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, e["target"]
            elif kind == "hardlink":
                info.type, info.mode, info.linkname = tarfile.LNKTYPE, _mode(e, 0o644), e["target"]
            else:
                raise ValueError(f"unknown archive entry type {kind!r}")
            tar.addfile(info, io.BytesIO(data) if data else None)
    raw = out.getvalue()
    compression = spec.get("compression", "none")
    if compression == "gz":
        return gzip.compress(raw, mtime=0)
    if compression == "xz":
        return lzma.compress(raw, format=lzma.FORMAT_XZ)
    if compression == "bz2":
        import bz2

        return bz2.compress(raw)
    if compression != "none":
        raise ValueError(f"unknown compression {compression!r}")
    return raw


def materialise_context(case: Case | str, dest: str | Path) -> Path:
    """Write ``case``'s build context into ``dest`` (created if needed) and return it.

    Files from ``context/`` get mode 0644 (0755 when executable in the checkout), directories 0755, whatever
    the umask; then the ``context`` entries of case.json are applied in order (``file``, ``dir``, ``symlink``,
    ``hardlink``, ``archive``, ``chmod``, ``remove``); finally every entry's mtime (symlinks included) is
    set to :data:`CONTEXT_MTIME` (or the entry's own ``mtime``)."""
    if isinstance(case, str):
        case = load_case(case)
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    src = case.dir / "context"
    if src.is_dir():
        for dirpath, dirnames, filenames in os.walk(src):
            rel = Path(dirpath).relative_to(src)
            for d in dirnames:
                (root / rel / d).mkdir(exist_ok=True)
                os.chmod(root / rel / d, 0o755)
            for f in filenames:
                s, t = Path(dirpath) / f, root / rel / f
                if s.is_symlink():
                    os.symlink(os.readlink(s), t)
                    continue
                shutil.copyfile(s, t)
                os.chmod(t, 0o755 if os.stat(s).st_mode & 0o100 else 0o644)
    mtimes: dict[str, int] = {}
    for e in case.spec.get("context", []):
        kind = e.get("type", "file")
        p = root / e["path"]
        if kind not in ("chmod", "remove"):
            p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            p.write_bytes(_content(e))
            os.chmod(p, _mode(e, 0o644))
        elif kind == "dir":
            p.mkdir(exist_ok=True)
            os.chmod(p, _mode(e, 0o755))
        elif kind == "symlink":
            os.symlink(e["target"], p)
        elif kind == "hardlink":
            os.link(root / e["target"], p)
        elif kind == "archive":
            p.write_bytes(archive_bytes(e))
            os.chmod(p, _mode(e, 0o644))
        elif kind == "chmod":
            os.chmod(p, _mode(e, 0o644))
        elif kind == "remove":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        else:
            raise ValueError(f"{case.name}: unknown context entry type {kind!r}")
        if "mtime" in e:
            mtimes[e["path"]] = int(e["mtime"])
    # mtimes last, deepest first, so that setting a child's never disturbs its directory's
    paths = [Path(dp) / n for dp, dns, fns in os.walk(root) for n in (*dns, *fns)]
    for p in sorted(paths, key=lambda x: len(x.parts), reverse=True):
        t = mtimes.get(p.relative_to(root).as_posix(), CONTEXT_MTIME)
        os.utime(p, (t, t), follow_symlinks=False)
    os.utime(root, (CONTEXT_MTIME, CONTEXT_MTIME))
    return root


# -- a local HTTP server for ADD <url> -------------------------------------------------------------------------------
@dataclass
class HttpFiles:
    url: str
    requests: list[str] = field(default_factory=list)


@contextlib.contextmanager
def serve_http(files: Mapping[str, Mapping[str, Any]]) -> Iterator[HttpFiles]:
    """Serve ``{"name": {"content"|"archive": ..., "last_modified": RFC 1123 date}}`` on 127.0.0.1."""
    bodies: dict[str, tuple[bytes, str | None]] = {}
    for name, spec in files.items():
        data = archive_bytes(spec["archive"]) if "archive" in spec else _content(spec)
        bodies["/" + name.lstrip("/")] = (data, spec.get("last_modified"))
    served = HttpFiles("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, with_body: bool) -> None:
            served.requests.append(self.path)
            found = bodies.get(self.path.split("?", 1)[0])
            if found is None:
                self.send_error(404)
                return
            data, modified = found
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            if modified:
                self.send_header("Last-Modified", modified)
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(True)

        def do_HEAD(self) -> None:
            self._answer(False)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


def http_date(epoch: int) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


# -- reading images --------------------------------------------------------------------------------------------------
@dataclass
class RawImage:
    """An image read from an archive: its config document and, per layer, a way to open the layer tar."""

    config: dict[str, Any]
    layers: list[Any]  # callables returning a readable (possibly compressed) layer stream
    manifest: dict[str, Any]


def _open_stream(raw: IO[bytes]) -> IO[bytes]:
    """``raw`` decompressed: gzip, xz, bzip2, zstd or plain tar (by magic)."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ"):
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        import bz2

        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[no-any-return]
    return raw


def read_image(archive: tarfile.TarFile, image: str | None = None) -> RawImage:
    """The image in a docker-archive (``manifest.json``) or an OCI-layout tar (``index.json``).

    ``image`` picks one by RepoTag / ``org.opencontainers.image.ref.name`` / annotation when the archive
    holds several; the first otherwise."""
    names = set(archive.getnames())

    def load(member: str) -> Any:
        f = archive.extractfile(member)
        assert f is not None, member
        return json.load(f)

    def opener(member: str) -> Any:
        return lambda: _open_stream(archive.extractfile(member))  # type: ignore[arg-type]

    if "index.json" in names or "./index.json" in names:
        prefix = "./" if "./index.json" in names else ""

        def blob(digest: str) -> str:
            algo, hexd = digest.split(":", 1)
            return f"{prefix}blobs/{algo}/{hexd}"

        index = load(prefix + "index.json")
        manifests = index.get("manifests", [])
        chosen = manifests[0]
        if image is not None:
            for m in manifests:
                ann = m.get("annotations") or {}
                if image in (ann.get("org.opencontainers.image.ref.name"), ann.get("io.containerd.image.name")):
                    chosen = m
                    break
        doc = load(blob(chosen["digest"]))
        while "manifests" in doc:  # an index: take the first (single-platform) manifest
            doc = load(blob(doc["manifests"][0]["digest"]))
        config = load(blob(doc["config"]["digest"]))
        return RawImage(config, [opener(blob(layer["digest"])) for layer in doc["layers"]], doc)

    if "manifest.json" not in names:
        raise ValueError("neither a docker archive (manifest.json) nor an OCI layout (index.json)")
    entries = load("manifest.json")
    chosen = entries[0]
    if image is not None:
        for e in entries:
            if image in (e.get("RepoTags") or []):
                chosen = e
                break
    return RawImage(load(chosen["Config"]), [opener(p) for p in chosen["Layers"]], chosen)


# -- normalising -------------------------------------------------------------------------------------------------
ENTRY_KEYS = ("type", "mode", "uid", "gid", "size", "sha256", "linkname", "hardlink_group", "xattrs")
CONFIG_FIELDS = (
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "Labels",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
    "Healthcheck",
    "OnBuild",
    "Shell",
)
_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def _clean(name: str) -> str:
    p = PurePosixPath("/" + name)
    parts = [x for x in p.parts[1:] if x not in (".", "")]
    return "/".join(parts)


def _mtime(value: float, build_started: float | None) -> int | str:
    t = int(value)
    if build_started is not None and t >= int(build_started) - 2:
        return BUILD_TIME
    return t


def read_layer(stream: IO[bytes], build_started: float | None = None) -> list[dict[str, Any]]:
    """Every member of a layer tar, in archive order, normalised (whiteouts as ``type: whiteout|opaque``)."""
    out: list[dict[str, Any]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for ti in tar:
            path = _clean(ti.name)
            base = PurePosixPath(path).name
            if base == ".wh..wh..opq":
                parent = str(PurePosixPath(path).parent)
                out.append({"path": "" if parent == "." else parent, "type": "opaque"})
                continue
            if base.startswith(".wh."):
                parent = PurePosixPath(path).parent
                target = base[4:] if str(parent) == "." else f"{parent}/{base[4:]}"
                out.append({"path": target, "type": "whiteout"})
                continue
            if not path:  # the root directory itself
                continue
            e: dict[str, Any] = {
                "path": path,
                "type": _TYPES.get(ti.type, f"unknown:{ti.type!r}"),
                "mode": f"{stat.S_IMODE(ti.mode):04o}",
                "uid": ti.uid,
                "gid": ti.gid,
            }
            if e["type"] == "file":
                f = tar.extractfile(ti)
                h = hashlib.sha256()
                if f is not None:
                    for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(chunk)
                e["size"] = ti.size
                e["sha256"] = h.hexdigest()
            elif e["type"] == "symlink":
                e["linkname"] = ti.linkname
                e.pop("mode")  # a symlink's mode is meaningless on Linux (always 0777)
            elif e["type"] == "hardlink":
                e["linkname"] = _clean(ti.linkname)
            elif e["type"] in ("char", "block"):
                e["device"] = f"{ti.devmajor}:{ti.devminor}"
            xattrs = {k[len("SCHILY.xattr.") :]: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if xattrs:
                e["xattrs"] = dict(sorted(xattrs.items()))
            e["mtime"] = _mtime(ti.mtime, build_started)
            out.append(e)
    return out


def _strip(e: Mapping[str, Any]) -> dict[str, Any]:
    return {k: e[k] for k in ENTRY_KEYS if k in e}


class _FS:
    """A root file system as a dict of path -> entry, built by applying layers in order."""

    def __init__(self, entries: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.entries: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (entries or {}).items()}
        # "_ino" (never compared or written out): which entries are one file. A hardlink shares its target's;
        # anything else written by a layer is a new file, which leaves the hardlink group it replaced
        self._inodes = 0
        by_group: dict[str, int] = {}
        for e in self.entries.values():
            group = e.get("hardlink_group")
            e["_ino"] = by_group.setdefault(group, self._new_ino()) if group else self._new_ino()

    def _new_ino(self) -> int:
        self._inodes += 1
        return self._inodes

    def _name_groups(self) -> None:
        """Every file sharing its ``_ino`` with others is named after the smallest path of them."""
        members: dict[int, list[str]] = {}
        for p, e in self.entries.items():
            if e["type"] == "file":
                members.setdefault(e["_ino"], []).append(p)
        for ps in members.values():
            for p in ps:
                if len(ps) > 1:
                    self.entries[p]["hardlink_group"] = min(ps)
                else:
                    self.entries[p].pop("hardlink_group", None)

    def _remove_tree(self, path: str) -> None:
        prefix = path + "/"
        for p in [p for p in self.entries if p == path or p.startswith(prefix)]:
            del self.entries[p]

    def apply_layer(self, layer: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply one layer; returns ``{"entries": [...]}`` as :meth:`apply` gives them, plus ``removed`` (every
        path that existed below and is gone after it, sorted) when the layer has whiteouts: what they *do*,
        whichever form they take (an opaque directory or one whiteout per removed entry)."""
        before = set(self.entries)
        out: dict[str, Any] = {"entries": self.apply(layer)}
        if any(e["type"] in ("whiteout", "opaque") for e in layer):
            out["removed"] = sorted(before - set(self.entries))
        return out

    def apply(self, layer: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply one layer; returns its entries, each marked ``restates`` when it changes nothing but mtime."""
        before = {k: _strip(v) for k, v in self.entries.items()}
        added = {e["path"] for e in layer if e["type"] not in ("whiteout", "opaque")}
        for e in layer:
            if e["type"] == "whiteout":
                self._remove_tree(e["path"])
            elif e["type"] == "opaque":
                prefix = e["path"] + "/" if e["path"] else ""
                for p in [p for p in self.entries if p.startswith(prefix) and p not in added]:
                    del self.entries[p]
        out = []
        for e in layer:
            if e["type"] in ("whiteout", "opaque"):
                out.append(dict(e))
                continue
            path = e["path"]
            old = self.entries.get(path)
            if old is not None and not (old["type"] == "dir" and e["type"] == "dir"):
                self._remove_tree(path)
            if e["type"] == "hardlink":
                target = self.entries.get(e["linkname"])
                new = dict(target) if target else {"type": "file", "mode": "0000", "uid": 0, "gid": 0}
                new.setdefault("_ino", self._new_ino())
                new.update(path=path, mtime=e.get("mtime", new.get("mtime")))
            else:
                new = {**e, "_ino": self._new_ino()}
                new.pop("hardlink_group", None)
            self.entries[path] = new
            rec = dict(e)
            if e["type"] == "dir" and before.get(path) == _strip(e):
                rec["restates"] = True
            out.append(rec)
        # hardlink groups: every member named after the smallest path of its group (in the layer record too)
        self._name_groups()
        for rec in out:
            if rec["type"] in ("file", "hardlink"):
                group = self.entries.get(rec["path"], {}).get("hardlink_group")
                if group is not None:
                    rec["hardlink_group"] = group
        return out

    def tidy_groups(self) -> None:
        count: dict[str, int] = {}
        for e in self.entries.values():
            if "hardlink_group" in e:
                count[e["hardlink_group"]] = count.get(e["hardlink_group"], 0) + 1
        for e in self.entries.values():
            if count.get(e.get("hardlink_group", ""), 0) < 2:
                e.pop("hardlink_group", None)


@dataclass
class BaseInfo:
    """What a build started from: the base image's file system, layer diff_ids and history length."""

    listing: dict[str, dict[str, Any]]
    diff_ids: list[str]
    history_len: int
    config: dict[str, Any] = field(default_factory=dict)


EMPTY_BASE = BaseInfo({}, [], 0)


def _archive(path: str | Path | tarfile.TarFile) -> contextlib.AbstractContextManager[tarfile.TarFile]:
    if isinstance(path, tarfile.TarFile):
        return contextlib.nullcontext(path)
    return tarfile.open(path, "r:*")


def base_info(archive_path: str | Path, image: str | None = None) -> BaseInfo:
    """The :class:`BaseInfo` of the image saved in ``archive_path`` (docker archive or OCI layout tar)."""
    with _archive(archive_path) as archive:
        raw = read_image(archive, image)
        fs = _FS()
        for open_layer in raw.layers:
            with open_layer() as stream:
                fs.apply(read_layer(stream))
        fs.tidy_groups()
        return BaseInfo(
            fs.entries,
            list(raw.config.get("rootfs", {}).get("diff_ids", [])),
            len(raw.config.get("history", [])),
            raw.config.get("config") or {},
        )


def _empty_to_none(v: Any) -> Any:
    return None if v in (None, [], {}, "") else v


def normalise_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Dockerfile-controlled fields of an image config's ``config`` section; empty values become None."""
    return {k: _empty_to_none(config.get(k)) for k in CONFIG_FIELDS}


def _substitute(value: Any, subs: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for old, new in subs.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_substitute(v, subs) for v in value]
    if isinstance(value, dict):
        return {_substitute(k, subs): _substitute(v, subs) for k, v in value.items()}
    return value


def normalise_archive(
    path: str | Path,
    base_rootfs_listing: BaseInfo | None,
    *,
    image: str | None = None,
    build_started: float | None = None,
    substitutions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The normalised result of a build saved in ``path`` (docker archive or OCI-layout tar).

    ``base_rootfs_listing`` is the :class:`BaseInfo` of the image the final stage started from (see
    :func:`base_info`; None or :data:`EMPTY_BASE` for ``FROM scratch``): its layers must be the first
    layers of the image (checked by diff_id) and its history the first history entries. ``build_started``
    (a Unix time) turns mtimes at or after it into ``"build-time"``. ``substitutions`` replace run-specific
    strings (the HTTP server's URL) in history and config.

    Shape: ``{"config": {Env, Cmd, ...}, "history": [{"created_by", "empty_layer", "comment"}],
    "layers": [{"entries": [...]}], "delta": {"entries": [...], "deleted": [...]}}``."""
    base = base_rootfs_listing or EMPTY_BASE
    with _archive(path) as archive:
        raw = read_image(archive, image)
        diff_ids = list(raw.config.get("rootfs", {}).get("diff_ids", []))
        if diff_ids[: len(base.diff_ids)] != base.diff_ids:
            raise ValueError(f"the image does not start with the base's layers: {diff_ids} vs {base.diff_ids}")
        layers = []
        for open_layer in raw.layers[len(base.diff_ids) :]:
            with open_layer() as stream:
                layers.append(read_layer(stream, build_started))
    history = [
        {
            "created_by": h.get("created_by", ""),
            "empty_layer": bool(h.get("empty_layer", False)),
            "comment": h.get("comment"),
        }
        for h in raw.config.get("history", [])[base.history_len :]
    ]
    result = result_from_layers(base, layers, raw.config.get("config") or {}, history)
    return _substitute(result, dict(substitutions or {}))  # type: ignore[no-any-return]


def result_from_layers(
    base: BaseInfo, layers: list[list[dict[str, Any]]], config: Mapping[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The normalised result from layer entry lists (as :func:`read_layer` gives them) applied on ``base``:
    what :func:`normalise_archive` returns; also used to write expectations by hand."""
    fs = _FS(base.listing)
    applied = [fs.apply_layer(entries) for entries in layers]
    fs.tidy_groups()
    delta = []
    for p in sorted(fs.entries):
        e = fs.entries[p]
        old = base.listing.get(p)
        if old is None or _strip(old) != _strip(e):
            delta.append({"path": p, **_strip(e), "mtime": e.get("mtime")})
    deleted = sorted(p for p in base.listing if p not in fs.entries)
    return {
        "config": normalise_config(config),
        "history": [dict(h) for h in history],
        "layers": applied,
        "delta": {"entries": delta, "deleted": deleted},
    }


def rootfs_listing(tar_path: str | Path) -> BaseInfo:
    """A :class:`BaseInfo` for a plain root file system tar (no image around it: no diff_ids, no history)."""
    with open(tar_path, "rb") as f:
        fs = _FS()
        fs.apply(read_layer(_open_stream(f)))
    return BaseInfo(fs.entries, [], 0)


def dumps(doc: Any, _level: int = 0) -> str:
    """JSON for the expected files: a list or dict holding only scalars goes on one line (one layer entry,
    one history entry per line), everything else is indented. ``json.loads`` reads it back unchanged."""
    pad, inner = " " * _level, " " * (_level + 1)
    if (
        isinstance(doc, dict | list)
        and doc
        and any(isinstance(v, dict | list) and v for v in (doc.values() if isinstance(doc, dict) else doc))
    ):
        if isinstance(doc, dict):
            items = [f"{inner}{json.dumps(k)}: {dumps(v, _level + 1)}" for k, v in doc.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        return "[\n" + ",\n".join(f"{inner}{dumps(v, _level + 1)}" for v in doc) + f"\n{pad}]"
    return json.dumps(doc, ensure_ascii=False)


# -- comparing -----------------------------------------------------------------------------------------------------
#: What :func:`compare` leaves out by default, and why. Pass ``ignore=`` to change it.
DEFAULT_IGNORES: dict[str, str] = {
    "history.comment": "a builder marker (BuildKit writes 'buildkit.dockerfile.v0', buildah 'FROM <id>'), "
    "not image behaviour",
    "history.created_by.wording": "only the instruction keyword of created_by is compared (COPY, ENV, ...; the "
    "number, order and empty_layer flags of the entries always are): the full text differs between BuildKit "
    "versions, e.g. docker 20.10's frontend omits the --chown/--chmod flags that dockerfile >= 1.7 writes, and "
    'prints EXPOSE/HEALTHCHECK with Go\'s %v (map[80/tcp:{}], &{[...] "30s" ...}). Remove this key (or set '
    "IMGCI_CONFORMANCE_STRICT=1 in the conformance tests) to compare the exact strings of the reference",
    "mtime.build-time": "an expected mtime of 'build-time' (directories the builder created or touched, e.g. "
    "COPY parents, WORKDIR) is the clock at build time: any actual value is accepted",
    "layers.restates": "a layer entry for a directory whose type/mode/owner equal what is below it (BuildKit "
    "lists the parent directories of what it copied) changes nothing but an mtime: builders may or may not "
    "write such entries",
    "layers.whiteouts": "whiteouts are compared by what they remove (each layer's 'removed': the paths below it "
    "that are gone after it), not by their form: a directory deleted and recreated in one RUN is an opaque "
    "directory from an overlay differ (BuildKit on overlay2) and one whiteout per removed child from a naive "
    "differ (buildah/vfs, BuildKit on vfs); both are OCI and give the same file system",
}
#: Further ignores for comparing two reference builders with each other (BuildKit vs buildah).
BUILDER_IGNORES: dict[str, str] = {
    **DEFAULT_IGNORES,
    "history.created_by": "wording differs by builder: BuildKit 'COPY a /b # buildkit', buildah "
    "'/bin/sh -c #(nop) COPY file:<sha> in /b '",
    "label.io.buildah.version": "buildah stamps its version as a label",
}


def _fmt(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def _entry_diff(where: str, exp: Mapping[str, Any], act: Mapping[str, Any], ignore: Mapping[str, str]) -> list[str]:
    out = []
    for k in (*ENTRY_KEYS, "device"):
        if exp.get(k) != act.get(k):
            out.append(f"{where}: {k} expected {_fmt(exp.get(k))}, got {_fmt(act.get(k))}")
    em, am = exp.get("mtime"), act.get("mtime")
    skip = (
        "mtime" not in exp
        or "mtime" in ignore
        or (em == BUILD_TIME and "mtime.build-time" in ignore)
        or (exp.get("type") == "dir" and "mtime.dir" in ignore)
    )
    if not skip and em != am:
        out.append(f"{where}: mtime expected {_fmt(em)}, got {_fmt(am)}")
    return out


def compare(
    expected: Mapping[str, Any], actual: Mapping[str, Any], ignore: Mapping[str, str] | None = None
) -> list[str]:
    """Readable differences between two normalised images (empty when they conform).

    ``ignore`` (default :data:`DEFAULT_IGNORES`; keys matter, values document why) may also contain
    ``history.created_by``, ``layers`` (skip per-layer comparison, keep the delta), ``mtime`` (all mtimes),
    ``mtime.dir`` (directories' mtimes), ``config.<Field>`` and ``label.<name>``.
    A case's ``expected`` JSON may carry its own ``ignore`` map, which is added."""
    ign = dict(DEFAULT_IGNORES if ignore is None else ignore)
    ign.update(expected.get("ignore") or {})
    diffs: list[str] = []

    # config
    ec, ac = expected.get("config", {}), actual.get("config", {})
    for k in CONFIG_FIELDS:
        if f"config.{k}" in ign:
            continue
        ev, av = ec.get(k), ac.get(k)
        if k == "Labels":
            ev = {lk: lv for lk, lv in (ev or {}).items() if f"label.{lk}" not in ign} or None
            av = {lk: lv for lk, lv in (av or {}).items() if f"label.{lk}" not in ign} or None
        if ev != av:
            diffs.append(f"config.{k}: expected {_fmt(ev)}, got {_fmt(av)}")

    # history
    eh, ah = expected.get("history", []), actual.get("history", [])
    if len(eh) != len(ah):
        diffs.append(
            f"history: expected {len(eh)} entries, got {len(ah)}: expected "
            f"{_fmt([h['created_by'] for h in eh])}, got {_fmt([h['created_by'] for h in ah])}"
        )
    else:
        for i, (e, a) in enumerate(zip(eh, ah, strict=True)):
            if "history.created_by" in ign:
                pass
            elif "history.created_by.wording" in ign:
                if _keyword(e["created_by"]) != _keyword(a["created_by"]):
                    diffs.append(
                        f"history[{i}].created_by: expected a {_keyword(e['created_by'])} entry "
                        f"({_fmt(e['created_by'])}), got {_fmt(a['created_by'])}"
                    )
            elif e["created_by"] != a["created_by"]:
                diffs.append(f"history[{i}].created_by: expected {_fmt(e['created_by'])}, got {_fmt(a['created_by'])}")
            if e["empty_layer"] != a["empty_layer"]:
                diffs.append(
                    f"history[{i}] ({e['created_by']}): empty_layer expected {e['empty_layer']}, got {a['empty_layer']}"
                )
            if "history.comment" not in ign and e.get("comment") != a.get("comment"):
                diffs.append(f"history[{i}].comment: expected {_fmt(e.get('comment'))}, got {_fmt(a.get('comment'))}")

    # layers
    el, al = expected.get("layers", []), actual.get("layers", [])
    if len(el) != len(al):
        diffs.append(f"layers: expected {len(el)}, got {len(al)}")
    elif "layers" not in ign:
        for i, (e, a) in enumerate(zip(el, al, strict=True)):
            diffs += _layer_diff(f"layers[{i}]", e["entries"], a["entries"], ign)
            if "layers.whiteouts" in ign and e.get("removed", []) != a.get("removed", []):
                er, ar = set(e.get("removed", [])), set(a.get("removed", []))
                diffs.append(
                    f"layers[{i}]: removed paths differ: not removed {_fmt(sorted(er - ar))}, "
                    f"removed unexpectedly {_fmt(sorted(ar - er))}"
                )

    # delta
    ed, ad = expected.get("delta", {}), actual.get("delta", {})
    emap = {e["path"]: e for e in ed.get("entries", [])}
    amap = {e["path"]: e for e in ad.get("entries", [])}
    for p in sorted(emap.keys() - amap.keys()):
        diffs.append(f"delta: /{p} missing (expected {_fmt(_strip(emap[p]))})")
    for p in sorted(amap.keys() - emap.keys()):
        diffs.append(f"delta: /{p} unexpected ({_fmt(_strip(amap[p]))})")
    for p in sorted(emap.keys() & amap.keys()):
        diffs += _entry_diff(f"delta: /{p}", emap[p], amap[p], ign)
    if sorted(ed.get("deleted", [])) != sorted(ad.get("deleted", [])):
        diffs.append(f"delta.deleted: expected {ed.get('deleted')}, got {ad.get('deleted')}")
    return diffs


def _keyword(created_by: str) -> str:
    """The instruction of a history entry: ``COPY a /b # buildkit`` -> COPY; buildah's ``/bin/sh -c #(nop) ``
    prefix is skipped."""
    text = created_by.strip()
    for prefix in ("/bin/sh -c #(nop) ", "/bin/sh -c "):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
    return text.split(" ", 1)[0].upper() if text else ""


def _layer_diff(where: str, exp: list[dict[str, Any]], act: list[dict[str, Any]], ign: Mapping[str, str]) -> list[str]:
    def key(e: Mapping[str, Any]) -> tuple[str, str]:
        return (e["path"], "whiteout" if e["type"] in ("whiteout", "opaque") else "entry")

    def effective(entries: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        out = {}
        for e in entries:
            if e.get("restates") and "layers.restates" in ign:
                continue
            if e["type"] in ("whiteout", "opaque") and "layers.whiteouts" in ign:
                continue  # compared through the layer's "removed" instead (see compare)
            out[key(e)] = e
        return out

    em, am = effective(exp), effective(act)
    diffs = []
    for k in sorted(em.keys() - am.keys()):
        diffs.append(f"{where}: /{k[0]} missing (expected {_fmt(_strip(em[k]) or em[k]['type'])})")
    for k in sorted(am.keys() - em.keys()):
        diffs.append(f"{where}: /{k[0]} unexpected ({_fmt(_strip(am[k]) or am[k]['type'])})")
    for k in sorted(em.keys() & am.keys()):
        e, a = em[k], am[k]
        if e["type"] in ("whiteout", "opaque") or a["type"] in ("whiteout", "opaque"):
            if e["type"] != a["type"]:
                diffs.append(f"{where}: /{k[0]} expected {e['type']}, got {a['type']}")
            continue
        e2 = {**e, "type": "file" if e["type"] == "hardlink" else e["type"]}
        a2 = {**a, "type": "file" if a["type"] == "hardlink" else a["type"]}
        # which member of a hardlink group the tar writes as the file and which as links to it is the
        # builder's choice: then compare the group (and the delta compares the content), not size/sha/target
        if "hardlink" in (e["type"], a["type"]):
            for d in (e2, a2):
                for field_name in ("linkname", "size", "sha256"):
                    d.pop(field_name, None)
        diffs += _entry_diff(f"{where}: /{k[0]}", e2, a2, ign)
    return diffs
