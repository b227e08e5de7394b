"""A 4-entry build.yaml matrix sharing a slow base stage, against one entry alone.

    .venv/bin/python bench/matrix.py [--entries 4] [--base-seconds 3] [--repeat 1] [--json out.json]

Each measurement is the real CLI (``python -m imgci --progress json run build.yaml --no-push``) in a fresh state
directory with a busybox base imported by ``imgci import``; nothing is pushed and no registry is needed. The base
stage is ``RUN dd … && sleep N`` (a stand-in for apt-get or a toolchain); each entry adds its own small RUN and COPY.
Reported: wall seconds for one entry (``--only app-0``) and for all entries, their ratio (ideal: close to 1, and
well under the entry count), and how many times the base RUN ran in the full run (from the progress events: 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.infra.rootfs import make_busybox_rootfs_tar  # noqa: E402

DOCKERFILE = """\
FROM localhost/busybox:latest AS base
RUN dd if=/dev/urandom of=/base.bin bs=1M count=20 2>/dev/null && sleep {base_seconds}

FROM base AS app
ARG N
COPY app.txt /app.txt
RUN echo "entry $N" > /entry.txt
"""

BUILD_YAML = """\
version: 1
defaults:
  push: false
targets:
  app:
    target: app
    args: {{N: "${{{{ matrix.n }}}}"}}
    tags: ["localhost/bench/app:${{{{ matrix.n }}}}"]
    matrix:
      n: {entries}
"""


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGCI_")}
    env.update(IMGCI_STATE=str(state), PYTHONPATH=str(REPO), CI="true")
    return subprocess.run(
        [sys.executable, "-m", "imgci", *args], env=env, capture_output=True, text=True, check=True, cwd=state.parent
    )


def _measure(work: Path, base_tar: Path, project: Path, only: list[str]) -> tuple[float, int]:
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    _cli(state, "import", str(base_tar), "localhost/busybox:latest")
    args = ["--progress", "json", "run", str(project / "build.yaml"), "--no-push", "--report", "none"]
    args += ["--metadata-file", str(work / "meta.json")]
    for o in only:
        args += ["--only", o]
    started = time.monotonic()
    proc = _cli(state, *args)
    wall = time.monotonic() - started
    base_runs = 0
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "started" and "dd if=/dev/urandom" in event.get("name", ""):
                base_runs += 1
    return wall, base_runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=4)
    ap.add_argument("--base-seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=1, help="keep the best of N runs of each measurement")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgci-bench-matrix-") as tmp:
        work = Path(tmp)
        base_tar = make_busybox_rootfs_tar(work / "busybox.tar")
        project = work / "project"
        project.mkdir()
        (project / "Dockerfile").write_text(DOCKERFILE.format(base_seconds=args.base_seconds))
        (project / "app.txt").write_text("app\n")
        (project / "build.yaml").write_text(
            BUILD_YAML.format(entries=json.dumps([str(i) for i in range(args.entries)]))
        )
        one = min((_measure(work, base_tar, project, ["app-0"]) for _ in range(args.repeat)), key=lambda r: r[0])
        full = min((_measure(work, base_tar, project, []) for _ in range(args.repeat)), key=lambda r: r[0])
    ratio = full[0] / one[0]
    rows = [
        ("one entry (--only app-0)", f"{one[0]:.2f}", str(one[1])),
        (f"all {args.entries} entries", f"{full[0]:.2f}", str(full[1])),
    ]
    print(f"{'run':<28}{'wall s':>8}{'base RUN ran':>14}")
    for name, wall, runs in rows:
        print(f"{name:<28}{wall:>8}{runs:>14}")
    print(
        f"\n{args.entries} entries take {ratio:.2f}x one entry's time (sequential builds would take ~{args.entries}x)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "entries": args.entries,
                    "base_seconds": args.base_seconds,
                    "one_entry_s": round(one[0], 3),
                    "all_entries_s": round(full[0], 3),
                    "ratio": round(ratio, 3),
                    "base_runs": full[1],
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
