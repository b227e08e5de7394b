"""``python -m imgci._unpack TMP auto|yes|no``: unpack the uncompressed layer tar on stdin into ``TMP/root`` with
:func:`imgci.layerfs.extract_layer_dir` (the last argument: unprivileged?), in a process of its own, and write its
index to ``TMP/index.json`` (:meth:`imgci.build.layerindex.LayerIndex.save`).

The build process uses it for large layers it writes itself (a ``COPY`` of thousands of files): writing the tar
(reading the sources, tar headers, compression, digests) and unpacking it are both per-file Python work, and in one
process they take turns on one interpreter lock; here they run on two CPUs. See
:meth:`imgci.build.layerstore.LayerStore._unpack_while`.

Exit status 0 when done; for an error imgci reports, its :meth:`imgci.errors.ImgciError.report` as JSON on stdout
and exit status 3. Anything else is a crash, reported by the
caller with the end of stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ERROR_STATUS = 3


def main(argv: list[str]) -> int:
    from imgci.build.layerindex import LayerIndexBuilder
    from imgci.errors import ImgciError
    from imgci.layerfs import extract_layer_dir

    tmp, mode = Path(argv[0]), argv[1]
    unprivileged = {"auto": None, "yes": True, "no": False}[mode]
    builder = LayerIndexBuilder()
    try:
        extract_layer_dir(sys.stdin.buffer, tmp / "root", builder.record, unprivileged=unprivileged)
        builder.finish().save(tmp / "index.json")
    except ImgciError as e:
        sys.stdout.buffer.write(json.dumps(e.report()).encode())
        return ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
