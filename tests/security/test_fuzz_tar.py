"""Property: a random, possibly hostile or corrupt, layer never changes anything outside the root it is applied to.

Archives are small and drawn from the names that matter: ``..``, ``.``, empty and absolute components, long names,
whiteout and opaque markers, symlinks and hardlinks to ``..``-paths and to the sandbox's own absolute paths (so an
absolute escape would hit a canary, never the host), files, directories, fifos, devices, random modes and owners,
PAX path overrides; then sometimes truncated or with a flipped byte. Each example applies one or two layers with
``apply_layer`` (privileged or not) into a fresh sandbox (see ``test_tar_breakouts.Sandbox``) and checks that the
sandbox minus the root is unchanged, that ``/`` gained no entry, and that any exception is an ImgciError. The other
appliers (overlay snapshot, layer store, native materialise) get the same property with fewer examples.

Budget: 150 examples for ``apply_layer``, 60 for the others; no example database (nothing written to the checkout).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgci.errors import ImgciError
from imgci.layerfs import apply_layer
from tests.infra import rootfs as tb
from tests.security.test_tar_breakouts import ROOT, Sandbox, run_applier

COMPONENTS = ["a", "l", "x", ".", "..", "", "secret.txt", "canary.txt", ".wh.a", ".wh..wh..opq", ".wh..", ".wh..."]
SHORT_NAMES = ["a", "l", "x", "a/x", "l/x", "l/secret.txt", "l/.wh.secret.txt", "l/.wh..wh..opq", "a/l", "a/l/x"]
LINK_TARGETS = [
    "a",
    "l",
    "a/l",
    ".",
    "..",
    "../..",
    "../canary.txt",
    "../outside",
    "../outside/secret.txt",
    "a/../..",
    "/",
    "/a",
    "@OUT@",
    "@OUT@/secret.txt",
    "@CANARY@",
    "@OUT@/../..",
]
REG, DIR, SYM, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
KINDS = [REG, REG, REG, SYM, SYM, SYM, LNK, LNK, DIR, DIR, tarfile.FIFOTYPE, tarfile.CHRTYPE]  # weighted

component = st.one_of(st.sampled_from(COMPONENTS), st.sampled_from(COMPONENTS), st.just("n" * 120))
long_name = st.builds(
    lambda lead, parts, trail: lead + "/".join(parts) + trail,
    st.sampled_from(["", "", "/", "./"]),
    st.lists(component, min_size=1, max_size=4),
    st.sampled_from(["", "", "/"]),
)
short = st.sampled_from(SHORT_NAMES)
name = st.one_of(short, short, short, short, long_name)  # mostly short names (they collide); '..' ends a layer
linkname = st.one_of(st.sampled_from(LINK_TARGETS), st.sampled_from(LINK_TARGETS), name)


PAX_KEYS = ["mtime", "uid", "gid", "size", "linkpath", "SCHILY.xattr.user.k", "SCHILY.xattr.user.\0", "GNU.sparse.x"]
PAX_VALUES = ["0", "1.5", "-1", "1e300", "nan", "1_0", " 7", "9" * 25, "", "../outside", "@OUT@", "a\0b"]
SUFFIXES = ["", "", "", "", "/x", "/secret.txt", "/.wh.secret.txt", "/.wh..wh..opq", "/..", "/."]


@st.composite
def entry(draw: st.DrawFn, pool: list[str]) -> tb.TarEntry:
    """One entry; names mostly come from ``pool`` (shared by the example's layers) so that entries collide."""
    in_pool = st.builds(lambda p, s: p + s, st.sampled_from(pool), st.sampled_from(SUFFIXES))
    kind = draw(st.sampled_from(KINDS))
    data = draw(st.binary(max_size=64)) if kind == REG else b""
    pax: dict[str, str] = {}
    if draw(st.integers(0, 9)) == 0:
        pax["path"] = draw(name)
    if draw(st.integers(0, 4)) == 0:
        key, value = draw(st.sampled_from(PAX_KEYS)), draw(st.sampled_from(PAX_VALUES))
        pax[key] = value
    return tb.TarEntry(
        name=draw(st.one_of(in_pool, in_pool, in_pool, name)),
        type=kind,
        data=data,
        mode=draw(st.integers(0, 0o7777)),
        linkname=draw(st.one_of(linkname, linkname, in_pool)) if kind in (SYM, LNK) else "",
        size=draw(st.sampled_from([None, None, None, 0, 1 << 33])),
        uid=draw(st.sampled_from([0, 0, 1000, 65534])),
        gid=draw(st.sampled_from([0, 0, 1000, 65534])),
        devmajor=1 if kind == tarfile.CHRTYPE else 0,
        devminor=3 if kind == tarfile.CHRTYPE else 0,
        pax_headers=pax,
    )


ESCAPES = ["../canary.txt", "../outside", "../outside/secret.txt", "@OUT@", "@OUT@/secret.txt", "@CANARY@", "/", ".."]


@st.composite
def attack(draw: st.DrawFn, pool: list[str]) -> list[tb.TarEntry]:
    """A link pointing out (or a hardlink to one), then entries at that name or below it: the known breakouts."""
    where = draw(st.sampled_from(pool))
    entries = [tb.symlink(where, draw(st.sampled_from(ESCAPES)))]
    if draw(st.booleans()):
        alias = draw(st.sampled_from(pool))
        entries.append(tb.hardlink(alias, where, mode=0o777))  # a hardlink to the symlink (CVE-2021-32760)
        where = alias
    for _ in range(draw(st.integers(1, 3))):
        e = draw(entry([where]))
        entries.append(tb.TarEntry(**{**e.__dict__, "name": where + draw(st.sampled_from(SUFFIXES))}))
    return entries


Mutation = tuple[str, int, int] | None  # (truncate|flip, offset, xor value) applied to the archive bytes
Layers = list[tuple[list[tb.TarEntry], Mutation]]


@st.composite
def layers(draw: st.DrawFn) -> Layers:
    """One or two layers of random entries and attacks sharing a pool of two or three names; a third of the layers
    are then mutated."""
    pool = draw(st.lists(st.one_of(st.sampled_from(["a", "l", "x"]), name), min_size=2, max_size=3, unique=True))
    out: Layers = []
    for _ in range(draw(st.integers(1, 2))):
        chunks = draw(st.lists(st.one_of(entry(pool).map(lambda e: [e]), attack(pool)), min_size=1, max_size=6))
        entries = [e for chunk in chunks for e in chunk]
        mutation = draw(
            st.one_of(
                st.none(),
                st.none(),
                st.tuples(st.sampled_from(["truncate", "flip"]), st.integers(0, 1 << 14), st.integers(1, 255)),
            )
        )
        out.append((entries, mutation))
    return out


def _bytes(entries: list[tb.TarEntry], mutation: Mutation, box: Sandbox) -> bytes:
    subst = [
        tb.TarEntry(**{**e.__dict__, "name": box.subst(e.name), "linkname": box.subst(e.linkname)}) for e in entries
    ]
    data = bytearray(tb.build_tar(subst))
    if mutation is not None:
        how, offset, value = mutation
        offset %= len(data)
        if how == "truncate":
            del data[offset:]
        else:
            data[offset] ^= value
    return bytes(data)


def _remove(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(path)


def _check(layers: Layers, apply: object) -> None:
    base = Path(tempfile.mkdtemp(prefix="imgci-fuzz-tar-"))
    try:
        box = Sandbox.make(base / "box")
        (base / "work").mkdir()
        raws = [_bytes(entries, mutation, box) for entries, mutation in layers]
        before, host_root = box.snapshot(), sorted(os.listdir("/"))
        try:
            apply(raws, box, base / "work")  # type: ignore[operator]
        except ImgciError:
            pass  # a clear error is fine; anything else fails the property
        assert box.snapshot() == before
        assert sorted(os.listdir("/")) == host_root
        assert box.target.is_dir() and not box.target.is_symlink()
    finally:
        _remove(base)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=layers(), unprivileged=st.booleans())
def test_apply_layer_never_writes_outside_the_root(layers: Layers, unprivileged: bool) -> None:
    def apply(raws: list[bytes], box: Sandbox, work: Path) -> None:
        for raw in raws:
            apply_layer(io.BytesIO(raw), box.target, unprivileged=unprivileged)

    _check(layers, apply)


OTHERS = ["unpack_image", "materialise", "layer_store", *(["overlay_snapshot"] if ROOT else [])]


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=layers(), kind=st.sampled_from(OTHERS))
def test_other_appliers_never_write_outside_the_root(layers: Layers, kind: str) -> None:
    def apply(raws: list[bytes], box: Sandbox, work: Path) -> None:
        run_applier(kind, raws, box, work)

    _check(layers, apply)


# -- the header parser against tarfile's ----------------------------------------------------------------------
FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "type", "linkname", "uname", "gname", "devmajor", "devminor")
# (offset, length) of every header field, to corrupt one at a time
SPANS = [(0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (156, 1), (157, 100), (257, 8)]
SPANS += [(265, 32), (297, 32), (329, 8), (337, 8), (345, 155)]
NUMBER_SPANS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]
FIELD_BYTES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"", b" ", b"\x00", b"0", b"7" * 11, b"8", b"1_0", b"+7", b"-1", b" 12 \x00", b"\x80\x01"]),
    st.sampled_from([b"\xff" * 8, b"\x80" + b"\x00" * 6 + b"\x05", b"\xff\xff", b"\xe9\x00", b"a/", b"../x/"]),
)


def _header_block(info: tarfile.TarInfo, fmt: int) -> bytes:
    return info.tobuf(fmt, "utf-8", "surrogateescape")[-512:]  # the entry's own header (after any extension)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(["a", "dir/", "x" * 99, "p/" * 60 + "leaf", "q/" * 60 + "leaf/", "é/ü", "a\udcff"]),
    kind=st.sampled_from(
        [REG, tarfile.AREGTYPE, DIR, SYM, LNK, tarfile.CHRTYPE, tarfile.FIFOTYPE, b"x", b"L", b"K", b"S", b"V"]
    ),
    numbers=st.tuples(*[st.integers(0, 0o7777777)] * 3, st.integers(0, 2**33), st.integers(-(2**40), 2**40)),
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT]),
    corrupt=st.lists(st.tuples(st.sampled_from(SPANS + NUMBER_SPANS * 2), FIELD_BYTES), max_size=3),
    fix_checksum=st.sampled_from([True, True, True, False]),
)
@example(name="dir/", kind=tarfile.AREGTYPE, numbers=(0o755, 0, 0, 0, 0), fmt=0, corrupt=[], fix_checksum=False)
@example(name="p/" * 60 + "leaf", kind=b"L", numbers=(0, 0, 0, 9, 0), fmt=0, corrupt=[], fix_checksum=False)
@example(name="a", kind=REG, numbers=(0, 0, 0, 0, -5), fmt=1, corrupt=[((100, 8), b" 644 ")], fix_checksum=True)
def test_the_header_parser_reads_what_tarfile_reads(
    name: str,
    kind: bytes,
    numbers: tuple[int, int, int, int, int],
    fmt: int,
    corrupt: list[tuple[tuple[int, int], bytes]],
    fix_checksum: bool,
) -> None:
    """``tarstream.parse_header`` is a fast copy of ``tarfile.TarInfo.frombuf``: on valid and corrupted headers it
    gives the same fields, or the same error, as tarfile (which the reader used before)."""
    from imgci.tarstream import parse_header

    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.size, info.mtime = numbers
    info.linkname = "target" if kind in (SYM, LNK) else ""
    info.uname, info.gname, info.devmajor, info.devminor = "user", "group", 3, 7
    try:
        block = bytearray(_header_block(info, fmt))
    except ValueError:
        return  # tarfile cannot write it in this format: nothing to compare
    for (offset, length), data in corrupt:
        block[offset : offset + length] = data[:length].ljust(length, b"\x00")
    if fix_checksum:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\x00 " % (sum(block) & 0o777777)
    if block.count(0) == 512:
        return  # the end-of-archive block: the reader never parses it
    try:
        expected = tarfile.TarInfo.frombuf(bytes(block), "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        try:
            parse_header(bytes(block))
        except tarfile.HeaderError as mine:
            assert str(mine) == str(e)
            return
        raise AssertionError(f"tarfile refused the header ({e}), parse_header accepted it") from None
    got = parse_header(bytes(block))
    assert {f: getattr(got, f) for f in FIELDS} == {f: getattr(expected, f) for f in FIELDS}
