"""What the side-by-side benchmarks (``cache_rebuild.py``, ``run.py``) share: workloads, builders, measuring.

* **Workloads**: a Dockerfile on a given base image, its generated context, and the context file a
  one-file-changed build edits (:class:`Workload`; ``stages``, ``files``, ``steps``, ``big-run``).
* **Builders**, one interface (:class:`Builder`): :class:`Imgci` (``python -m imgci``, a fresh state directory
  at each :meth:`~Builder.reset`), :class:`BuildKit` (Docker 20.10's ``docker build`` against a private
  ``dockerd`` started by :func:`private_dockerd`) and :class:`Buildah` (``buildah bud --layers``, vfs storage,
  chroot isolation, a private root). Each either imports the base image from a rootfs tar (``base_tar``: nothing is
  pulled) or pulls it from a registry (cold = the base is gone too, the build pulls it again).
* **Measuring** (:func:`run_measured`): the wall time of one command, and the peak memory of its process tree
  (the sum of the processes' RSS sampled every 50 ms, or the largest single process's ``ru_maxrss`` from
  ``wait4`` when higher), plus that of a daemon's process tree (dockerd with containerd and the RUN containers)
  while the command ran. :class:`CpuMeter` tells the CPU time other processes took during the timed commands.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run_layer import BASE, PATH_ENV, ROOT, big_command, cpu_seconds, machine_info
from tests.infra.process import terminate

__all__ = ["BASE", "PATH_ENV", "ROOT", "cpu_seconds", "machine_info"]

DOCKER = "/usr/bin/docker"  # docker 20.10: the CLI that matches the daemon (not a newer one elsewhere on PATH)
DOCKERD = next((p for p in ("/usr/bin/dockerd", "/usr/sbin/dockerd") if Path(p).exists()), "dockerd")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


# -- workloads ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A Dockerfile, its context files, and the context file that the one-file-changed build edits."""

    key: str
    name: str
    dockerfile: str
    files: dict[str, bytes]
    changed: str

    def materialise(self, ctx: Path) -> None:
        """Write the context, its files dated an hour ago like a checkout that is not brand new (a file modified
        within the last seconds is hashed again at every build: its stat could still change within the same tick)."""
        ctx.mkdir(parents=True)
        hour_ago = time.time() - 3600
        for rel, data in [("Dockerfile", self.dockerfile.encode()), *self.files.items()]:
            path = ctx / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.utime(path, (hour_ago, hour_ago))

    def change(self, ctx: Path) -> None:
        with open(ctx / self.changed, "ab") as f:
            f.write(b"# changed\n")


def stages_workload(base: str = BASE) -> Workload:
    """Three independent stages of two RUN steps (4 + 8 MiB each, random), a final stage COPYing from each."""
    lines: list[str] = []
    for s in (1, 2, 3):
        lines += [
            f"FROM {base} AS s{s}",
            f"RUN echo s{s} > /stage && dd if=/dev/urandom of=/data.bin bs=1M count=4 2>/dev/null"
            " && sha256sum /data.bin > /data.sha256",
            "RUN cat /data.bin /data.bin > /double.bin && sha512sum /double.bin > /sums && cat /data.sha256 >> /sums",
        ]
    lines.append(f"FROM {base}")
    lines += [f"COPY --from=s{s} /data.bin /sums /out/s{s}/" for s in (1, 2, 3)]
    lines += ["COPY report.sh /report.sh", "RUN sh /report.sh > /report"]
    report = b"#!/bin/sh\ncat /out/*/sums\nwc -c /out/*/data.bin\n"
    return Workload("stages", "4 stages", "\n".join(lines) + "\n", {"report.sh": report}, "report.sh")


def files_workload(base: str = BASE, dirs: int = 40, per_dir: int = 100) -> Workload:
    """``COPY src/ /src/`` of ``dirs`` x ``per_dir`` small files, then a RUN listing them."""
    rng = random.Random(4000)
    files = {
        f"src/d{d:02d}/f{f:03d}.txt": rng.randbytes(rng.randrange(100, 2000)).hex().encode()[: rng.randrange(50, 1500)]
        for d in range(dirs)
        for f in range(per_dir)
    }
    dockerfile = f"FROM {base}\nCOPY src/ /src/\nRUN ls -lR /src > /listing && wc -l /listing\n"
    return Workload("files", f"{dirs * per_dir:,}-file context", dockerfile, files, "src/d19/f050.txt")


def steps_workload(base: str = BASE, n: int = 40, changed_at: int = 30) -> Workload:
    """``n`` instructions cycling RUN, ENV and COPY (of one small file each); the COPY at ``changed_at`` changes."""
    lines, files = [f"FROM {base}"], {}
    for i in range(1, n + 1):
        kind = ("COPY", "RUN", "ENV")[i % 3]
        if kind == "COPY":
            files[f"files/f{i:02d}.txt"] = f"file {i}\n".encode()
            lines.append(f"COPY files/f{i:02d}.txt /files/")
        elif kind == "RUN":
            lines.append(f"RUN echo {i} > /r{i:02d}")
        else:
            lines.append(f"ENV V{i:02d}={i}")
    assert f"files/f{changed_at:02d}.txt" in files, "the changed file must be a COPY step"
    return Workload("steps", f"{n} small steps", "\n".join(lines) + "\n", files, f"files/f{changed_at:02d}.txt")


def big_run_workload(base: str = BASE, size_mb: int = 200) -> Workload:
    """One RUN writing ``size_mb`` MiB (half random, half one repeated byte), then a COPY of a small file + RUN."""
    dockerfile = (
        f"FROM {base}\nRUN {big_command(size_mb, '')}\n"
        "COPY small.txt /small.txt\nRUN cat /small.txt > /copy && wc -c /big /text > /sizes\n"
    )
    return Workload("big-run", f"RUN writing {size_mb} MiB", dockerfile, {"small.txt": b"small\n"}, "small.txt")


# -- measuring a command ------------------------------------------------------------------------------------------
def proc_table() -> dict[int, tuple[int, int, float]]:
    """Every process: pid → (parent pid, RSS bytes, CPU seconds of it and of its waited-for children)."""
    table: dict[int, tuple[int, int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()  # the fields after "pid (comm)", from state (3) on
        except (OSError, IndexError):
            continue  # gone meanwhile
        cpu = (int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])) / TICK  # utime stime cutime cstime
        table[int(entry.name)] = (int(rest[1]), int(rest[21]) * PAGE, cpu)
    return table


def tree(table: dict[int, tuple[int, int, float]], roots: Sequence[int]) -> set[int]:
    """``roots`` (those still alive) and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds the process trees under ``roots`` used so far (exited members count through their parents)."""
    if not roots:
        return 0.0
    table = proc_table()
    return sum(table[p][2] for p in tree(table, roots))


@dataclass
class Measured:
    """One command: exit status, output, wall seconds, peak memory (bytes)."""

    returncode: int
    stdout: str
    stderr: str
    wall: float
    peak: int  # the command's process tree, plus the daemons' trees, at the sample where their sum was highest
    daemon_peak: int  # the daemons' trees alone


class _Sampler(threading.Thread):
    """Samples the summed RSS of a command's process tree and of daemon trees until stopped."""

    def __init__(self, pid: int, daemons: Sequence[int], interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.daemons, self.interval = pid, daemons, interval
        self.stopped = threading.Event()
        self.client = self.daemon_peak = self.total = 0

    def sample(self) -> None:
        table = proc_table()
        client = tree(table, [self.pid])
        daemon = tree(table, self.daemons) - client
        c, d = sum(table[p][1] for p in client), sum(table[p][1] for p in daemon)
        self.client = max(self.client, c)
        self.daemon_peak = max(self.daemon_peak, d)
        self.total = max(self.total, c + d)

    def run(self) -> None:
        while True:
            self.sample()
            if self.stopped.wait(self.interval):
                return


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    daemons: Sequence[int] = (),
    interval: float = 0.05,
) -> Measured:
    """Run ``cmd`` to completion (stdin closed, output captured in files), timing it and sampling its memory."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        sampler = _Sampler(proc.pid, daemons, interval)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            sampler.stopped.set()
            sampler.join()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        largest = usage.ru_maxrss * 1024  # kB: the largest single process of the tree (those waited for)
        out.seek(0)
        err.seek(0)
        return Measured(
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            wall=wall,
            peak=max(sampler.total, largest + sampler.daemon_peak),
            daemon_peak=sampler.daemon_peak,
        )


# -- builders -----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One build or push command: wall seconds; steps executed and reused (None when the builder does not say);
    peak memory in bytes (see :class:`Measured`); error."""

    wall: float = 0.0
    executed: int | None = None
    cached: int | None = None
    peak: int = 0
    daemon_peak: int = 0
    error: str = ""

    @classmethod
    def of(cls, m: Measured) -> Run:
        return cls(wall=m.wall, peak=m.peak, daemon_peak=m.daemon_peak, error="" if m.returncode == 0 else _fail(m))


def combine(runs: Sequence[Run]) -> Run:
    """Commands run one after another as one: times and step counts add up, memory is the highest peak."""
    counts = [r for r in runs if r.executed is not None]
    return Run(
        wall=sum(r.wall for r in runs),
        executed=sum(r.executed or 0 for r in counts) if counts else None,
        cached=sum(r.cached or 0 for r in counts) if counts else None,
        peak=max((r.peak for r in runs), default=0),
        daemon_peak=max((r.daemon_peak for r in runs), default=0),
        error=next((r.error for r in runs if r.error), ""),
    )


class Builder(Protocol):
    name: str  # as shown
    key: str  # lower case, for image names
    daemons: list[int]  # pids of the daemons that do its work (their CPU and memory count as the builder's)

    def version(self) -> str: ...

    def reset(self) -> None:
        """Empty the build cache (and, when the base is pulled, the base image too). Untimed."""
        ...

    def build(self, ctx: Path, tag: str, extra: Sequence[str] = ()) -> Run: ...

    def push(self, tag: str, dest: str | None = None) -> Run:
        """Push the image ``tag`` to its name (or to ``dest``)."""
        ...

    def close(self) -> None: ...


def _split(run: Run, push_seconds: float) -> tuple[Run, Run]:
    """One command that built and pushed, as (build, push): the push its own report's seconds, the build the rest;
    both carry the command's peak memory."""
    push_seconds = min(max(push_seconds, 0.0), run.wall)
    pushed = Run(wall=push_seconds, peak=run.peak, daemon_peak=run.daemon_peak)
    run.wall -= push_seconds
    return run, pushed


def _fail(m: Measured | subprocess.CompletedProcess[str]) -> str:
    """What went wrong: the last line that says error or failed (``imgci run`` ends with its metadata file's
    name), else the last line."""
    lines = (m.stderr or m.stdout or "").strip().splitlines()
    said = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return ((said or lines)[-1] if lines else f"exit {m.returncode}")[:300]


def rm_tree(path: Path) -> None:
    """``rm -rf``, also through mode-000 overlay work directories, staying on one file system."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def imgci_env() -> dict[str, str]:
    """The environment for ``python -m imgci``: with bytecode, as an installed package has it (:class:`Imgci` compiles
    ``imgci/`` up front into its ``__pycache__``, as pip does at install), also where PYTHONDONTWRITEBYTECODE is set:
    compiling imgci's modules at every start would add ≈ 60 ms to each build that an installed imgci does not pay."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class Imgci:
    """``python -m imgci`` (a new process per command) in a state directory of its own, a new one per reset.

    ``base_tar``: a rootfs tar imported as :data:`BASE` into every new state; without it the base is pulled.
    ``ca_bundle``: a PEM bundle (system CAs + a test CA) passed as ``REQUESTS_CA_BUNDLE``; ``certs_d``: a
    ``certs.d`` directory (``HOST:PORT/ca.crt``) passed as ``IMGCI_CERTS_D``.
    ``one_command``: where a build is followed by a push, ``build --push`` (``run --push``) rather than two
    commands."""

    name = key = "imgci"

    def __init__(
        self,
        work: Path,
        base_tar: Path | None = None,
        ca_bundle: Path | None = None,
        one_command: bool = True,
        certs_d: Path | None = None,
    ) -> None:
        self.work = work
        self.certs_d = certs_d
        self.one_command = one_command  # build and push in one command (run.py; see build_push)
        self.base_tar = base_tar
        self.ca_bundle = ca_bundle
        self.daemons: list[int] = []
        self.count = 0
        self.state: Path | None = None
        self.sandbox = ""  # what the sandbox probe picked (the first RUN's notes)
        compile_all = [sys.executable, "-m", "compileall", "-q", str(ROOT / "imgci")]
        subprocess.run(compile_all, env=imgci_env(), check=True, capture_output=True)

    def version(self) -> str:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return f"imgci {rev.stdout.strip() or '?'}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in imgci_env().items() if not k.startswith("IMGCI_")} | {"IMGCI_STATE": str(self.state)}
        if self.ca_bundle:
            env["REQUESTS_CA_BUNDLE"] = str(self.ca_bundle)
        if self.certs_d:
            env["IMGCI_CERTS_D"] = str(self.certs_d)
        return env

    def reset(self) -> None:
        # The old state stays until close(): removing tens of thousands of files just before a timed build slows
        # that build down by up to 0.7 s here (ext4 frees the blocks in the background, os.sync() does not wait).
        self.count += 1
        self.state = self.work / f"imgci-state-{self.count}"
        self.state.mkdir(parents=True)
        if self.base_tar:
            cmd = [sys.executable, "-m", "imgci", "import", str(self.base_tar), BASE, "--change", f"ENV {PATH_ENV}"]
            subprocess.run(cmd, env=self.env(), cwd=ROOT, check=True, capture_output=True)

    def _imgci(self, *args: str) -> Measured:
        return run_measured([sys.executable, "-m", "imgci", "--progress", "json", *args], env=self.env(), cwd=ROOT)

    def _note_sandbox(self, stderr: str) -> None:
        notes = [json.loads(line).get("message", "") for line in stderr.splitlines() if line.startswith("{")]
        picked = [n.removeprefix("sandbox: ") for n in notes if n.startswith("sandbox: ")]
        self.sandbox = self.sandbox or "; ".join(picked)

    def _build(self, ctx: Path, *args: str) -> tuple[Run, dict[str, Any]]:
        """``imgci build ARGS… --metadata-file F CTX``: the run (with its steps run and reused) and the metadata."""
        meta = ctx.parent / f"{ctx.name}.metadata.json"
        m = self._imgci("build", *args, "--metadata-file", str(meta), str(ctx))
        run = Run.of(m)
        if run.error:
            return run, {}
        doc = json.loads(meta.read_text())
        cache = doc.get("imgci.cache") or {}
        run.executed, run.cached = cache.get("misses"), cache.get("hits")
        self._note_sandbox(m.stderr)
        return run, doc

    def build(self, ctx: Path, tag: str, extra: Sequence[str] = ()) -> Run:
        return self._build(ctx, "-t", tag, *extra)[0]

    def push(self, tag: str, dest: str | None = None) -> Run:
        return Run.of(self._imgci("push", tag, *([dest] if dest else [])))

    def build_push(self, ctx: Path, tag: str) -> tuple[Run, Run]:
        """``imgci build --push -t TAG CTX``: one process builds and pushes, as a CI step runs it. The split comes
        from the metadata file: push = ``imgci.push_duration`` (the seconds its push took), build = the rest of
        the command's wall time (interpreter start included)."""
        run, doc = self._build(ctx, "--push", "-t", tag)
        if run.error:
            return run, Run(error="not pushed: the build failed")
        return _split(run, float(doc.get("imgci.push_duration", 0.0)))

    def _run(self, config: Path, flag: str) -> tuple[Run, list[dict[str, Any]]]:
        """``imgci run CONFIG FLAG``: the run (steps run and reused, summed over the entries) and the entries."""
        meta = config.parent / "imgci-metadata.json"
        m = self._imgci("run", str(config), flag, "--report", "none", "--metadata-file", str(meta))
        run = Run.of(m)
        if run.error:
            return run, []
        entries: list[dict[str, Any]] = json.loads(meta.read_text())["entries"]
        run.executed = sum(e["cache"]["misses"] for e in entries)
        run.cached = sum(e["cache"]["hits"] for e in entries)
        self._note_sandbox(m.stderr)
        return run, entries

    def run_matrix(self, config: Path, *, push: bool) -> Run:
        """``imgci run CONFIG`` (every entry of the build.yaml in one process), with ``--push`` or ``--no-push``."""
        return self._run(config, "--push" if push else "--no-push")[0]

    def run_matrix_push(self, config: Path) -> tuple[Run, Run]:
        """``imgci run CONFIG --push``: one process builds every entry and pushes each as soon as it is built. Push
        = the longest entry's push (they overlap each other and the other entries' builds), build = the rest."""
        run, entries = self._run(config, "--push")
        if run.error:
            return run, Run(error="not pushed: the build failed")
        return _split(run, max((float(e.get("push_seconds") or 0.0) for e in entries), default=0.0))

    def close(self) -> None:
        for i in range(1, self.count + 1):
            rm_tree(self.work / f"imgci-state-{i}")


@dataclass(frozen=True)
class Dockerd:
    host: str  # DOCKER_HOST
    pid: int


class BuildKit:
    """``DOCKER_BUILDKIT=1 docker build --network host`` against a private dockerd (:func:`private_dockerd`).

    With ``base_tar`` the base is ``docker import``ed once and stays; without it every reset removes all images
    (the pulled base too) and the build cache, so that a cold build pulls its base."""

    name = "BuildKit"
    key = "buildkit"

    def __init__(self, daemon: Dockerd, base_tar: Path | None = None) -> None:
        self.env = {**os.environ, "DOCKER_HOST": daemon.host, "DOCKER_BUILDKIT": "1"}
        self.daemons = [daemon.pid]
        self.base_tar = base_tar
        self.tags: set[str] = set()
        if base_tar:
            self.docker("import", "-c", f"ENV {PATH_ENV}", str(base_tar), BASE)

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOCKER, *args], env=self.env, check=True, capture_output=True, text=True)

    def version(self) -> str:
        return f"docker {self.docker('version', '--format', '{{.Server.Version}}').stdout.strip()} (BuildKit)"

    def reset(self) -> None:
        images = sorted(self.tags) if self.base_tar else self.docker("image", "ls", "-aq").stdout.split()
        if images:
            subprocess.run([DOCKER, "rmi", "-f", *images], env=self.env, capture_output=True)
        self.tags.clear()
        self.docker("builder", "prune", "--all", "--force")

    def build(self, ctx: Path, tag: str, extra: Sequence[str] = ()) -> Run:
        self.tags.add(tag)
        cmd = [DOCKER, "build", "--network", "host", "--progress", "plain", "-t", tag, *extra, str(ctx)]
        m = run_measured(cmd, env=self.env, daemons=self.daemons)
        run = Run.of(m)
        if not run.error:
            # "#7 [stage-1 2/3] COPY …" names a step vertex; "#7 CACHED" marks it reused
            steps = set(re.findall(r"^#(\d+) \[[^\]]*\d+/\d+\] (?!FROM )", m.stderr, re.M))
            cached = set(re.findall(r"^#(\d+) CACHED$", m.stderr, re.M)) & steps
            run.executed, run.cached = len(steps - cached), len(cached)
        return run

    def push(self, tag: str, dest: str | None = None) -> Run:
        if dest:
            self.docker("tag", tag, dest)
            self.tags.add(dest)
        return Run.of(run_measured([DOCKER, "push", dest or tag], env=self.env, daemons=self.daemons))

    def close(self) -> None:
        pass  # the daemon's data root goes with private_dockerd()


class Buildah:
    """``buildah bud --layers --isolation chroot --network host`` with vfs storage in a private root.

    With ``base_tar`` the base is made once (``from scratch`` + ``add`` + ``commit``) and builds never pull; a reset
    removes the built images. Without it builds pull their base (``cert_dir`` holds the registry's ``ca.crt``;
    None means ``--tls-verify=false``) and a reset removes every image."""

    name = key = "buildah"

    def __init__(self, work: Path, base_tar: Path | None = None, cert_dir: Path | None = None) -> None:
        self.root = work / "buildah"
        self.base = [
            *("buildah", "--root", str(self.root / "root"), "--runroot", str(self.root / "run")),
            *("--storage-driver", "vfs"),
        ]
        self.daemons: list[int] = []
        self.base_tar = base_tar
        self.tls = ["--cert-dir", str(cert_dir)] if cert_dir else ["--tls-verify=false"]
        self.tags: set[str] = set()
        if base_tar:
            ctr = self._out("from", "scratch")
            self._out("add", ctr, str(base_tar), "/")
            self._out("config", "--env", PATH_ENV, ctr)
            self._out("commit", "-q", ctr, BASE)
            self._out("rm", ctr)

    def _out(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout.strip()

    def version(self) -> str:
        return self._out("--version").replace(" version ", " ").split(" (")[0]

    def reset(self) -> None:
        if self.base_tar:
            if self.tags:
                subprocess.run([*self.base, "rmi", "--force", *sorted(self.tags)], capture_output=True)
            subprocess.run([*self.base, "rmi", "--prune"], capture_output=True)  # intermediate images left, if any
        else:
            subprocess.run([*self.base, "rmi", "--all", "--force"], capture_output=True)
        self.tags.clear()

    def build(self, ctx: Path, tag: str, extra: Sequence[str] = ()) -> Run:
        self.tags.add(tag)
        pull = ["--pull-never"] if self.base_tar else self.tls
        cmd = [*self.base, "bud", "--layers", "--isolation", "chroot", "--network", "host", *pull, "-t", tag]
        m = run_measured([*cmd, *extra, str(ctx)])
        run = Run.of(m)
        if not run.error:
            steps = len(re.findall(r"STEP \d+/\d+: (?!FROM )", m.stdout))
            cached = m.stdout.count("--> Using cache ")
            run.executed, run.cached = steps - cached, cached
        return run

    def push(self, tag: str, dest: str | None = None) -> Run:
        return Run.of(run_measured([*self.base, "push", *self.tls, tag, f"docker://{dest or tag}"]))

    def close(self) -> None:
        subprocess.run([*self.base, "rmi", "--all", "--force"], capture_output=True)
        rm_tree(self.root)


@contextmanager
def private_dockerd(work: Path) -> Iterator[Dockerd]:
    """A dockerd of our own (overlay2, no bridge, no iptables, its own data root and socket)."""
    sock = work / "docker.sock"
    log = open(work / "dockerd.log", "wb")  # noqa: SIM115 - closed in the finally below
    cmd = [
        *(DOCKERD, "--bridge=none", "--iptables=false", "--ip6tables=false", "--storage-driver=overlay2"),
        *(f"--data-root={work / 'docker-data'}", f"--exec-root={work / 'docker-exec'}"),
        *(f"--pidfile={work / 'dockerd.pid'}", f"--host=unix://{sock}"),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    host = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([DOCKER, "-H", host, "version"], capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (work / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd did not start:\n{tail}")
            time.sleep(0.3)
        yield Dockerd(host, proc.pid)
    finally:
        terminate(proc, 30)
        log.close()
        rm_tree(work / "docker-data")
        rm_tree(work / "docker-exec")


def peers_available() -> dict[str, bool]:
    """Which peers can run here: they need root, docker 20.10's CLI and daemon, buildah."""
    root = os.geteuid() == 0
    return {
        "BuildKit": root and Path(DOCKER).exists() and shutil.which(DOCKERD) is not None,
        "buildah": root and shutil.which("buildah") is not None,
    }


# -- the machine --------------------------------------------------------------------------------------------------
def kernel_seconds() -> float:
    """CPU seconds since boot of kernel threads (writeback, block I/O workers: mostly the builds' own I/O, which
    ``getrusage`` does not count) and interrupts."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    ticks = fields[5] + fields[6]  # irq, softirq
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()  # the fields after "pid (comm)", from state (3) on
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(rest[6]) & 0x00200000:  # flags (9): PF_KTHREAD
            ticks += int(rest[11]) + int(rest[12])  # utime (14), stime (15)
    return ticks / TICK


@dataclass
class CpuMeter:
    """CPU time other processes and the kernel's threads took during the timed commands. The benchmark's own
    process and its waited-for children count as its own, and so do the trees of the ``services`` pids given to
    :meth:`window` (dockerd with containerd and BuildKit's RUN containers, the registry)."""

    other: float = 0.0
    kernel: float = 0.0
    span: float = 0.0

    @contextmanager
    def window(self, services: Sequence[int] = ()) -> Iterator[None]:
        t0 = time.perf_counter()
        (busy0, own0), kernel0, svc0 = cpu_seconds(), kernel_seconds(), tree_cpu_seconds(services)
        yield
        span = time.perf_counter() - t0
        (busy1, own1), kernel1, svc1 = cpu_seconds(), kernel_seconds(), tree_cpu_seconds(services)
        self.kernel += kernel1 - kernel0
        self.other += max(0.0, (busy1 - busy0) - (own1 - own0) - (kernel1 - kernel0) - (svc1 - svc0))
        self.span += span

    def shares(self) -> tuple[float, float]:
        """(other processes, kernel threads and interrupts), as shares of all CPUs over the counted commands."""
        cpus = self.span * (os.cpu_count() or 1)
        return (self.other / cpus, self.kernel / cpus) if cpus else (0.0, 0.0)


def machine_line(m: dict[str, Any]) -> str:
    """The machine a result was measured on, and how busy other processes kept it, in one line."""
    return (
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']},"
        f" on {m['filesystem']}{', as root' if m['euid'] == 0 else ''}; other processes used"
        f" {m['other_cpu_share']:.0%} of the CPUs (kernel threads and interrupts, mostly the builds' own I/O:"
        f" {m['kernel_cpu_share']:.0%})"
    )


def startup_seconds(n: int = 5) -> float:
    """Median wall time of ``python -m imgci --help``: interpreter start and the CLI's imports, no build."""
    times = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "imgci", "--help"]
        subprocess.run(cmd, env=imgci_env(), cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first run warms the page cache
