"""What the overlay differ costs for a RUN that changed 2,000 files on a 60,000-file root file system.

    .venv/bin/python bench/diff_upper.py [--lower-files 60000] [--changed 2000] [--repeat 5]

Builds a lower directory of ``--lower-files`` small files (directories of 100) and an overlay upper directory
holding ``--changed`` rewritten files spread over a tenth of those directories (what copy-up leaves after a RUN),
then times :func:`imgci.build.sandbox.diff.diff_upper` — the step that turns the upper directory into the layer's
entries, comparing each upper entry with the lower one it hides. The cost follows the upper directory (the files
the step changed), not the size of the root file system. Reports the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgci.build.sandbox.diff import diff_upper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lower-files", type=int, default=60_000)
    ap.add_argument("--changed", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dirs = max(1, args.lower_files // 100)
    per_changed_dir = 10
    with tempfile.TemporaryDirectory(prefix="imgci-bench-diff-") as tmp:
        lower, upper = Path(tmp) / "lower", Path(tmp) / "upper"
        for d in range(dirs):
            dd = lower / f"d{d:04d}"
            dd.mkdir(parents=True)
            for i in range(100):
                (dd / f"f{i:03d}").write_bytes(b"x" * 64)
        changed_dirs = random.Random(7).sample(range(dirs), min(dirs, max(1, args.changed // per_changed_dir)))
        for d in changed_dirs:
            ud = upper / f"d{d:04d}"
            ud.mkdir(parents=True)
            for i in range(per_changed_dir):
                (ud / f"f{i:03d}").write_bytes(b"changed " * 8)
        times = []
        entries = 0
        for _ in range(args.repeat):
            started = time.perf_counter()
            entries = len(diff_upper(upper, [lower], "trusted"))
            times.append(time.perf_counter() - started)
    median = sorted(times)[len(times) // 2]
    print(
        f"diff_upper: {entries} entries from {len(changed_dirs) * per_changed_dir} changed files over "
        f"{dirs * 100} lower files: median {median * 1000:.1f} ms, best {min(times) * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
