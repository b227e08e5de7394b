"""Micro-benchmark: imgci's LayerWriter against Python's tarfile, both into the content store through ISA-L gzip.

Cases: (a) one 200 MB file, (b) 4,000 small files (1-16 KiB). File data is text-like (ISA-L level 1 compresses
it about 2:1) unless ``--random`` (incompressible). Throughput is uncompressed file bytes per second of the whole
pipeline (read, tar, sha256 diff_id, compress, sha256 digest, write + fsync into the store), best of ``--repeat``
runs with a warm page cache. Usage::

    .venv/bin/python bench/layer_write.py [--size-mb 200] [--files 4000] [--repeat 3] [--random] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgci.build.fs import FileInfo, LayerEntry
from imgci.build.layer import write_layer
from imgci.compression import CompressingWriter
from imgci.store import Store


def text_block(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789_", k=rng.randint(2, 10))) for _ in range(8000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=4096)) + b"\n"
    return bytes(out[:size])


def make_tree(root: Path, size_mb: int, files: int, incompressible: bool) -> tuple[list[Path], list[Path]]:
    block = os.urandom(4 << 20) if incompressible else text_block(4 << 20, 1)
    big = root / "big" / "blob.bin"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        for i in range(size_mb // 4):
            f.write(block[i % 7 :] + block[: i % 7])  # rotate so repeats are not byte-identical 4 MiB blocks
    rng = random.Random(2)
    small: list[Path] = []
    for i in range(files):
        d = root / "small" / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{i:05d}.txt"
        n = rng.randint(1024, 16 * 1024)
        off = rng.randint(0, len(block) - n)
        p.write_bytes(block[off : off + n])
        small.append(p)
    return [big], small


def entries_for(root: Path, paths: list[Path]) -> list[LayerEntry]:
    out: list[LayerEntry] = []
    dirs = sorted({p.parent for p in paths})
    for d in dirs:
        st = d.stat()
        out.append(LayerEntry(FileInfo(str(d.relative_to(root)), "dir", 0o755, mtime=st.st_mtime)))
    for p in paths:
        st = p.stat()
        info = FileInfo(str(p.relative_to(root)), "file", 0o644, size=st.st_size, mtime=st.st_mtime)
        out.append(LayerEntry(info, host_path=p))
    return out


def run_imgci(store: Store, root: Path, paths: list[Path], compression: str, threaded: bool) -> None:
    write_layer(store, entries_for(root, paths), compression=compression, source_date_epoch=0, threaded=threaded)


def run_tarfile(store: Store, root: Path, paths: list[Path]) -> None:
    with store.blob_writer() as blob:
        compressing = CompressingWriter(blob, "gzip")
        with tarfile.open(fileobj=compressing, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for d in sorted({p.parent for p in paths}):
                tar.add(d, arcname=str(d.relative_to(root)), recursive=False)
            for p in paths:
                tar.add(p, arcname=str(p.relative_to(root)))
        compressing.finish()
        blob.commit()


def best(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--random", action="store_true", help="incompressible data")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the test tree and store (default: $TMPDIR)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="imgci-bench-", dir=args.dir))
    try:
        root = base / "tree"
        big, small = make_tree(root, args.size_mb, args.files, args.random)
        store = Store(base / "state")
        cases = [(f"(a) 1 file, {args.size_mb} MB", big), (f"(b) {args.files} small files", small)]
        runners: list[tuple[str, Callable[[list[Path]], None]]] = [
            ("imgci gzip", lambda ps: run_imgci(store, root, ps, "gzip", True)),
            ("imgci gzip 1-thread", lambda ps: run_imgci(store, root, ps, "gzip", False)),
            ("imgci zstd", lambda ps: run_imgci(store, root, ps, "zstd", True)),
            ("imgci none", lambda ps: run_imgci(store, root, ps, "none", True)),
            ("tarfile gzip", lambda ps: run_tarfile(store, root, ps)),
        ]
        print(f"data: {'random' if args.random else 'text-like'}; cpus: {os.cpu_count()}; dir: {base}")
        header = f"{'case':<26}" + "".join(f"{name:>21}" for name, _ in runners)
        print(header)
        print("-" * len(header))
        for label, paths in cases:
            total = sum(p.stat().st_size for p in paths)
            for p in paths:
                p.read_bytes()  # warm the page cache
            cells = []
            for _, fn in runners:
                seconds = best(lambda fn=fn, paths=paths: fn(paths), args.repeat)  # type: ignore[misc]
                cells.append(f"{total / seconds / 1e6:>14.0f} MB/s")
            print(f"{label:<26}" + "".join(f"{c:>21}" for c in cells))
            store.gc()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
