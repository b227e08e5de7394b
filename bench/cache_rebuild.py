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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import (
    ROOT,
    Buildah,
    Builder,
    BuildKit,
    CpuMeter,
    Imgci,
    Run,
    Workload,
    files_workload,
    machine_info,
    machine_line,
    peers_available,
    private_dockerd,
    rm_tree,
    stages_workload,
    startup_seconds,
    steps_workload,
)
from tests.infra.rootfs import make_busybox_rootfs_tar

TAG = "localhost/bench:latest"
SCENARIOS = ("cold", "warm", "one file changed")


WORKLOADS = {w.key: w for w in (stages_workload(), files_workload(), steps_workload())}


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
            with meter.window(builder.daemons):
                run = builder.build(ctx, TAG)
            cells[scenario].runs.append(run)
            counts = f" ({run.executed} run, {run.cached} cached)" if run.cached is not None else ""
            shown = f"{run.wall:.2f}s{counts}"
            print(f"  {workload.name} · {builder.name} · {scenario}: {run.error or shown}", file=sys.stderr, flush=True)
        rm_tree(ctx)
    return cells


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
        imgci.build(ctx, TAG)
    cmd = [sys.executable, "-c", PROFILE_BOOTSTRAP, str(out.resolve()), "build", "-t", TAG, str(ctx)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=imgci.env(), cwd=ROOT, check=True, capture_output=True)
    print(f"\nprofile of a warm 40-step rebuild ({time.perf_counter() - t0:.2f}s under cProfile) written to {out}")
    rm_tree(ctx)


# -- output -------------------------------------------------------------------------------------------------------
def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(machine_line(m))
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
    available = peers_available()
    if peers and available["BuildKit"]:
        try:
            builders.append(BuildKit(stack.enter_context(private_dockerd(work)), base_tar))
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"BuildKit skipped: {e}", file=sys.stderr)
    if peers and available["buildah"]:
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
        stack.callback(rm_tree, work)  # last: the callbacks run in reverse
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
