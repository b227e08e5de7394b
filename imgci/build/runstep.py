"""RUN: the one instruction that executes image code, in the sandbox (:mod:`imgci.build.sandbox`).

Contract of :class:`RunStep` (STYLE.md rule 1: ``cache_input`` and ``execute``):
- ``cache_input`` is the instruction as written after expansion, the build args in scope with their values (they
  are the command's environment, as in BuildKit), the network mode and every mount's definition — secret and ssh
  *ids* only, never their values.
- ``execute`` runs the command as the stage's USER (resolved in the image's own /etc/passwd and /etc/group, with
  its supplementary groups), in its WORKDIR, with its ENV plus the build args, under its SHELL; the changes become
  one layer. History reads as BuildKit writes it: ``RUN |2 A=1 B=2 /bin/sh -c cmd # buildkit``.
- ``--mount``: ``cache`` directories persist under ``STATE/cache/mounts`` between builds (``sharing=locked`` waits
  for other builds, ``private`` uses a throw-away directory when another build holds it); ``secret`` values come
  from ``--secret`` and are never in the layer, the history, the cache key or the log; ``bind`` reads a stage, an
  image or the build context (writes with ``rw`` are discarded); ``tmpfs``; ``ssh`` forwards an agent socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgci.build.dockerfile import RunInstruction
from imgci.build.fs import SourceFS
from imgci.build.image import DEFAULT_PATH, ImageState, Layer
from imgci.errors import BuildError, ImgciError

DEFAULT_SHELL = ["/bin/sh", "-c"]


@dataclass
class RunStep:
    """One RUN, already expanded; ``args`` are the stage's ARGs in scope (name, value or None)."""

    instruction: RunInstruction
    args: list[tuple[str, str | None]] = field(default_factory=list)
    mount_sources: dict[int, str] = field(default_factory=dict)  # mount index -> key of its state in ws.states
    source_identity: dict[int, str] = field(default_factory=dict)  # mount index -> what from= resolved to

    # -- identity ---------------------------------------------------------------------------------------------
    def arg_env(self, env: dict[str, str]) -> list[str]:
        """``NAME=value`` of the build args in scope, as BuildKit's runCommandString takes them (ENV wins)."""
        return [f"{name}={env.get(name, value or '')}" for name, value in self.args]

    def cache_input(self, state: ImageState, ws: Any) -> dict[str, Any]:
        i = self.instruction
        mounts = []
        for n, m in enumerate(i.mount_options):
            d = {k: v for k, v in m.items() if k != "source" or m.get("type") != "secret"}
            if n in self.mount_sources and self.mount_sources[n] in ws.states:
                d["from"] = ws.states[self.mount_sources[n]].cache_key  # the source stage or image, by content
            elif n in self.source_identity:
                d["from"] = self.source_identity[n]
            mounts.append(d)
        for n, m in enumerate(i.mount_options):
            if m.get("type", "bind") == "bind" and n not in self.source_identity and ws.context is not None:
                from imgci.build.copyplan import CopyOptions, source_digest

                source = m.get("source", "").strip("/") or "."
                # its errors ("../..": outside the context) name the mount, not COPY
                options = CopyOptions(instruction="RUN --mount=type=bind")
                mounts[n]["context"] = source_digest([source], src_fs=ws.context, options=options)
        return {
            "instruction": i.original,
            "args": self.arg_env(state.env_map()),
            "network": i.network,
            "mounts": mounts,
        }

    def history_text(self, state: ImageState) -> str:
        args = self.arg_env(state.env_map())
        prefix = [f"|{len(args)}", *args] if args else []
        return "RUN " + " ".join([*prefix, *self.command(state)[0]]) + " # buildkit"

    def command(self, state: ImageState) -> tuple[list[str], tuple[str, str] | None]:
        script = self.instruction.script()
        if script.prepend_shell:
            shell = list(state.config.get("Shell") or DEFAULT_SHELL)
            return [*shell, *script.args], script.pipe_file
        return list(script.args), script.pipe_file

    # -- running ----------------------------------------------------------------------------------------------
    def execute(self, state: ImageState, ws: Any) -> ImageState:
        from imgci.build.sandbox.launcher import RunFailed, RunRequest
        from imgci.build.sandbox.spec import ProcessSpec

        i = self.instruction
        where: dict[str, Any] = {"file": i.location.file, "line": i.location.start}
        if i.security == "insecure":
            raise BuildError("RUN --security=insecure is not supported: imgci runs RUN unprivileged", **where)
        try:
            view = ws.view(state, "the image")
            uid, gid, home = resolve_run_user(view, state.user)
            args, pipe_file = self.command(state)
            values = [f"{n}={v}" for n, v in self.args if v is not None]  # an ARG without a value is not set
            env = _process_env(state, values, home)
            files = [(f"/dev/pipes/{pipe_file[0]}", pipe_file[1].encode().hex(), 0o755)] if pipe_file else []
            process = ProcessSpec(args=args, env=env, uid=uid, gid=gid, cwd=state.workdir, files=files)
            with contextlib.ExitStack() as stack:
                mounts, secret_values = self._mounts(ws, stack, process)
                request = RunRequest(
                    layers=[_ref(ws, layer) for layer in state.layers],
                    process=process,
                    mounts=mounts,
                    network="none" if (i.network if i.network != "default" else ws.network) == "none" else "host",
                    compression=ws.compression,
                    epoch=ws.epoch,
                    description=f"RUN at {i.location.file}:{i.location.start}",
                )
                outcome = ws.sandbox().run(request, log=ws.log, check=ws.check, secret_values=secret_values)
        except RunFailed as e:
            shown = " ".join(self.command(state)[0])
            tail = "\n".join(f"  > {line}" for line in e.tail)
            raise RunFailed(
                f"RUN failed with exit code {e.exit_code}: {shown}" + (f"\nlast output lines:\n{tail}" if tail else ""),
                exit_code=e.exit_code,
                tail=e.tail,
                hint=_space_hint(e.tail, ws.state_dir),
                **where,
            ) from None
        except BuildError as e:
            if e.line:
                raise
            raise type(e)(e.detail, hint=e.hint, **where) from None
        except ImgciError as e:
            raise BuildError(e.message, hint=e.hint, **where) from None
        layer = Layer(outcome.result.descriptor, outcome.result.diff_id)
        return state.with_layer(layer).with_history(self.history_text(state), empty_layer=False, created=ws.created)

    def _mounts(self, ws: Any, stack: contextlib.ExitStack, process: Any) -> tuple[list[Any], list[bytes]]:
        from imgci.build.sandbox.spec import MountSpec

        out: list[MountSpec] = []
        secret_values: list[bytes] = []
        ssh_index = 0
        for n, m in enumerate(self.instruction.mount_options):
            kind = m.get("type", "bind")
            target = m.get("target", "")
            if target and not target.startswith("/"):
                target = posixpath.join(process.cwd, target)
            target = posixpath.normpath(target) if target else ""
            if kind == "cache":
                if not target:
                    raise BuildError("cache mount needs a target")
                if m.get("from"):
                    raise BuildError(
                        "RUN --mount=type=cache,from=… is not supported yet: drop from= (the cache starts empty)"
                    )
                cache_id = m.get("id") or target
                source = stack.enter_context(_cache_dir(ws.state_dir, cache_id, m.get("sharing", "shared"), ws.check))
                out.append(
                    MountSpec(
                        kind="cache",
                        target=target,
                        source=str(source),
                        readonly=m.get("readonly") == "true",
                        mode=int(m.get("mode", "755"), 8),
                        uid=int(m.get("uid", "0")),
                        gid=int(m.get("gid", "0")),
                    )
                )
            elif kind == "tmpfs":
                if not target:
                    raise BuildError("tmpfs mount needs a target")
                out.append(
                    MountSpec(kind="tmpfs", target=target, readonly=False, size=_size(m.get("size", "")), mode=0o1777)
                )
            elif kind == "secret":
                secret_id = m.get("id") or m.get("source") or (posixpath.basename(target) if target else "")
                value = ws.secrets.get(secret_id)
                env_name = m.get("env", "")
                if value is None:
                    if m.get("required") == "true":
                        raise BuildError(
                            f"secret {secret_id!r} is required but was not given",
                            hint=f"pass --secret id={secret_id},src=FILE (or env=VAR)",
                        )
                    continue
                secret_values.append(value)
                if env_name:
                    process.env.append(f"{env_name}={value.decode('utf-8', 'replace')}")
                if target or not env_name:
                    out.append(
                        MountSpec(
                            kind="secret",
                            target=target or f"/run/secrets/{secret_id}",
                            data=value.hex(),
                            mode=int(m.get("mode", "400"), 8),
                            uid=int(m.get("uid", "0")),
                            gid=int(m.get("gid", "0")),
                        )
                    )
            elif kind == "ssh":
                ssh_id = m.get("id") or "default"
                sock = ws.ssh.get(ssh_id)
                if sock is None:
                    if m.get("required") == "true":
                        raise BuildError(
                            f"ssh agent {ssh_id!r} is required but was not given", hint="pass --ssh default"
                        )
                    continue
                path = target or f"/run/buildkit/ssh_agent.{ssh_index}"
                if ssh_index == 0:
                    process.env.append(f"SSH_AUTH_SOCK={path}")
                ssh_index += 1
                out.append(MountSpec(kind="ssh", target=path, source=str(sock), readonly=False))
            elif kind == "bind":
                out.append(self._bind(n, m, target, ws))
            else:
                raise BuildError(f"unsupported mount type {kind!r}")
        return out, secret_values

    def _bind(self, n: int, m: dict[str, str], target: str, ws: Any) -> Any:
        from imgci.build.sandbox.spec import MountSpec

        if not target:
            raise BuildError("bind mount needs a target")
        source = m.get("source", "")
        readonly = m.get("readonly", "true") == "true"
        key = self.mount_sources.get(n)
        if key is None:  # the build context
            context = ws.context
            if context is None or getattr(context, "root", None) is None:
                raise BuildError("RUN --mount=type=bind needs a build context directory")
            rel = _resolve_in(context, source)
            if getattr(context, "ignore", None) is not None:  # BuildKit mounts the context as .dockerignore filters it
                tree = _filtered_copy(context, rel, Path(ws.scratch))
                return MountSpec(kind="bind", target=target, source=str(tree), readonly=readonly)
            root = os.path.abspath(context.root)
            return MountSpec(kind="bind", target=target, source=root, subpath=rel, readonly=readonly)
        src_state: ImageState = ws.states[key]
        view = ws.view(src_state, key)
        rel = _resolve_in(view, source)
        return MountSpec(
            kind="bind",
            target=target,
            layers=[_ref(ws, layer) for layer in src_state.layers],
            subpath=rel,
            readonly=readonly,
        )


def _filtered_copy(context: Any, rel: str, scratch: Path) -> Path:
    """The context below ``rel`` without what .dockerignore excludes, as a directory the sandbox can bind
    (hardlinks where the file system allows, else copies)."""
    import shutil
    import tempfile

    from imgci.build.fs import walk

    out = Path(tempfile.mkdtemp(prefix="ctx-", dir=scratch))
    root = Path(os.path.abspath(context.root))
    prefix = f"{rel}/" if rel else ""
    for info in walk(context, rel):
        dest = out / info.path[len(prefix) :]
        src = root / info.path
        if info.type == "dir":
            dest.mkdir()
            shutil.copystat(src, dest, follow_symlinks=False)
        elif info.type == "symlink":
            os.symlink(info.linkname, dest)
        else:
            try:
                os.link(src, dest, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dest, follow_symlinks=False)
    return out


def _resolve_in(fs: SourceFS, source: str) -> str:
    rel = fs.resolve(source.strip("/")) if source.strip("/") else ""
    if rel is None:
        raise BuildError(f"bind mount source {source!r} does not exist in {fs.describe()}")
    return rel


def _ref(ws: Any, layer: Layer) -> Any:
    from imgci.build.sandbox.spec import LayerRef

    return LayerRef(
        str(ws.store.blob_path(layer.descriptor.digest)),
        layer.descriptor.digest.value,
        layer.diff_id.value,
        _linkable(ws.layers, layer),
    )


def _linkable(layers: Any, layer: Layer) -> str:
    """The unpacked layer directory an overlay snapshot can be hard-linked from ("" when it must be extracted):
    only a privileged unpack has every file's owner, mode and xattrs on disk, and only a layer without whiteouts,
    opaque directories, device nodes (kept in the index only) or hard links to files of lower layers is complete
    on disk. Saves writing every file of a COPY layer a second time for the RUN after it."""
    if layers is None or getattr(layers, "unprivileged", True) or os.geteuid() != 0:
        return ""
    if os.environ.get("IMGCI_SNAPSHOT_LINKS", "1") == "0":  # extract every snapshot from its blob (for comparison)
        return ""
    try:
        if not layers.is_unpacked(layer.diff_id):
            return ""
        complete = _COMPLETE_ON_DISK.get(layer.diff_id.value)
        if complete is None:  # what a layer holds never changes: look at its index once per process, not per RUN
            complete = _complete_on_disk(layers.index(layer.diff_id))
            _COMPLETE_ON_DISK[layer.diff_id.value] = complete
    except (OSError, ImgciError):
        return ""
    return str(layers.layer_root(layer.diff_id)) if complete else ""


_COMPLETE_ON_DISK: dict[str, bool] = {}  # diff_id -> whether its unpacked directory holds all of it


def _complete_on_disk(index: Any) -> bool:
    if index.whiteouts or index.opaque:
        return False
    for record in index.entries.values():
        kind, link = record[0], record[6]
        if kind in ("char", "block") or (kind == "hardlink" and link not in index.entries):
            return False
    return True


def _size(text: str) -> int:
    from imgci.units import parse_size

    if not text:
        return 0
    try:
        return parse_size(text)
    except ValueError:
        raise BuildError(f"invalid tmpfs size {text!r}") from None


def _process_env(state: ImageState, args: list[str], home: str) -> list[str]:
    env = list(state.env)
    names = {e.partition("=")[0] for e in env}
    for a in args:
        if a.partition("=")[0] not in names:
            env.append(a)
            names.add(a.partition("=")[0])
    if "PATH" not in names:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if "HOME" not in names:
        env.append(f"HOME={home}")
    return env


@contextlib.contextmanager
def _cache_dir(state_dir: Path, cache_id: str, sharing: str, check: Callable[[], None]) -> Iterator[Path]:
    """The persistent directory of cache mount ``cache_id``, locked as ``sharing`` asks."""
    import tempfile
    import time

    base = Path(state_dir) / "cache" / "mounts"
    base.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(cache_id.encode()).hexdigest()[:32]
    path = base / name
    path.mkdir(exist_ok=True)
    if sharing == "shared":
        yield path
        return
    fd = os.open(base / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if sharing == "private":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                tmp = Path(tempfile.mkdtemp(prefix=f"cache-{name}-", dir=Path(state_dir) / "tmp"))
                yield tmp  # removed with the run's work directory by the sandbox's cleanup
                return
        else:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    check()
                    time.sleep(0.1)
        yield path
    finally:
        os.close(fd)


def resolve_run_user(view: SourceFS, user: str) -> tuple[int, int, str]:
    """(uid, gid, home) for USER ``user`` in the image's own /etc/passwd and /etc/group, as BuildKit resolves it: a
    name must exist; a number need not (gid 0, home ``/``; no USER is uid 0, so an image without /etc/passwd runs
    as root); an explicit group wins. BuildKit (20.10's runc executor) sets no supplementary groups, nor does imgci."""
    name, _, group = (user or "0").partition(":")
    passwd = _read_table(view, "etc/passwd")
    row = next((r for r in passwd if len(r) >= 6 and (r[0] == name or (name.isdigit() and r[2] == name))), None)
    if row is None:
        if not name.isdigit():
            raise BuildError(f"unable to find user {name}: no matching entries in passwd file")
        uid, gid, home = int(name), 0, "/"
    else:
        if not (row[2].isdigit() and row[3].isdigit()):
            raise BuildError(f"user {name!r} has a malformed entry in /etc/passwd")
        uid, gid, home = int(row[2]), int(row[3]), row[5] or "/"
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((r for r in _read_table(view, "etc/group") if len(r) >= 3 and r[0] == group), None)
            if g is None or not g[2].isdigit():
                raise BuildError(f"unable to find group {group}: no matching entries in group file")
            gid = int(g[2])
    return uid, gid, home


def _read_table(view: SourceFS, path: str) -> list[list[str]]:
    try:
        real = view.resolve(path)
        if real is None:
            return []
        info = view.lstat(real)
        if info is None or info.type not in ("file", "hardlink"):
            return []
        with view.open(real) as f:
            text = f.read(1 << 22).decode("utf-8", "replace")
    except (OSError, ImgciError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _space_hint(tail: list[str], state_dir: Any) -> str | None:
    """A step that ran out of disk space wrote into the state directory (its upper dir lives there): say so."""
    if not any("No space left on device" in line for line in tail):
        return None
    import shutil

    try:
        free = shutil.disk_usage(state_dir).free
    except OSError:
        return None
    from imgci.ui import human_size

    return (
        f"no space left in the state directory {state_dir} ({human_size(free)} free), where RUN steps write: "
        "free space (imgci prune) or point --state / IMGCI_STATE at a bigger disk"
    )
