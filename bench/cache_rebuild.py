"""Benchmark: rebuilding with the build cache — cold, warm (nothing changed), one changed file — against peers.

Three workloads, each a Dockerfile and a generated context (base: the busybox root file system of
``tests/infra/rootfs.py``, imported into every builder; no registry, no network, nothing is pulled):

1. **4 stages**: three independent stages (their commands differ: identical ones would be one step), each two RUN
   steps writing 4 + 8 MiB (``dd if=/dev/urandom``, a copy, checksums), and a final stage that COPYs ``--from``
   each, COPYs ``report.sh`` from the context and RUNs it.
2. **4,000-file context**: ``COPY src/ /src/`` of 4,000 small files (40 directories of 100) and ``RUN ls -lR /src``.
3. **40 small steps**: 40 instructions cycling RUN, ENV, COPY (of one small context file each).

Per workload and builder, three builds in a row: **cold** (empty build cache, base image present), **warm** (the
same build again, nothing changed) and **one file changed** (one context file edited: ``report.sh`` of the final
stage, one of the 4,000 files, the file the 40-step build COPYs at step 30; the other files are dated an hour back,
like a checkout that is not brand new). The time is the wall time of the build command. imgci runs as a fresh
``python -m imgci build`` process each time (a cold start of the interpreter, its modules byte-compiled beforehand as
an installed package's are), while BuildKit's daemon is already running; its ``docker build`` is only a client.
imgci's executed/cached step counts come from ``--metadata-file`` (``imgci.cache``); the peers' from their output
(JSON only: BuildKit does not count ENV-like steps, which are not vertices of its graph).

Builders: imgci (this checkout, a fresh state directory per cold build, base brought in with ``imgci import``);
Docker 20.10's built-in BuildKit on a private ``dockerd`` (overlay2, no bridge, no iptables; cold = ``docker rmi`` +
``docker builder prune --all``; base from ``docker import``); buildah 1.28 (``bud --layers``, vfs, chroot isolation;
cold = ``rmi`` of the result, its intermediate images with it; base from ``buildah from scratch`` + ``add`` +
``commit``). Peers need root and are skipped when missing or with ``--no-peers``.

Usage::

    .venv/bin/python bench/cache_rebuild.py [--repeat N] [--json out.json] [--no-peers] [--only WORKLOAD]
                                            [--profile warm40.prof] [--dir DIR]

``--repeat N`` reports medians of N rounds. ``--profile FILE`` also profiles one warm rebuild of the 40-step
workload with cProfile in every thread (imports included, interpreter start-up not) and writes the stats to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run_layer import BASE, PATH_ENV, ROOT, cpu_seconds, machine_info
from tests.infra.rootfs import make_busybox_rootfs_tar

DOCKER = "/usr/bin/docker"  # docker 20.10: the CLI that matches the daemon (not a newer one elsewhere on PATH)
DOCKERD = next((p for p in ("/usr/bin/dockerd", "/usr/sbin/dockerd") if Path(p).exists()), "dockerd")
TAG = "localhost/bench:latest"
SCENARIOS = ("cold", "warm", "one file changed")


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


def stages_workload() -> Workload:
    lines: list[str] = []
    for s in (1, 2, 3):
        lines += [
            f"FROM {BASE} AS s{s}",
            f"RUN echo s{s} > /stage && dd if=/dev/urandom of=/data.bin bs=1M count=4 2>/dev/null"
            " && sha256sum /data.bin > /data.sha256",
            "RUN cat /data.bin /data.bin > /double.bin && sha512sum /double.bin > /sums && cat /data.sha256 >> /sums",
        ]
    lines.append(f"FROM {BASE}")
    lines += [f"COPY --from=s{s} /data.bin /sums /out/s{s}/" for s in (1, 2, 3)]
    lines += ["COPY report.sh /report.sh", "RUN sh /report.sh > /report"]
    report = b"#!/bin/sh\ncat /out/*/sums\nwc -c /out/*/data.bin\n"
    return Workload("stages", "4 stages", "\n".join(lines) + "\n", {"report.sh": report}, "report.sh")


def files_workload(dirs: int = 40, per_dir: int = 100) -> Workload:
    rng = random.Random(4000)
    files = {
        f"src/d{d:02d}/f{f:03d}.txt": rng.randbytes(rng.randrange(100, 2000)).hex().encode()[: rng.randrange(50, 1500)]
        for d in range(dirs)
        for f in range(per_dir)
    }
    dockerfile = f"FROM {BASE}\nCOPY src/ /src/\nRUN ls -lR /src > /listing && wc -l /listing\n"
    return Workload("files", f"{dirs * per_dir:,}-file context", dockerfile, files, "src/d19/f050.txt")


def steps_workload(n: int = 40, changed_at: int = 30) -> Workload:
    lines, files = [f"FROM {BASE}"], {}
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


WORKLOADS = {w.key: w for w in (stages_workload(), files_workload(), steps_workload())}


# -- builders -----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One build: wall seconds; steps executed and reused (None when the builder does not say); error."""

    wall: float = 0.0
    executed: int | None = None
    cached: int | None = None
    error: str = ""


class Builder(Protocol):
    name: str
    own_cpu: bool  # its work runs in our child processes (so the CPU meter can tell it from other load)

    def version(self) -> str: ...

    def reset(self) -> None:
        """Empty the build cache; the base image stays (or is imported again). Untimed."""
        ...

    def build(self, ctx: Path) -> Run: ...


def _fail(proc: subprocess.CompletedProcess[str]) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return (lines[-1] if lines else f"exit {proc.returncode}")[:200]


def _rm(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def imgci_env() -> dict[str, str]:
    """The environment for ``python -m imgci``: with bytecode, as an installed package has it (:class:`Imgci` compiles
    ``imgci/`` up front into its ``__pycache__``, as pip does at install), also where PYTHONDONTWRITEBYTECODE is set:
    compiling imgci's modules at every start would add ≈ 60 ms to each build that an installed imgci does not pay."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class Imgci:
    """``python -m imgci build`` in a state directory of its own (a new one at each :meth:`reset`)."""

    name = "imgci"
    own_cpu = True

    def __init__(self, work: Path, base_tar: Path) -> None:
        self.work = work
        self.base_tar = base_tar
        self.count = 0
        self.state: Path | None = None
        self.sandbox = ""  # what the sandbox probe picked (the first RUN's note)
        compile_all = [sys.executable, "-m", "compileall", "-q", str(ROOT / "imgci")]
        subprocess.run(compile_all, env=imgci_env(), check=True, capture_output=True)

    def version(self) -> str:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return f"imgci {rev.stdout.strip() or '?'}"

    def _env(self) -> dict[str, str]:
        return imgci_env() | {"IMGCI_STATE": str(self.state)}

    def reset(self) -> None:
        # The old state stays until close(): removing tens of thousands of files just before a timed build slows
        # that build down by up to 0.7 s here (ext4 frees the blocks in the background, os.sync() does not wait).
        self.count += 1
        self.state = self.work / f"imgci-state-{self.count}"
        cmd = [sys.executable, "-m", "imgci", "import", str(self.base_tar), BASE, "--change", f"ENV {PATH_ENV}"]
        subprocess.run(cmd, env=self._env(), cwd=ROOT, check=True, capture_output=True)

    def build(self, ctx: Path) -> Run:
        meta = ctx.parent / f"{ctx.name}.metadata.json"
        cmd = [sys.executable, "-m", "imgci", "--progress", "json", "build", "-t", TAG, "--metadata-file", str(meta)]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, str(ctx)], env=self._env(), cwd=ROOT, capture_output=True, text=True)
        run = Run(wall=time.perf_counter() - t0)
        if proc.returncode != 0:
            run.error = _fail(proc)
            return run
        cache = json.loads(meta.read_text()).get("imgci.cache") or {}
        run.executed, run.cached = cache.get("misses"), cache.get("hits")
        notes = [json.loads(line).get("message", "") for line in proc.stderr.splitlines() if line.startswith("{")]
        picked = [n.removeprefix("sandbox: ") for n in notes if n.startswith("sandbox: ")]
        self.sandbox = self.sandbox or "; ".join(picked)
        return run

    def close(self) -> None:
        for i in range(1, self.count + 1):
            _rm(self.work / f"imgci-state-{i}")


class BuildKit:
    """``DOCKER_BUILDKIT=1 docker build`` against a private dockerd (started by :func:`private_dockerd`)."""

    name = "BuildKit"
    own_cpu = False  # the work happens in dockerd/containerd, not in our children

    def __init__(self, host: str, base_tar: Path) -> None:
        self.env = {**os.environ, "DOCKER_HOST": host, "DOCKER_BUILDKIT": "1"}
        self._docker("import", "-c", f"ENV {PATH_ENV}", str(base_tar), BASE)

    def _docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOCKER, *args], env=self.env, check=True, capture_output=True, text=True)

    def version(self) -> str:
        return f"docker {self._docker('version', '--format', '{{.Server.Version}}').stdout.strip()} (BuildKit)"

    def reset(self) -> None:
        subprocess.run([DOCKER, "rmi", "-f", TAG], env=self.env, capture_output=True)
        self._docker("builder", "prune", "--all", "--force")

    def build(self, ctx: Path) -> Run:
        cmd = [DOCKER, "build", "--network", "host", "--progress", "plain", "-t", TAG, str(ctx)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        run = Run(wall=time.perf_counter() - t0)
        if proc.returncode != 0:
            run.error = _fail(proc)
            return run
        # "#7 [stage-1 2/3] COPY …" names a step vertex; "#7 CACHED" marks it reused
        steps = set(re.findall(r"^#(\d+) \[[^\]]*\d+/\d+\] (?!FROM )", proc.stderr, re.M))
        cached = set(re.findall(r"^#(\d+) CACHED$", proc.stderr, re.M)) & steps
        run.executed, run.cached = len(steps - cached), len(cached)
        return run


class Buildah:
    """``buildah bud --layers`` with vfs storage and chroot isolation in a private root."""

    name = "buildah"
    own_cpu = True

    def __init__(self, work: Path, base_tar: Path) -> None:
        self.root = work / "buildah"
        self.base = [
            *("buildah", "--root", str(self.root / "root"), "--runroot", str(self.root / "run")),
            *("--storage-driver", "vfs"),
        ]
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
        subprocess.run([*self.base, "rmi", "--force", TAG], capture_output=True)
        subprocess.run([*self.base, "rmi", "--prune"], capture_output=True)  # intermediate images left, if any

    def build(self, ctx: Path) -> Run:
        cmd = [*self.base, "bud", "--layers", "--isolation", "chroot", "--network", "host", "--pull-never", "-t", TAG]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, str(ctx)], capture_output=True, text=True)
        run = Run(wall=time.perf_counter() - t0)
        if proc.returncode != 0:
            run.error = _fail(proc)
            return run
        steps = len(re.findall(r"STEP \d+/\d+: (?!FROM )", proc.stdout))
        cached = proc.stdout.count("--> Using cache ")
        run.executed, run.cached = steps - cached, cached
        return run

    def close(self) -> None:
        subprocess.run([*self.base, "rmi", "--all", "--force"], capture_output=True)
        _rm(self.root)


@contextmanager
def private_dockerd(work: Path) -> Iterator[str]:
    """A dockerd of our own (as tests/conformance/make_expected.py starts one); yields its DOCKER_HOST."""
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
        yield host
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        _rm(work / "docker-data")
        _rm(work / "docker-exec")


# -- measuring ----------------------------------------------------------------------------------------------------
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
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU time other processes and the kernel's threads took during the timed builds whose work runs in our
    children (imgci, buildah): dockerd is not our waited-for child, so BuildKit's builds are left out rather than
    counted as other load."""

    other: float = 0.0
    kernel: float = 0.0
    span: float = 0.0

    @contextmanager
    def window(self, counted: bool) -> Iterator[None]:
        (busy0, own0), kernel0, t0 = cpu_seconds(), kernel_seconds(), time.perf_counter()
        yield
        if counted:
            span = time.perf_counter() - t0
            (busy1, own1), kernel1 = cpu_seconds(), kernel_seconds()
            self.kernel += kernel1 - kernel0
            self.other += max(0.0, (busy1 - busy0) - (own1 - own0) - (kernel1 - kernel0))
            self.span += span

    def shares(self) -> tuple[float, float]:
        """(other processes, kernel threads and interrupts), as shares of all CPUs over the counted builds."""
        cpus = self.span * (os.cpu_count() or 1)
        return (self.other / cpus, self.kernel / cpus) if cpus else (0.0, 0.0)


@dataclass
class Cell:
    """The runs of one (workload, builder, scenario)."""

    runs: list[Run] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        ok = [r for r in self.runs if not r.error]
        if not ok:
            return {"error": self.runs[0].error if self.runs else "not run"}
        return {
            "wall_s": round(statistics.median(r.wall for r in ok), 3),
            "walls_s": [round(r.wall, 3) for r in self.runs],
            "executed": ok[-1].executed,
            "cached": ok[-1].cached,
        }


def measure(workload: Workload, builder: Builder, work: Path, repeat: int, meter: CpuMeter) -> dict[str, Cell]:
    cells = {s: Cell() for s in SCENARIOS}
    for i in range(repeat):
        ctx = work / f"ctx-{workload.key}-{builder.name}-{i}"
        workload.materialise(ctx)
        builder.reset()
        for scenario in SCENARIOS:
            if scenario == "one file changed":
                workload.change(ctx)
            os.sync()  # the previous build's dirty pages go now, not during this one
            with meter.window(builder.own_cpu):
                run = builder.build(ctx)
            cells[scenario].runs.append(run)
            counts = f" ({run.executed} run, {run.cached} cached)" if run.cached is not None else ""
            shown = f"{run.wall:.2f}s{counts}"
            print(f"  {workload.name} · {builder.name} · {scenario}: {run.error or shown}", file=sys.stderr, flush=True)
        _rm(ctx)
    return cells


def startup_seconds(n: int = 5) -> float:
    """Median wall time of ``python -m imgci --help``: interpreter start and the CLI's imports, no build."""
    times = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "imgci", "--help"]
        subprocess.run(cmd, env=imgci_env(), cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first run warms the page cache


PROFILE_BOOTSTRAP = """
import cProfile, pstats, sys, threading
out, argv = sys.argv[1], sys.argv[2:]
profiles = [cProfile.Profile()]
def start_in_thread(frame, event, arg):  # the first event of a new thread starts that thread's own profiler
    profiles.append(cProfile.Profile())
    profiles[-1].enable()
threading.setprofile(start_in_thread)
profiles[0].enable()
code = 1
try:
    from imgci.cli import main
    code = main(argv)
finally:
    profiles[0].disable()
    pstats.Stats(*profiles).dump_stats(out)
sys.exit(code)
"""


def profile_warm(imgci: Imgci, work: Path, out: Path) -> None:
    """Build the 40-step workload twice in a fresh state, then a third time under cProfile (every thread)."""
    workload = WORKLOADS["steps"]
    ctx = work / "ctx-profile"
    workload.materialise(ctx)
    imgci.reset()
    for _ in range(2):
        imgci.build(ctx)
    cmd = [sys.executable, "-c", PROFILE_BOOTSTRAP, str(out.resolve()), "build", "-t", TAG, str(ctx)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=imgci._env(), cwd=ROOT, check=True, capture_output=True)
    print(f"\nprofile of a warm 40-step rebuild ({time.perf_counter() - t0:.2f}s under cProfile) written to {out}")
    _rm(ctx)


# -- output -------------------------------------------------------------------------------------------------------
def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']},"
        f" on {m['filesystem']}{', as root' if m['euid'] == 0 else ''}; other processes used"
        f" {m['other_cpu_share']:.0%} of the CPUs (kernel threads and interrupts, mostly the builds' own I/O:"
        f" {m['kernel_cpu_share']:.0%})"
    )
    if m["other_cpu_share"] > 0.1:
        print("warning: the machine was busy with other work; these numbers are not representative")
    peers = [b for b in result["builders"] if b != "imgci"]
    repeat = result["args"]["repeat"]
    print(f"\n### Rebuild wall time, s ({'median of ' + str(repeat) if repeat > 1 else 'one run'}; x = peer / imgci)\n")
    print("| workload | build | imgci (steps run/cached) |" + "".join(f" {result['builders'][p]} |" for p in peers))
    print("|---|---|--:|" + "--:|" * len(peers))
    for row in result["rows"]:
        me = row["builders"].get("imgci", {})
        cells = [f"{me['wall_s']:.2f} ({me['executed']}/{me['cached']})" if "wall_s" in me else me.get("error", "-")]
        for p in peers:
            peer = row["builders"].get(p, {})
            if "wall_s" not in peer:
                cells.append(peer.get("error", "-"))
            elif "wall_s" in me:
                cells.append(f"{peer['wall_s']:.2f} ({peer['wall_s'] / me['wall_s']:.1f}x)")
            else:
                cells.append(f"{peer['wall_s']:.2f}")
        print(f"| {row['workload']} | {row['scenario']} | " + " | ".join(cells) + " |")
    daemon = "; BuildKit: `docker build` against a daemon already running" if "BuildKit" in result["builders"] else ""
    print(
        f"\nimgci: a new `python -m imgci` process per build (`python -m imgci --help` alone:"
        f" {result['imgci_startup_s']:.2f}s){daemon}."
    )
    if result.get("imgci_sandbox"):
        print(f"imgci's sandbox: {result['imgci_sandbox']}")


def start_builders(stack: ExitStack, work: Path, base_tar: Path, peers: bool) -> list[Builder]:
    """imgci, and the peers usable here (root needed); each is cleaned up when ``stack`` closes."""
    imgci = Imgci(work, base_tar)
    stack.callback(imgci.close)
    builders: list[Builder] = [imgci]
    if not peers or os.geteuid() != 0:
        return builders
    if Path(DOCKER).exists() and shutil.which(DOCKERD):
        try:
            builders.append(BuildKit(stack.enter_context(private_dockerd(work)), base_tar))
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"BuildKit skipped: {e}", file=sys.stderr)
    if shutil.which("buildah"):
        try:
            buildah = Buildah(work, base_tar)
            stack.callback(buildah.close)
            builders.append(buildah)
        except subprocess.CalledProcessError as e:
            print(f"buildah skipped: {(e.stderr or '').strip()[-200:]}", file=sys.stderr)
    return builders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="rounds per measurement; medians reported (default 1)")
    ap.add_argument("--no-peers", action="store_true", help="measure imgci only")
    ap.add_argument("--only", action="append", choices=list(WORKLOADS), help="run this workload (repeatable)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--profile", type=Path, help="also write a cProfile of one warm 40-step rebuild here")
    ap.add_argument("--dir", type=Path, default=None, help="where to put state and contexts (default: $TMPDIR)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below when killed
    work = Path(tempfile.mkdtemp(prefix="imgci-cachebench-", dir=args.dir))
    with ExitStack() as stack:
        stack.callback(_rm, work)  # last: the callbacks run in reverse
        base_tar = make_busybox_rootfs_tar(work / "busybox.tar")
        builders = start_builders(stack, work, base_tar, peers=not args.no_peers)
        imgci = builders[0]
        assert isinstance(imgci, Imgci)
        result: dict[str, Any] = {
            "machine": machine_info(work),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": " ".join(["python", "bench/cache_rebuild.py", *sys.argv[1:]]),
            "builders": {b.name: b.version() for b in builders},
            "imgci_startup_s": round(startup_seconds(), 3),
            "rows": [],
        }
        meter = CpuMeter()
        t0 = time.perf_counter()
        for key in args.only or list(WORKLOADS):
            workload = WORKLOADS[key]
            cells = {b.name: measure(workload, b, work, args.repeat, meter) for b in builders}
            for scenario in SCENARIOS:
                row: dict[str, Any] = {"workload": workload.name, "scenario": scenario}
                row["builders"] = {name: c[scenario].row() for name, c in cells.items()}
                result["rows"].append(row)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        result["imgci_sandbox"] = imgci.sandbox
        other, kernel = meter.shares()
        result["machine"].update(other_cpu_share=round(other, 3), kernel_cpu_share=round(kernel, 3))
        print_table(result)
        print(f"\n(total {result['total_s']} s)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.profile:
            profile_warm(imgci, work, args.profile)


if __name__ == "__main__":
    main()
