"""Benchmark: what a ``RUN`` step costs in ``imgci build`` — committing a big layer, and the fixed cost per step.

Everything runs the real CLI (``python -m imgci build --progress json``) in a fresh state directory with a busybox
base image (``tests/infra/rootfs.py``, imported with ``imgci import``); no registry, no network. Step times come
from the JSON progress events (``started``/``done`` of each step, so interpreter start-up is excluded); wall times
are of the whole ``imgci build`` process.

1. **Big layer**: one RUN writes ``--size-mb`` MiB, half incompressible (``dd if=/dev/urandom``), half a single
   repeated byte (``head -c … /dev/zero | tr``). The *command* time is the same RUN writing into a
   ``--mount=type=tmpfs`` (the same sandbox, no layer); *commit* = step - command is the snapshot diff, tar, pipe,
   digest, compression, blob write + fsync and unpacking into the layer store; MB/s = data / commit. A ``RUN true``
   before absorbs the sandbox probe; the ``RUN true`` after shows what the next step pays on top of the big layer.
   Per snapshotter (``-b overlay|native``) and isolation (``userns``, and ``chroot`` when root); gzip for all,
   ``zstd`` and ``uncompressed`` for userns. buildah (vfs, chroot isolation; it stores layers uncompressed) gets
   the same Dockerfiles when it is installed.
2. **Per-step overhead**: 40 ``RUN echo N > /fN`` steps (40 layers), cold (empty state, base imported), per
   snapshotter and isolation: wall / 40 and the median step; the same for 40 ``ENV`` steps; the sandbox probe
   (paid once per build, by its first RUN) and one trivial ``RUN true`` after it.

Usage::

    .venv/bin/python bench/run_layer.py [--size-mb 250] [--steps 40] [--repeat 1] [--json out.json]
                                        [--only big|steps] [--no-buildah] [--dir DIR]

MB here is 10^6 bytes per second of throughput; the data size is ``--size-mb`` MiB. Numbers vary a few tens of
percent between runs (page-cache writeback from one build lands in the next); ``--repeat N`` keeps the best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.infra.rootfs import make_busybox_rootfs_tar

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/busybox:latest"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class BuildRun:
    """One ``imgci build``: wall seconds, per-step seconds (in Dockerfile order), probe seconds, error."""

    wall: float = 0.0
    steps: list[float] = field(default_factory=list)
    probe: float = 0.0
    span: float = 0.0  # first step started → last step done
    blob_mb: float = 0.0  # the largest blob in the state (the big layer, compressed)
    error: str = ""


# -- running builders -------------------------------------------------------------------------------------------
class Bench:
    """Runs ``imgci build`` under ``work``, each build in a fresh state directory with the base imported."""

    def __init__(self, work: Path, base_tar: Path) -> None:
        self.work = work
        self.base_tar = base_tar
        self.count = 0

    def fresh_state(self) -> Path:
        self.count += 1
        state = self.work / f"state-{self.count}"
        env = {**os.environ, "IMGCI_STATE": str(state)}
        cmd = [sys.executable, "-m", "imgci", "import", str(self.base_tar), BASE, "--change", f"ENV {PATH_ENV}"]
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
        return state

    def build(self, dockerfile: str, *, backend: str, isolation: str, compression: str = "gzip") -> BuildRun:
        """Build ``dockerfile`` in a fresh state directory (removed afterwards)."""
        state = self.fresh_state()
        ctx = self.work / f"ctx-{self.count}"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(dockerfile)
        cmd = [sys.executable, "-m", "imgci", "--progress", "json", "build", "-t", "bench:latest"]
        cmd += ["-b", backend, "--isolation", isolation, "--compression", compression, str(ctx)]
        os.sync()  # let the previous build's dirty pages go before timing this one
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "IMGCI_STATE": str(state)}, cwd=ROOT, capture_output=True)
        run = BuildRun(wall=time.perf_counter() - t0)
        events = [json.loads(line) for line in proc.stderr.decode().splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            tail = proc.stderr.decode().strip().splitlines()[-1:] or ["?"]
            run.error = tail[0][:200]
        started = {e["step"]: e["time"] for e in events if e["event"] == "started"}
        done = [e for e in events if e["event"] == "done" and not e["name"].split("] ", 1)[-1].startswith("FROM")]
        run.steps = [e["duration"] for e in sorted(done, key=lambda e: e["step"])]
        notes = [e["time"] for e in events if e["event"] == "note" and e["message"].startswith("sandbox:")]
        if notes and started:
            first_run = min(t for s, t in started.items() if s > 1) if len(started) > 1 else min(started.values())
            run.probe = notes[0] - first_run
        if started and done:
            run.span = max(e["time"] for e in done) - min(started.values())
        blobs = [p.stat().st_size for p in (state / "blobs" / "sha256").iterdir()]
        run.blob_mb = max(blobs) / 1e6 if blobs else 0.0
        shutil.rmtree(ctx, ignore_errors=True)
        _rmtree(state)
        return run


class Buildah:
    """buildah bud with vfs storage and chroot isolation, the busybox base made with from scratch + add + commit."""

    def __init__(self, work: Path, base_tar: Path) -> None:
        self.root = work / "buildah"
        self.base = ["buildah", "--root", str(self.root / "root"), "--runroot", str(self.root / "run")]
        self.base += ["--storage-driver", "vfs"]
        ctr = self._out("from", "scratch")
        self._out("add", ctr, str(base_tar), "/")
        self._out("config", "--env", PATH_ENV, ctr)
        self._out("commit", "-q", ctr, BASE)
        self._out("rm", ctr)
        self.count = 0

    def _out(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout.strip()

    def build(self, dockerfile: str) -> BuildRun:
        """Step times from the moment each ``STEP n/m:`` line arrives (a step includes its layer commit)."""
        self.count += 1
        ctx = self.root / f"ctx-{self.count}"
        ctx.mkdir(parents=True)
        (ctx / "Dockerfile").write_text(dockerfile)
        cmd = [*self.base, "bud", "--isolation", "chroot", "--layers", "--network", "host", "-t", "bench", str(ctx)]
        os.sync()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        marks: list[float] = []
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"STEP \d+/\d+: ", line):
                marks.append(time.perf_counter())
        proc.wait()
        end = time.perf_counter()
        run = BuildRun(wall=end - t0)
        if proc.returncode != 0:
            run.error = (lines[-1] if lines else "?").strip()[:200]
        # STEP 1 is FROM; a step lasts until the next STEP line (the last one until buildah exits, its COMMIT
        # included), so each step includes its layer commit.
        run.steps = [b - a for a, b in zip(marks[1:], [*marks[2:], end], strict=False)]
        run.span = end - (marks[1] if len(marks) > 1 else t0)
        subprocess.run([*self.base, "rmi", "--force", "bench"], capture_output=True)
        subprocess.run([*self.base, "rmi", "--prune"], capture_output=True)  # the untagged step images: next build cold
        shutil.rmtree(ctx, ignore_errors=True)
        return run

    def close(self) -> None:
        subprocess.run([*self.base, "rm", "--all"], capture_output=True)
        subprocess.run([*self.base, "rmi", "--all", "--force"], capture_output=True)
        _rmtree(self.root)


def _rmtree(path: Path) -> None:
    """``rm -rf``, also through mode-000 overlay work directories."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


# -- the Dockerfiles ----------------------------------------------------------------------------------------------
def big_command(size_mb: int, prefix: str) -> str:
    half = size_mb // 2
    return (
        f"dd if=/dev/urandom of={prefix}/big bs=1M count={half} 2>/dev/null"
        f" && head -c {(size_mb - half) << 20} /dev/zero | tr '\\0' a > {prefix}/text"
    )


def big_dockerfile(size_mb: int) -> str:
    return f"FROM {BASE}\nRUN true\nRUN {big_command(size_mb, '')}\nRUN true\n"


def baseline_dockerfile(size_mb: int) -> str:
    return f"FROM {BASE}\nRUN true\nRUN --mount=type=tmpfs,target=/t {big_command(size_mb, '/t')}\n"


def steps_dockerfile(n: int, kind: str) -> str:
    body = [f"RUN echo {i} > /f{i}" if kind == "run" else f"ENV V{i}={i}" for i in range(1, n + 1)]
    return "\n".join([f"FROM {BASE}", *body]) + "\n"


# -- machine ------------------------------------------------------------------------------------------------------
def machine_info(where: Path) -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / (1 << 20)
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "memory_gib": round(mem_gb, 1),
        "python": platform.python_version(),
        "filesystem": _fs_type(where),
        "euid": os.geteuid(),
        "buildah": _version(["buildah", "--version"]),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds this process and its waited-for children used)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), attr) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for attr in ("ru_utime", "ru_stime"))  # fmt: skip
    return busy / os.sysconf("SC_CLK_TCK"), own


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def _version(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


# -- the benchmark ------------------------------------------------------------------------------------------------
def best_of(repeat: int, build: Any, dockerfile: str, **kw: str) -> BuildRun:
    """The run with the shortest span of ``repeat`` runs of ``build(dockerfile, **kw)`` (the first if all failed)."""
    runs = [build(dockerfile, **kw) for _ in range(repeat)]
    ok = [r for r in runs if not r.error]
    return min(ok, key=lambda r: r.span) if ok else runs[0]


def bench_big(b: Bench, bh: Buildah | None, args: argparse.Namespace, isolations: list[str]) -> list[dict[str, Any]]:
    data_mb = args.size_mb * (1 << 20) / 1e6
    rows: list[dict[str, Any]] = []
    for isolation in isolations:
        for backend in ("overlay", "native"):
            kw = {"backend": backend, "isolation": isolation}
            base = best_of(args.repeat, b.build, baseline_dockerfile(args.size_mb), **kw)
            compressions = ["gzip", "zstd", "uncompressed"] if isolation == isolations[0] else ["gzip"]
            for compression in compressions:
                run = best_of(args.repeat, b.build, big_dockerfile(args.size_mb), compression=compression, **kw)
                rows.append(_big_row("imgci", backend, isolation, compression, run, base, data_mb))
                print(_progress_line(rows[-1]), file=sys.stderr, flush=True)
    if bh is not None:
        base = best_of(args.repeat, bh.build, baseline_dockerfile(args.size_mb))
        run = best_of(args.repeat, bh.build, big_dockerfile(args.size_mb))
        rows.append(_big_row("buildah", "vfs", "chroot", "uncompressed", run, base, data_mb))
        print(_progress_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _big_row(
    tool: str, backend: str, isolation: str, compression: str, run: BuildRun, base: BuildRun, data_mb: float
) -> dict[str, Any]:
    row: dict[str, Any] = {"tool": tool, "backend": backend, "isolation": isolation, "compression": compression}
    row["error"] = run.error or base.error
    if row["error"] or len(run.steps) < 3 or len(base.steps) < 2:
        row["error"] = row["error"] or "missing step events"
        return row
    step, command = run.steps[1], base.steps[1]
    commit = step - command
    row.update(
        step_s=round(step, 3),
        command_s=round(command, 3),
        commit_s=round(commit, 3),
        commit_mb_s=round(data_mb / commit, 1) if commit > 0 else None,
        next_run_true_s=round(run.steps[2], 3),
        layer_mb=round(run.blob_mb, 1) if tool == "imgci" else None,
        wall_s=round(run.wall, 3),
    )
    return row


def bench_steps(b: Bench, args: argparse.Namespace, isolations: list[str]) -> list[dict[str, Any]]:
    n = args.steps
    rows: list[dict[str, Any]] = []
    for isolation in isolations:
        for backend in ("overlay", "native"):
            kw = {"backend": backend, "isolation": isolation}
            run = best_of(args.repeat, b.build, steps_dockerfile(n, "run"), **kw)
            trivial = best_of(args.repeat, b.build, f"FROM {BASE}\nRUN true\nRUN true\n", **kw)
            rows.append(_steps_row(f"{n} x RUN echo", backend, isolation, run, n, trivial))
            print(_progress_line(rows[-1]), file=sys.stderr, flush=True)
    run = best_of(args.repeat, b.build, steps_dockerfile(n, "env"), backend="overlay", isolation=isolations[0])
    rows.append(_steps_row(f"{n} x ENV", "-", "-", run, n, None))
    print(_progress_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _steps_row(
    what: str, backend: str, isolation: str, run: BuildRun, n: int, trivial: BuildRun | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"steps": what, "backend": backend, "isolation": isolation, "error": run.error}
    if run.error or len(run.steps) < n:
        row["error"] = run.error or "missing step events"
        return row
    later = run.steps[1:] if trivial is not None else run.steps  # the first RUN also pays the probe
    row.update(
        wall_s=round(run.wall, 3),
        wall_per_step_ms=round(run.wall / n * 1000, 1),
        span_per_step_ms=round(run.span / n * 1000, 1),
        median_step_ms=round(statistics.median(later) * 1000, 1),
        last_step_ms=round(run.steps[-1] * 1000, 1),
    )
    if trivial is not None and not trivial.error and len(trivial.steps) >= 2:
        row.update(probe_ms=round(trivial.probe * 1000, 1), run_true_ms=round(trivial.steps[1] * 1000, 1))
    return row


def _progress_line(row: dict[str, Any]) -> str:
    return "  " + ", ".join(f"{k}={v}" for k, v in row.items() if v not in ("", None))


# -- output -------------------------------------------------------------------------------------------------------
def _cell(row: dict[str, Any], key: str, fmt: str = "{}") -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def print_tables(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, state on {m['filesystem']}; other processes used {m['other_cpu_share']:.0%} of the CPUs"
    )
    if m["other_cpu_share"] > 0.1:
        print("warning: the machine was busy with other work; these numbers are not representative")
    if result.get("big"):
        size = result["args"]["size_mb"]
        print(f"\n### One RUN writing {size} MiB (half random, half one repeated byte)\n")
        print(
            "| builder | snapshotter | isolation | compression | step s | command s | commit s | commit MB/s"
            " | layer MB | next `RUN true` s |"
        )
        print("|---|---|---|---|--:|--:|--:|--:|--:|--:|")
        for r in result["big"]:
            head = f"| {r['tool']} | {r['backend']} | {r['isolation']} | {r['compression']} "
            if r.get("error"):
                print(head + f"| error: {r['error']} ||||||")
                continue
            print(
                head + f"| {r['step_s']:.2f} | {r['command_s']:.2f} | {r['commit_s']:.2f} | {_cell(r, 'commit_mb_s')}"
                f" | {_cell(r, 'layer_mb')} | {r['next_run_true_s']:.2f} |"
            )
    if result.get("steps"):
        print(f"\n### Per-step overhead ({result['args']['steps']} steps, cold: fresh state, base imported)\n")
        print("| steps | snapshotter | isolation | wall s | wall/step ms | median step ms | last step ms"
              " | probe ms | one `RUN true` ms |")  # fmt: skip
        print("|---|---|---|--:|--:|--:|--:|--:|--:|")
        for r in result["steps"]:
            head = f"| {r['steps']} | {r['backend']} | {r['isolation']} "
            if r.get("error"):
                print(head + f"| error: {r['error']} ||||||")
                continue
            print(
                head + f"| {r['wall_s']:.2f} | {r['wall_per_step_ms']:.0f} | {r['median_step_ms']:.0f}"
                f" | {r['last_step_ms']:.0f} | {_cell(r, 'probe_ms', '{:.0f}')} | {_cell(r, 'run_true_ms', '{:.0f}')} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=250, help="MiB the big RUN writes (default 250)")
    ap.add_argument("--steps", type=int, default=40, help="steps of the per-step builds (default 40)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement, best kept (default 1)")
    ap.add_argument("--only", choices=["big", "steps"], help="run one of the two parts")
    ap.add_argument("--isolation", action="append", choices=["userns", "chroot"], help="default: both (chroot as root)")
    ap.add_argument("--no-buildah", action="store_true", help="skip buildah even when installed")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--dir", type=Path, default=None, help="where to put state directories (default: $TMPDIR)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below when killed
    isolations = args.isolation or (["userns", "chroot"] if os.geteuid() == 0 else ["userns"])
    work = Path(tempfile.mkdtemp(prefix="imgci-runbench-", dir=args.dir))
    bh: Buildah | None = None
    try:
        base_tar = make_busybox_rootfs_tar(work / "busybox.tar")
        result: dict[str, Any] = {
            "machine": machine_info(work),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": " ".join(["python", "bench/run_layer.py", *sys.argv[1:]]),
        }
        b = Bench(work, base_tar)
        t0 = time.perf_counter()
        busy0, own0 = cpu_seconds()
        if args.only in (None, "big"):
            if not args.no_buildah and shutil.which("buildah") and os.geteuid() == 0:
                try:
                    bh = Buildah(work, base_tar)
                except subprocess.CalledProcessError as e:
                    print(f"buildah skipped: {e}", file=sys.stderr)
            result["big"] = bench_big(b, bh, args, isolations)
        if args.only in (None, "steps"):
            result["steps"] = bench_steps(b, args, isolations)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        busy1, own1 = cpu_seconds()
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        result["machine"]["other_cpu_share"] = round(other / (result["total_s"] * (os.cpu_count() or 1)), 3)
        print_tables(result)
        print(f"\n(total {result['total_s']} s)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if bh is not None:
            bh.close()
        _rmtree(work)


if __name__ == "__main__":
    main()
