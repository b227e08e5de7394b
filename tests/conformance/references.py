"""Reference builders for the conformance suite: Docker's built-in BuildKit and buildah.

Contract: a :class:`Reference` can tell whether it is usable here (:meth:`available`), describe its
version, load the conformance base root file system as an image, build a case (context already
materialised) into a tag, and save that tag as a docker archive. It never pulls: every base image is
loaded locally, builds use ``--network host`` and no registry is contacted. Used by ``make_expected.py``
(to write ``expected/*.json``) and by ``test_conformance.py`` (the optional live comparison).

Docker: the ``docker`` CLI (``IMGCI_CONFORMANCE_DOCKER`` overrides the binary; ``DOCKER_HOST`` as usual),
``DOCKER_BUILDKIT=1``. Buildah: its own storage under a private directory (``--root``/``--runroot``, vfs
driver), ``bud --layers --format docker --isolation chroot --pull-never``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conformance.harness import (
    BASE_CHANGES,
    EMPTY_BASE,
    BaseInfo,
    Case,
    base_info,
    materialise_context,
    normalise_archive,
    serve_http,
)

BASE_TAG = "conformance-ref/busybox:base"


class ReferenceError(RuntimeError):
    pass


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ReferenceError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _clean_env() -> dict[str, str]:
    # no proxies: the builds fetch ADD URLs from 127.0.0.1 and must not be routed anywhere else
    return {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


class Reference:
    name = ""

    def available(self) -> bool:
        raise NotImplementedError

    def version(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def load_base(self, rootfs_tar: Path, out_archive: Path) -> str:
        """Import the base root file system (config: :data:`BASE_CHANGES`), save it to ``out_archive``
        (docker archive) and return the reference to use as ``BASE``."""
        raise NotImplementedError

    def image_ref(self, tag: str) -> str:
        """How a Dockerfile's FROM names a tag this builder built (buildah needs ``localhost/``)."""
        return tag

    def build(
        self,
        dockerfile: Path,
        context: Path,
        tag: str,
        build_args: dict[str, str],
        target: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def save(self, tag: str, out_archive: Path) -> None:
        raise NotImplementedError

    def remove(self, *tags: str) -> None:
        pass

    def close(self) -> None:
        pass


class DockerBuildKit(Reference):
    """``docker build`` with DOCKER_BUILDKIT=1 against a running dockerd (its built-in BuildKit)."""

    name = "buildkit"

    def __init__(self, docker: str | None = None, prune_cache: bool = False) -> None:
        self.docker = docker or os.environ.get("IMGCI_CONFORMANCE_DOCKER") or shutil.which("docker") or "docker"
        self.env = {**_clean_env(), "DOCKER_BUILDKIT": "1"}
        # BuildKit 0.8 (docker 20.10) serves WORKDIR's mkdir from its cache even with --no-cache: the directory
        # then has the mtime of an earlier build. make_expected (a daemon of its own) prunes before each build.
        self.prune_cache = prune_cache

    def _docker(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run([self.docker, *args], env=self.env, timeout=timeout)

    def available(self) -> bool:
        if not shutil.which(self.docker) and not Path(self.docker).exists():
            return False
        try:
            self._docker("version", "--format", "{{.Server.Version}}", timeout=20)
        except (ReferenceError, OSError, subprocess.TimeoutExpired):
            return False
        return True

    def version(self) -> dict[str, Any]:
        out = json.loads(self._docker("version", "--format", "{{json .}}").stdout)
        server = out.get("Server") or {}
        return {
            "builder": "docker build --no-cache (DOCKER_BUILDKIT=1, built-in dockerfile frontend)",
            "docker_client": (out.get("Client") or {}).get("Version"),
            "docker_server": server.get("Version"),
            "components": {c["Name"]: c["Version"] for c in server.get("Components", [])},
        }

    def describe(self) -> str:
        v = self.version()
        return f"BuildKit (docker {v['docker_server']})"

    def load_base(self, rootfs_tar: Path, out_archive: Path) -> str:
        changes = [a for c in BASE_CHANGES for a in ("-c", c)]
        self._docker("import", *changes, str(rootfs_tar), BASE_TAG)
        self.save(BASE_TAG, out_archive)
        return BASE_TAG

    def build(
        self,
        dockerfile: Path,
        context: Path,
        tag: str,
        build_args: dict[str, str],
        target: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        args = ["build", "--no-cache", "--network", "host", "--progress", "plain", "-f", str(dockerfile), "-t", tag]
        for k, v in build_args.items():
            args += ["--build-arg", f"{k}={v}"]
        if target:
            args += ["--target", target]
        if self.prune_cache:
            self._docker("builder", "prune", "--all", "--force")
        return self._docker(*args, str(context))

    def save(self, tag: str, out_archive: Path) -> None:
        self._docker("save", "-o", str(out_archive), tag)

    def remove(self, *tags: str) -> None:
        if tags:
            subprocess.run([self.docker, "rmi", "-f", *tags], capture_output=True, env=self.env)


class Buildah(Reference):
    """``buildah bud`` with its own storage in a private directory (removed by :meth:`close`)."""

    name = "buildah"

    def __init__(self, buildah: str | None = None, workdir: Path | None = None) -> None:
        self.buildah = buildah or shutil.which("buildah") or "buildah"
        self._own = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="imgci-conformance-buildah-"))
        self.global_args = [
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.workdir / "run"),
            "--storage-driver",
            "vfs",
        ]
        self.env = {**_clean_env(), "BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": "vfs"}

    def _buildah(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run([self.buildah, *self.global_args, *args], env=self.env, timeout=timeout)

    def available(self) -> bool:
        if not shutil.which(self.buildah):
            return False
        try:
            self._buildah("images", timeout=30)
        except (ReferenceError, OSError, subprocess.TimeoutExpired):
            return False
        return True

    def version(self) -> dict[str, Any]:
        out = json.loads(_run([self.buildah, "version", "--json"], env=self.env).stdout)
        return {
            "builder": "buildah bud --layers --no-cache --format docker --isolation chroot",
            "buildah": out.get("version"),
            "buildah_go": out.get("goVersion"),
            "image_spec": out.get("imageSpec"),
        }

    def describe(self) -> str:
        return f"buildah {self.version()['buildah']}"

    def image_ref(self, tag: str) -> str:
        return tag if tag.startswith("localhost/") else f"localhost/{tag}"

    def load_base(self, rootfs_tar: Path, out_archive: Path) -> str:
        # from scratch: the rootfs tar is extracted by `buildah add` like ADD does; config as docker import -c
        ctr = self._buildah("from", "scratch").stdout.strip()
        try:
            self._buildah("add", ctr, str(rootfs_tar), "/")
            self._buildah("config", "--env", BASE_CHANGES[0].split(" ", 1)[1], "--cmd", '["sh"]', ctr)
            self._buildah("commit", "--format", "docker", ctr, self.image_ref(BASE_TAG))
        finally:
            subprocess.run([self.buildah, *self.global_args, "rm", ctr], capture_output=True, env=self.env)
        self.save(BASE_TAG, out_archive)
        return self.image_ref(BASE_TAG)

    def build(
        self,
        dockerfile: Path,
        context: Path,
        tag: str,
        build_args: dict[str, str],
        target: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "bud",
            "--layers",
            "--no-cache",
            "--format",
            "docker",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--pull-never",
            "-f",
            str(dockerfile),
            "-t",
            self.image_ref(tag),
        ]
        for k, v in build_args.items():
            args += ["--build-arg", f"{k}={v}"]
        if target:
            args += ["--target", target]
        return self._buildah(*args, str(context))

    def save(self, tag: str, out_archive: Path) -> None:
        out_archive.unlink(missing_ok=True)
        self._buildah("push", self.image_ref(tag), f"docker-archive:{out_archive}:{tag}")

    def remove(self, *tags: str) -> None:
        for t in tags:
            subprocess.run(
                [self.buildah, *self.global_args, "rmi", "-f", self.image_ref(t)], capture_output=True, env=self.env
            )

    def close(self) -> None:
        if self._own:
            subprocess.run([self.buildah, *self.global_args, "rmi", "-a", "-f"], capture_output=True, env=self.env)
            shutil.rmtree(self.workdir, ignore_errors=True)


def available_references() -> list[Reference]:
    """The reference builders usable here, BuildKit first."""
    refs: list[Reference] = []
    d = DockerBuildKit()
    if d.available():
        refs.append(d)
    b = Buildah()
    if b.available():
        refs.append(b)
    else:
        b.close()
    return refs


# -- building a case -----------------------------------------------------------------------------------------------
@dataclass
class Built:
    tag: str
    archive: Path
    result: dict[str, Any]
    log: str = ""


@dataclass
class Session:
    """One builder's run over several cases: its base image and what it has built so far (for ``needs``)."""

    builder: Any  # a Reference, or anything with the same build/save/image_ref methods (the imgci adapter)
    workdir: Path
    base_ref: str
    base: BaseInfo
    built: dict[str, Built] = field(default_factory=dict)

    def base_for(self, case: Case) -> BaseInfo:
        if case.base == "busybox":
            return self.base
        if case.base == "scratch":
            return EMPTY_BASE
        if case.base.startswith("case:"):
            return base_info(self.built[case.base[5:]].archive)
        raise ValueError(f"{case.name}: unknown base {case.base!r}")


def tag_for(case: Case) -> str:
    return f"conformance/{case.name.replace('_', '-')}:latest"


def build_case(session: Session, case: Case) -> Built:
    """Materialise ``case``'s context, build it with ``session.builder``, save and normalise the image."""
    work = session.workdir / case.name
    if work.exists():
        shutil.rmtree(work)
    ctx = materialise_context(case, work / "context")
    args = {"BASE": session.base_ref, **case.build_args}
    for need in case.needs:
        args[need["arg"]] = session.builder.image_ref(session.built[need["case"]].tag)
    subs: dict[str, str] = {}
    tag = tag_for(case)
    with contextlib.ExitStack() as stack:
        if case.http:
            server = stack.enter_context(serve_http(case.http["files"]))
            args[case.http.get("arg", "HTTP")] = server.url
            subs[server.url] = "{HTTP}"
        started = time.time()
        is_reference = isinstance(session.builder, Reference)
        dockerfile = case.reference_dockerfile if is_reference else case.dockerfile
        proc = session.builder.build(dockerfile, ctx, tag, args, case.target)
    archive = work / "image.tar"
    session.builder.save(tag, archive)
    result = normalise_archive(archive, session.base_for(case), build_started=started, substitutions=subs)
    if is_reference:
        # the equivalent Dockerfile's commands differ from the case's: the history says what the case's would
        for i, created_by in case.reference_history.items():
            result["history"][i]["created_by"] = created_by
    built = Built(tag, archive, result, (proc.stdout or "") + (proc.stderr or ""))
    session.built[case.name] = built
    return built


def start_session(builder: Any, workdir: Path, rootfs_tar: Path) -> Session:
    workdir.mkdir(parents=True, exist_ok=True)
    base_archive = workdir / "base.tar"
    base_ref = builder.load_base(rootfs_tar, base_archive)
    return Session(builder, workdir, base_ref, base_info(base_archive))
