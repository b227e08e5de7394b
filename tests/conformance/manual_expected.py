"""Write the hand-made expectations: cases no reference builder here can build.

Docker 20.10's built-in dockerfile frontend predates here-documents, COPY --link (dockerfile 1.4), --parents,
--exclude (1.7-labs) and symbolic --chmod (1.14), and the newer frontends are images on Docker Hub, which is
unreachable. So these expectations are written from BuildKit's documentation and source (each case.json's
``manual`` field says where), layer by layer, below, and this script turns them into ``expected/<case>.json``
through the same code that normalises real images (:func:`harness.result_from_layers`).

Conventions (from what BuildKit does where it can be observed, see README.md):
* files copied from the context keep the context mtime; directories the copy creates get the build time;
* the parent directories of the destination are layer entries too (``restates`` when they already existed);
* history: ``COPY [--parents] [--chown=X] [--chmod=Y] <sources> [<<HEREDOC...] <dest> # buildkit`` (dockerfile
  >= 1.7 writes those flags; --link, --exclude and --from never appear).

Run: ``python tests/conformance/manual_expected.py`` (no builder needed).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conformance.harness import (
    BASE_PATH_ENV,
    BUILD_TIME,
    CONTEXT_MTIME,
    EXPECTED_DIR,
    dumps,
    load_case,
    make_base_rootfs,
    result_from_layers,
    rootfs_listing,
)

BASE_CONFIG = {"Env": [BASE_PATH_ENV], "Cmd": ["sh"]}
T = BUILD_TIME
C = CONTEXT_MTIME


def d(path: str, mode: str = "0755", uid: int = 0, gid: int = 0, mtime: Any = T) -> dict[str, Any]:
    return {"path": path, "type": "dir", "mode": mode, "uid": uid, "gid": gid, "mtime": mtime}


def f(path: str, data: bytes, mode: str = "0644", uid: int = 0, gid: int = 0, mtime: Any = C) -> dict[str, Any]:
    return {
        "path": path,
        "type": "file",
        "mode": mode,
        "uid": uid,
        "gid": gid,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "mtime": mtime,
    }


def h(created_by: str, layer: bool = True) -> dict[str, Any]:
    return {
        "created_by": created_by + (" # buildkit" if layer else ""),
        "empty_layer": not layer,
        "comment": "buildkit.dockerfile.v0",
    }


A, B = b"alpha\n", b"bravo bravo\n"

CASES: dict[str, dict[str, Any]] = {
    "manual_copy_heredoc": {
        "history": [
            h("ARG NAME=world", layer=False),
            h("COPY <<EOF /hd/greeting.txt"),
            h("COPY <<one.txt <<two.txt /hd/multi/"),
            h("COPY <<EOF /hd/literal.txt"),
        ],
        "layers": [
            # llb.Mkfile(name, 0644, data) in a scratch state, then copied: mtime = when the file was made
            [d("hd"), f("hd/greeting.txt", b"hello world\n", mtime=T)],
            [
                d("hd"),
                d("hd/multi"),
                f("hd/multi/one.txt", b"first\n", mtime=T),
                f("hd/multi/two.txt", b"second\n", mtime=T),
            ],
            [d("hd"), f("hd/literal.txt", b"keep $NAME\n", mtime=T)],
        ],
    },
    "manual_copy_link": {
        "history": [
            h("COPY a.txt /linked/"),
            h("COPY --chown=1000:1000 b.txt /owned-link/b.txt"),
            h("COPY a.txt /etc/linked.txt"),
        ],
        "layers": [
            [d("linked"), f("linked/a.txt", A)],
            [d("owned-link", uid=1000, gid=1000), f("owned-link/b.txt", B, uid=1000, gid=1000)],
            # the link layer is made on scratch: /etc is created in it (0755 root, as in the base)
            [d("etc"), f("etc/linked.txt", A)],
        ],
    },
    "manual_copy_parents": {
        "history": [
            h("COPY --parents src/*/pkg.json /app/"),
            h("COPY --parents ./lib/./a/b.txt /keep/"),
        ],
        "layers": [
            [
                d("app"),
                d("app/src"),
                d("app/src/one"),
                f("app/src/one/pkg.json", b'{"n": 1}\n'),
                d("app/src/two"),
                f("app/src/two/pkg.json", b'{"n": 2}\n'),
            ],
            [d("keep"), d("keep/a"), f("keep/a/b.txt", b"b\n")],
        ],
    },
    "manual_copy_exclude": {
        "history": [
            h("COPY src /dst/"),
            h("ADD docs /docs/"),
        ],
        "layers": [
            # --exclude=*.log matches a.log only (relative to the source, no ** so not sub/b.log);
            # tmp/ is excluded whole
            [
                d("dst"),
                f("dst/a.txt", b"a\n"),
                d("dst/sub"),
                f("dst/sub/b.log", b"b log\n"),
                f("dst/sub/c.txt", b"c\n"),
            ],
            # **/*.md matches at any depth, the top level included
            [d("docs"), f("docs/guide.txt", b"guide\n"), d("docs/sub"), f("docs/sub/y.txt", b"y\n")],
        ],
    },
    "manual_copy_chmod_symbolic": {
        "history": [
            h("COPY --chmod=u+x,go-w a.txt /m/sym1"),
            h("COPY --chmod=a=r b.txt /m/sym2"),
            h("COPY --chmod=go= dir /m/dir/"),
        ],
        "layers": [
            [d("m"), f("m/sym1", A, mode="0744")],
            [d("m"), f("m/sym2", B, mode="0444")],
            # applied to every copied entry (files 0644 -> 0600, the subdirectory 0755 -> 0700), not to the
            # destination directory the copy creates
            [
                d("m"),
                d("m/dir"),
                f("m/dir/f", b"f\n", mode="0600"),
                d("m/dir/sub", mode="0700"),
                f("m/dir/sub/g", b"g\n", mode="0600"),
            ],
        ],
    },
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        base = rootfs_listing(make_base_rootfs(Path(tmp) / "base.tar"))
    for name, spec in CASES.items():
        case = load_case(name)
        result = result_from_layers(base, spec["layers"], spec.get("config", BASE_CONFIG), spec["history"])
        doc = {
            "case": name,
            "description": case.spec.get("description", ""),
            "reference": f"manual ({case.manual})",
            "reference_versions": {},
            "build": {"build_args": case.build_args, "target": case.target, "base": case.base, "needs": case.needs},
            **result,
        }
        (EXPECTED_DIR / f"{name}.json").write_text(dumps(doc) + "\n")
        print(f"{name}: written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
