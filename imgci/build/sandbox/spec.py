"""What the build asks the sandbox child to do: one JSON document on the child's stdin.

Contract: :class:`ChildSpec` round-trips through :meth:`ChildSpec.dumps` / :meth:`ChildSpec.loads` unchanged. It is
the whole interface between the (threaded) build process and ``python -m imgci._sandbox``: the child reads the spec,
then a line ``go`` once its uid/gid maps are written, and reports on its stdout as JSON lines (:class:`Event`).
Secret values travel only in this in-memory document (a pipe), never on disk outside the child's tmpfs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Isolation = Literal["userns", "chroot"]
Backend = Literal["overlay", "native"]
IdKind = Literal["root", "subid", "single"]

HOSTNAME = "buildkitsandbox"  # what BuildKit's RUN sees; scripts that print it build the same image
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class LayerRef:
    """One lower layer: its blob in the store (read by the child to build a snapshot) and its diff_id."""

    blob: str  # absolute path of the blob file
    digest: str
    diff_id: str
    # The layer store's unpacked copy (STATE/layers/<hex>/root) when the snapshot may be made of hard links to it
    # instead of extracting the blob again: a privileged unpack (exact metadata) of a layer without whiteouts,
    # device nodes or hard links into lower layers. "" otherwise.
    unpacked: str = ""


@dataclass
class MountSpec:
    """One ``RUN --mount`` (or a builder-provided mount) as the child performs it.

    ``kind``: ``bind`` (host ``source`` path, or ``layers`` + ``subpath`` for a stage/image), ``cache`` (host dir
    ``source``, persistent), ``tmpfs`` (``size`` bytes, 0 = default), ``secret`` (``data`` hex; or ``env`` only),
    ``ssh`` (host socket ``source``).
    """

    kind: str
    target: str
    source: str = ""
    readonly: bool = True
    layers: list[LayerRef] = field(default_factory=list)
    subpath: str = ""
    data: str = ""  # secret value, hex (never logged)
    env: str = ""  # secret as an environment variable of the process
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    size: int = 0
    required: bool = False


@dataclass
class ProcessSpec:
    args: list[str]
    env: list[str]
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    cwd: str = "/"
    hostname: str = HOSTNAME
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (path, hex content, mode): heredoc scripts


@dataclass
class ChildSpec:
    action: Literal["run", "remove"]
    isolation: Isolation = "userns"
    backend: Backend = "overlay"
    id_kind: IdKind = "root"
    state_dir: str = ""
    work_dir: str = ""  # the child's scratch directory (upper, work, merged or rootfs); removed by the child
    snapshot_dir: str = ""  # STATE/snapshots/<flavor>: one overlay lower dir per diff_id
    layers: list[LayerRef] = field(default_factory=list)  # bottom to top
    network: Literal["host", "none"] = "host"
    mounts: list[MountSpec] = field(default_factory=list)
    process: ProcessSpec | None = None
    hosts: str = ""
    resolv: str = ""
    remove: list[str] = field(default_factory=list)  # action "remove": paths to delete inside the namespace
    epoch: int | None = None  # SOURCE_DATE_EPOCH: layer mtimes newer than it are clamped
    output_fd: int = -1  # the command's stdout+stderr (inherited)
    tar_fd: int = -1  # the layer tar stream (inherited)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> ChildSpec:
        doc = json.loads(text)
        doc["layers"] = [LayerRef(**x) for x in doc.get("layers", [])]
        mounts = []
        for m in doc.get("mounts", []):
            m["layers"] = [LayerRef(**x) for x in m.get("layers", [])]
            mounts.append(MountSpec(**m))
        doc["mounts"] = mounts
        if doc.get("process") is not None:
            p = doc["process"]
            p["files"] = [tuple(f) for f in p.get("files", [])]
            doc["process"] = ProcessSpec(**p)
        return cls(**doc)


def event(kind: str, **fields: Any) -> str:
    """One line of the child's report."""
    return json.dumps({"event": kind, **fields}, separators=(",", ":")) + "\n"
