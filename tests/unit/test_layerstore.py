"""Layer store (unpack once, atomically, concurrently; metadata from the tar) and UnionView semantics.

The union semantics table is also a contract test: every case is applied with imgci.layerfs.apply_layer (docker's
semantics on a real directory) and the view must show the same tree.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgci.build import layerstore
from imgci.build.fs import FileInfo, LayerEntry, walk
from imgci.build.layer import LayerResult, write_layer
from imgci.build.layerindex import LayerIndex
from imgci.build.layerstore import LayerStore, UnionView, lookup_group, lookup_user
from imgci.compression import open_decompressed
from imgci.errors import BuildError, DigestMismatchError, StoreError
from imgci.layerfs import apply_layer
from imgci.oci import Digest
from imgci.store import Store
from tests.infra import rootfs as tb

REPO = Path(__file__).resolve().parents[2]


def f(path: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> LayerEntry:
    return LayerEntry(FileInfo(path, "file", mode, size=len(data), **kw), data=data)  # type: ignore[arg-type]


def d(path: str, mode: int = 0o755, **kw: object) -> LayerEntry:
    return LayerEntry(FileInfo(path, "dir", mode, **kw))  # type: ignore[arg-type]


def sym(path: str, target: str) -> LayerEntry:
    return LayerEntry(FileInfo(path, "symlink", 0o777, linkname=target))


def hl(path: str, target: str) -> LayerEntry:
    return LayerEntry(FileInfo(path, "hardlink", 0o644, linkname=target))


def wh(path: str) -> LayerEntry:
    return LayerEntry(FileInfo(path, "file", 0), whiteout=True)


def opq(path: str, mode: int = 0o755) -> LayerEntry:
    return LayerEntry(FileInfo(path, "dir", mode), opaque=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


@pytest.fixture
def layers(store: Store) -> Iterator[LayerStore]:
    with LayerStore(store) as ls:
        yield ls


def unpacked(ls: LayerStore, *stack: list[LayerEntry]) -> list[Digest]:
    out = []
    for entries in stack:
        r = write_layer(ls.store, entries)
        ls.ensure_unpacked(r.descriptor, r.diff_id)
        out.append(r.diff_id)
    return out


def view_of(ls: LayerStore, *stack: list[LayerEntry]) -> UnionView:
    return ls.view(unpacked(ls, *stack), "test image")


def listing(view: UnionView) -> dict[str, str]:
    out = {}
    for info in walk(view):
        if info.type == "file":
            with view.open(info.path) as fh:
                body = fh.read().decode()
            out[info.path] = f"f{info.mode:o}:{body}"
        elif info.type == "symlink":
            out[info.path] = f"l:{info.linkname}"
        else:
            out[info.path] = f"d{info.mode:o}:{info.uid}"
    return out


def disk_listing(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"l:{os.readlink(p)}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"d{stat.S_IMODE(st.st_mode):o}:{st.st_uid}"
            else:
                out[rel] = f"f{stat.S_IMODE(st.st_mode):o}:{p.read_text()}"
    return out


# -- UnionView semantics --------------------------------------------------------------------------------------------
CASES: dict[str, tuple[list[list[LayerEntry]], dict[str, str]]] = {
    "whiteout hides a lower file": (
        [[d("a"), f("a/x", b"1"), f("a/y", b"2")], [wh("a/x")]],
        {"a": "d755:0", "a/y": "f644:2"},
    ),
    "whiteout hides a lower directory tree": (
        [[d("a"), d("a/b"), f("a/b/c")], [wh("a/b")]],
        {"a": "d755:0"},
    ),
    "opaque directory hides lower contents only": (
        [[d("a"), f("a/lower"), d("a/sub"), f("a/sub/deep")], [opq("a", 0o750), f("a/upper", b"u")]],
        {"a": "d750:0", "a/upper": "f644:u"},
    ),
    "directory over directory merges, upper metadata wins": (
        [[d("a", 0o700), f("a/x", b"x")], [d("a", 0o755, uid=5), f("a/y", b"y")]],
        {"a": "d755:5", "a/x": "f644:x", "a/y": "f644:y"},
    ),
    "file over directory hides the whole directory": (
        [[d("a"), d("a/b"), f("a/b/x")], [f("a", b"now a file")]],
        {"a": "f644:now a file"},
    ),
    "directory over file replaces it": (
        [[f("a", b"file")], [d("a"), f("a/y", b"y")]],
        {"a": "d755:0", "a/y": "f644:y"},
    ),
    "symlink over directory hides it": (
        [[d("a"), f("a/x"), d("b")], [sym("a", "b")]],
        {"a": "l:b", "b": "d755:0"},
    ),
    "whiteout and re-add in one layer": (
        [[d("a"), f("a/x", b"old"), f("a/z")], [wh("a"), d("a"), f("a/x", b"new")]],
        {"a": "d755:0", "a/x": "f644:new"},
    ),
    "implicit parent follows a lower symlink": (
        [[d("usr"), d("usr/lib"), sym("lib", "usr/lib")], [f("lib/x.so", b"so")]],
        {"lib": "l:usr/lib", "usr": "d755:0", "usr/lib": "d755:0", "usr/lib/x.so": "f644:so"},
    ),
    "implicit parent follows an absolute lower symlink": (
        [[d("usr"), d("usr/lib"), sym("lib", "/usr/lib")], [f("lib/x", b"x")]],
        {"lib": "l:/usr/lib", "usr": "d755:0", "usr/lib": "d755:0", "usr/lib/x": "f644:x"},
    ),
    "listed directory replaces a lower symlink": (
        [[d("usr"), sym("lib", "usr")], [d("lib", 0o700), f("lib/x", b"x")]],
        {"lib": "d700:0", "lib/x": "f644:x", "usr": "d755:0"},
    ),
    "implicit parents are 0755 root": (
        [[f("x/y/z", b"z")]],
        {"x": "d755:0", "x/y": "d755:0", "x/y/z": "f644:z"},
    ),
    "whiteout of a symlink removes the link, not its target": (
        [[d("t"), f("t/f", b"f"), sym("l", "t")], [wh("l")]],
        {"t": "d755:0", "t/f": "f644:f"},
    ),
    "whiteout through a lower symlink parent": (
        [[d("real"), f("real/x"), f("real/y", b"y"), sym("link", "real")], [wh("link/x")]],
        {"link": "l:real", "real": "d755:0", "real/y": "f644:y"},
    ),
    "hardlink in the same layer reads as its target": (
        [[f("a", b"data", 0o600), hl("b", "a")]],
        {"a": "f600:data", "b": "f600:data"},
    ),
    "hardlink to a lower layer's file": (
        [[f("a", b"data")], [hl("b", "a")]],
        {"a": "f644:data", "b": "f644:data"},
    ),
    "whiteout of something that is not there": (
        [[f("a", b"a")], [wh("nothing"), wh("deep/er")]],
        {"a": "f644:a"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_union_semantics_match_applying_the_layers(layers: LayerStore, tmp_path: Path, case: str) -> None:
    stack, expected = CASES[case]
    view = view_of(layers, *stack)
    assert listing(view) == expected
    target = tmp_path / "applied"
    target.mkdir()
    for entries in stack:
        r = write_layer(layers.store, entries)
        with layers.store.open_blob(r.descriptor.digest) as blob:
            apply_layer(open_decompressed(blob), target)
    assert disk_listing(target) == expected


FOREIGN: dict[str, tuple[list[list[tb.TarEntry]], dict[str, str]]] = {
    "a child before its listed directory follows the lower symlink, as docker applies it": (
        [
            [tb.directory("usr"), tb.directory("usr/lib"), tb.symlink("lib", "usr/lib")],
            [tb.file("lib/x", b"x"), tb.directory("lib/", 0o700)],
        ],
        {"lib": "d700:0", "usr": "d755:0", "usr/lib": "d755:0", "usr/lib/x": "f644:x"},
    ),
    "a file replacing an implicit directory of the same layer": (
        [[tb.file("a/x", b"x"), tb.whiteout("a/y"), tb.file("a", b"file")]],
        {"a": "f644:file"},
    ),
    "a file replacing a listed directory of the same layer": (
        [[tb.directory("a"), tb.directory("a/b"), tb.file("a/b/c"), tb.file("a", b"f")]],
        {"a": "f644:f"},
    ),
    "root entry, docker-style names and an opaque marker after its children": (
        [
            [tb.directory("./"), tb.directory("./d"), tb.file("./d/old", b"o")],
            [tb.directory("./d", 0o711), tb.file("./d/new", b"n"), tb.opaque_whiteout("./d")],
        ],
        {"d": "d711:0", "d/new": "f644:n"},
    ),
    "hardlink entries in a lower layer, whiteout of one name above": (
        [[tb.file("a", b"data"), tb.hardlink("b", "a")], [tb.whiteout("a")]],
        {"b": "f644:data"},
    ),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_foreign_archives_match_applying_them(layers: LayerStore, tmp_path: Path, case: str) -> None:
    stack, expected = FOREIGN[case]
    diff_ids = []
    target = tmp_path / "applied"
    target.mkdir()
    for entries in stack:
        raw = tb.build_tar(entries)
        desc = layers.store.write_blob(raw)
        layers.ensure_unpacked(desc, desc.digest)
        diff_ids.append(desc.digest)
        apply_layer(io.BytesIO(raw), target)
    assert disk_listing(target) == expected
    assert listing(layers.view(diff_ids, "foreign")) == expected


def test_listdir_is_merged_sorted_and_never_shows_markers(layers: LayerStore) -> None:
    view = view_of(layers, [d("a"), f("a/b"), f("a/z")], [opq("c"), f("c/in")], [wh("a/b"), f("a/B"), f("a/m")])
    assert view.listdir("") == ["a", "c"]
    assert view.listdir("a") == ["B", "m", "z"]
    assert view.listdir("c") == ["in"]
    with pytest.raises(BuildError, match="not a directory"):
        view.listdir("a/m")
    with pytest.raises(BuildError, match="no such directory"):
        view.listdir("missing")


def test_symlinks_resolve_inside_the_view(layers: LayerStore) -> None:
    view = view_of(
        layers,
        [
            d("target"),
            d("target/dir"),
            f("target/dir/f", b"found"),
            sym("abs", "/target/dir"),
            d("x"),
            sym("x/rel", "../target"),
            sym("esc", "../../../../target"),
            sym("l1", "l2"),
            sym("l2", "l1"),
            sym("dang", "nowhere"),
            sym("chain", "abs"),
        ],
    )
    assert view.resolve("abs/f") == "target/dir/f"
    assert view.resolve("/abs") == "target/dir"
    assert view.resolve("x/rel/dir/f") == "target/dir/f"
    assert view.resolve("esc/dir") == "target/dir"  # `..` stops at the root
    assert view.resolve("chain/../dir/f") == "target/dir/f"  # `..` applies to the resolved path
    assert view.resolve("../../target") == "target"
    assert view.resolve("dang") is None and view.resolve("target/dir/f/more") is None
    with pytest.raises(BuildError, match="too many levels"):
        view.resolve("l1")
    link = view.lstat("abs")
    assert link is not None and link.type == "symlink" and link.linkname == "/target/dir"
    through = view.lstat("abs/f")
    assert through is not None and through.type == "file" and through.path == "abs/f"
    assert view.lstat("dang/x") is None and view.lstat("nope") is None
    with view.open("chain/f") as fh:
        assert fh.read() == b"found"
    with pytest.raises(BuildError, match="not a regular file"):
        view.open("abs")
    root = view.lstat("")
    assert root is not None and root.type == "dir"


def test_metadata_comes_from_the_tar_not_from_the_disk(store: Store) -> None:
    with LayerStore(store, unprivileged=True) as ls:
        layer = [
            d("locked", 0o500, uid=99, gid=98),
            f("locked/secret", b"s", 0o000, uid=1234, gid=4321),
            f("suid", b"x", 0o4755, uid=0, gid=0),
            LayerEntry(FileInfo("null", "char", 0o666, devmajor=1, devminor=3)),
        ]
        (diff_id,) = unpacked(ls, layer)
        root = ls.layer_root(diff_id)
        assert stat.S_IMODE((root / "locked").stat().st_mode) == 0o700  # the owner can still list and remove it
        assert stat.S_IMODE((root / "locked/secret").stat().st_mode) == 0o400
        assert (root / "locked/secret").stat().st_uid == os.getuid()  # not chowned
        assert not os.path.lexists(root / "null")  # devices are metadata only
        view = ls.view([diff_id], "test")
        secret = view.lstat("locked/secret")
        assert secret is not None and (secret.uid, secret.gid, secret.mode) == (1234, 4321, 0)
        locked = view.lstat("locked")
        assert locked is not None and (locked.uid, locked.gid, locked.mode) == (99, 98, 0o500)
        dev = view.lstat("null")
        assert dev is not None and (dev.type, dev.devmajor, dev.devminor, dev.mode) == ("char", 1, 3, 0o666)
        suid = view.lstat("suid")
        assert suid is not None and suid.mode == 0o4755
        with view.open("locked/secret") as fh:
            assert fh.read() == b"s"


def test_layer_index_round_trips(tmp_path: Path) -> None:
    index = LayerIndex(
        {
            "": ("dir", 0o755, 0, 0, 0, 0, "", 0, 0, ()),
            "bad-\udcff": ("file", 0o644, 1, 2, 3, 4.5, "", 0, 0, (("user.x", b"\x00\xff"),)),
            "dev": ("block", 0o600, 0, 6, 0, 0, "", 8, 1, ()),
        },
        ["gone"],
        ["opq"],
        3,
    )
    (tmp_path / "i.json").write_bytes(index.dump())
    assert LayerIndex.load(tmp_path / "i.json") == index
    (tmp_path / "bad.json").write_bytes(b'{"v": 99}')
    with pytest.raises(StoreError, match="unusable"):
        LayerIndex.load(tmp_path / "bad.json")


def test_users_and_groups_come_from_the_view(layers: LayerStore) -> None:
    passwd = b"root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1001::/home/app:/bin/sh\nbroken\n"
    group = b"root:x:0:\nstaff:x:50:app\n"
    view = view_of(
        layers,
        [d("etc"), d("usr"), d("usr/share"), f("usr/share/passwd", passwd), f("etc/group", group)],
        [sym("etc/passwd", "../usr/share/passwd")],
    )
    assert lookup_user(view, "app") == (1000, 1001)
    assert lookup_user(view, "root") == (0, 0)
    assert lookup_user(view, "1000") == (1000, 1000)  # COPY --chown=1000: gid = uid
    assert lookup_user(view, 1000, numeric_gid="passwd") == (1000, 1001)  # USER 1000
    assert lookup_user(view, 4242, numeric_gid="passwd") == (4242, 0)
    assert lookup_group(view, "staff") == 50 and lookup_group(view, "7") == 7
    with pytest.raises(BuildError, match="unknown user 'nobody'"):
        lookup_user(view, "nobody")
    with pytest.raises(BuildError, match="unknown group"):
        lookup_group(view, "wheel")
    empty = view_of(layers, [f("hello", b"x")])
    with pytest.raises(BuildError, match="has no /etc/passwd"):
        lookup_user(empty, "app")
    with pytest.raises(BuildError, match="has no /etc/group"):
        lookup_group(empty, "staff")
    assert lookup_user(empty, "1000") == (1000, 1000)
    assert lookup_user(empty, "1000", numeric_gid="passwd") == (1000, 0)


def test_merged_trees_are_cached_by_chain_and_built_from_prefixes(layers: LayerStore) -> None:
    base, mid, top = unpacked(layers, [d(f"d{i}") for i in range(50)], [f("d1/x")], [wh("d1/x")])
    one = layers.view([base, mid], "one")
    assert layers.view([base, mid], "again").tree is one.tree
    both = layers.view([base, mid, top], "top")
    assert one.lstat("d1/x") is not None and both.lstat("d1/x") is None  # the cached prefix was not modified
    scratch = layers.view([], "scratch")
    assert scratch.listdir("") == []


def test_a_view_over_layers_that_are_not_unpacked_is_refused(layers: LayerStore) -> None:
    with pytest.raises(StoreError, match="not unpacked"):
        layers.view([Digest("sha256:" + "0" * 64)], "nothing")


# -- the store ------------------------------------------------------------------------------------------------------
def test_ensure_unpacked_works_once(store: Store) -> None:
    r = write_layer(store, [d("a"), f("a/x", b"x")])
    with LayerStore(store) as ls:
        first = ls.ensure_unpacked(r.descriptor, r.diff_id)
        stamp = (first / "root").stat().st_mtime_ns
        assert ls.ensure_unpacked(r.descriptor, r.diff_id) == first
        assert ls.unpack_count == 1
    with LayerStore(store) as again:
        assert again.ensure_unpacked(r.descriptor, r.diff_id) == first
        assert again.unpack_count == 0 and (first / "root").stat().st_mtime_ns == stamp
        (row,) = again.list_unpacked()
        assert row.diff_id == r.diff_id and row.entries == 2 and row.size == 1


def test_ensure_unpacked_never_waits_for_its_own_shared_lock(store: Store) -> None:
    """Two threads of one process: one saw the layer missing, meanwhile another process unpacked it and another
    thread took its shared lock for good. Waiting for the exclusive lock then meant waiting for ourselves (flock
    locks of one process on two descriptors conflict): it must see the layer is there instead."""
    import threading

    r = write_layer(store, [f("x", b"x")])
    with LayerStore(store) as ls:
        ls.ensure_unpacked(r.descriptor, r.diff_id)  # unpacked, and the shared lock held by this LayerStore
        real_hold = ls._hold
        seen: list[Digest] = []

        def stale_first(diff_id: Digest) -> Path | None:
            seen.append(diff_id)
            return None if len(seen) == 1 else real_hold(diff_id)  # the first look predates the unpack

        ls._hold = stale_first  # type: ignore[method-assign]
        done: list[Path] = []
        t = threading.Thread(target=lambda: done.append(ls.ensure_unpacked(r.descriptor, r.diff_id)), daemon=True)
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "ensure_unpacked waited for a lock its own process holds"
        assert done == [ls.layer_dir(r.diff_id)] and ls.unpack_count == 1


def test_wrong_diff_id_keeps_nothing(store: Store, layers: LayerStore) -> None:
    r = write_layer(store, [f("x", b"x")])
    wrong = Digest("sha256:" + "1" * 64)
    with pytest.raises(DigestMismatchError):
        layers.ensure_unpacked(r.descriptor, wrong)
    assert not layers.is_unpacked(wrong)
    assert [p.name for p in layers.root.iterdir()] == [".locks"]


def test_write_layer_unpacks_in_the_same_pass(store: Store, layers: LayerStore, tmp_path: Path) -> None:
    entries = [d("a"), f("a/x", b"x" * 3_000_000), sym("l", "a/x"), wh("gone")]
    result, path = layers.write_layer(entries, source_date_epoch=10)
    assert store.has_blob(result.descriptor.digest) and layers.unpack_count == 1
    assert (path / "root/a/x").stat().st_size == 3_000_000
    assert_index_matches_blob(layers, result, tmp_path)


def test_a_small_layer_is_written_and_unpacked_without_threads(
    store: Store, layers: LayerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer of a few small files (a one-file COPY) is tarred, compressed and then unpacked in the calling
    thread; the blob, the files and the index are those of the threaded path."""
    entries = [d("a", mtime=5), f("a/x", b"small\n", mtime=9), sym("l", "a/x"), hl("h", "a/x"), wh("gone")]
    started: list[str] = []
    start = threading.Thread.start

    def spy(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", spy)
        result, path = layers.write_layer(entries, source_date_epoch=10)
    assert started == []
    assert (path / "root/a/x").read_bytes() == b"small\n" and os.readlink(path / "root/l") == "a/x"
    assert_index_matches_blob(layers, result, tmp_path)
    monkeypatch.setattr(layerstore, "INLINE_ENTRIES", 0)  # the threaded path, for the same entries
    with Store(tmp_path / "threaded") as other, LayerStore(other) as threaded:
        again, other_path = threaded.write_layer(entries, source_date_epoch=10)
        assert (again.descriptor, again.diff_id) == (result.descriptor, result.diff_id)
        assert threaded.index(again.diff_id) == layers.index(result.diff_id)
        assert _tree(other_path / "root") == _tree(path / "root")


def test_add_layer_does_not_read_the_blob(
    store: Store, layers: LayerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [d("a", mtime=5000), f("a/x", b"content", mtime=9000), hl("b", "a/x")]
    result = write_layer(store, entries, source_date_epoch=6000)

    def no_blob(*a: object) -> None:
        raise AssertionError("the blob was read")

    with monkeypatch.context() as m:
        m.setattr(store, "open_blob", no_blob)
        path = layers.add_layer(entries, result)
    assert layers.unpack_count == 1 and (path / "root/a/x").read_bytes() == b"content"
    assert_index_matches_blob(layers, result, tmp_path)


def test_add_layer_with_other_entries_unpacks_the_blob_instead(store: Store, layers: LayerStore) -> None:
    result = write_layer(store, [f("x", b"written")])
    path = layers.add_layer([f("x", b"changed")], result)
    assert (path / "root/x").read_bytes() == b"written"


def _many(n: int = 1200) -> list[LayerEntry]:
    dirs = [d("src", mtime=100)] + [d(f"src/d{i}", mtime=100 + i) for i in range(12)]
    files = [f(f"src/d{i % 12}/f{i}.txt", f"data {i}\n".encode() * (i % 7), mtime=1000 + i) for i in range(n)]
    return [*dirs, *files, sym("src/link", "d0/f0.txt"), hl("src/hard", "src/d1/f1.txt")]


def test_a_layer_of_many_entries_is_unpacked_by_a_process_of_its_own(
    store: Store, layers: LayerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = _many()
    assert len(entries) >= layerstore.PROCESS_UNPACK_ENTRIES
    spawned: list[list[str]] = []
    popen = subprocess.Popen

    def spy(args: list[str], **kw: object) -> object:
        spawned.append(list(args))
        return popen(args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", spy)
    result, path = layers.write_layer(entries, source_date_epoch=10)
    assert [a[1:3] for a in spawned] == [["-m", "imgci._unpack"]]
    assert (path / "root/src/d5/f5.txt").read_bytes() == b"data 5\n" * 5
    assert os.readlink(path / "root/src/link") == "d0/f0.txt"
    assert_index_matches_blob(layers, result, tmp_path)
    # the same layer unpacked by the thread: the same files and index
    monkeypatch.setenv("IMGCI_UNPACK_PROCESS", "0")
    with Store(tmp_path / "threaded") as other, LayerStore(other) as threaded:
        again, other_path = threaded.write_layer(entries, source_date_epoch=10)
        assert again.diff_id == result.diff_id and len(spawned) == 1
        assert threaded.index(again.diff_id) == layers.index(result.diff_id)
        assert _tree(other_path / "root") == _tree(path / "root")
    assert not [p for p in layers.root.iterdir() if p.name.startswith(".tmp-")]


def test_a_crashed_unpack_process_falls_back_to_the_blob(
    store: Store, layers: LayerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash = [sys.executable, "-c", "import sys; sys.stdin.buffer.read(4096); sys.exit(7)"]
    monkeypatch.setattr(layerstore, "_UNPACK_COMMAND", crash)
    result, path = layers.write_layer(_many(), source_date_epoch=10)
    assert (path / "root/src/d5/f5.txt").read_bytes() == b"data 5\n" * 5  # unpacked from the blob instead
    assert_index_matches_blob(layers, result, tmp_path)
    assert not [p for p in layers.root.iterdir() if p.name.startswith(".tmp-")]


def test_errors_of_the_unpack_process() -> None:
    from imgci.errors import CorruptArchiveError

    said = json.dumps(CorruptArchiveError("bad header at 512").report()).encode()  # what imgci._unpack writes
    e = layerstore._child_error(3, said, b"")
    assert isinstance(e, CorruptArchiveError) and e.message == "bad header at 512"
    crash = layerstore._child_error(1, b"", b"Traceback (most recent call last):\n  ...\nValueError: boom\n")
    assert isinstance(crash, StoreError) and "exit status 1" in crash.message and "ValueError: boom" in crash.message
    forged = layerstore._child_error(3, b'{"type": "SystemExit", "message": "x"}', b"")
    assert isinstance(forged, StoreError)  # only imgci's own error classes are rebuilt


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        data = os.readlink(p).encode() if p.is_symlink() else (p.read_bytes() if p.is_file() else b"")
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), data)
    return out


def assert_index_matches_blob(layers: LayerStore, result: LayerResult, tmp_path: Path) -> None:
    with Store(tmp_path / "other") as other, LayerStore(other) as fresh:
        other.write_blob(layers.store.read_blob(result.descriptor.digest))
        fresh.ensure_unpacked(result.descriptor, result.diff_id)
        assert fresh.index(result.diff_id) == LayerIndex.load(layers.layer_dir(result.diff_id) / "index.json")


def test_gc_removes_only_unkept_layers_nobody_uses(store: Store) -> None:
    user = LayerStore(store)
    kept, dropped = unpacked(user, [f("k", b"keep")], [f("d", b"drop")])
    with LayerStore(store) as janitor:
        assert janitor.gc_unpacked({kept}) == (0, 0)  # `dropped` is held by `user`
        user.close()
        assert janitor.gc_unpacked({kept}) == (1, 4)
        assert janitor.is_unpacked(kept) and not janitor.is_unpacked(dropped)
        assert [r.diff_id for r in janitor.list_unpacked()] == [kept]


CHILD = r"""
import sys, time
import imgci.layerfs as lf
from imgci.build.layerstore import LayerStore
from imgci.oci import Descriptor, Digest
from imgci.store import Store

original = lf.LayerDirApplier._added
def slow(self, key, e):
    original(self, key, e)
    time.sleep(float(sys.argv[4]))
lf.LayerDirApplier._added = slow
layers = LayerStore(Store(sys.argv[1]))
print("ready", flush=True)
layers.ensure_unpacked(Descriptor("", Digest(sys.argv[2]), 0), Digest(sys.argv[3]))
print(layers.unpack_count, flush=True)
"""


def spawn(store: Store, r: LayerResult, delay: float) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", CHILD, str(store.root), r.descriptor.digest.value, r.diff_id.value, str(delay)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)


def test_concurrent_processes_unpack_a_layer_once(store: Store) -> None:
    r = write_layer(store, [d("a"), *(f(f"a/{i}", b"x") for i in range(5))])
    children = [spawn(store, r, 0.05), spawn(store, r, 0.05)]
    outputs = [c.communicate(timeout=30)[0].split() for c in children]
    assert all(c.returncode == 0 for c in children), outputs
    assert sorted(int(out[-1]) for out in outputs) == [0, 1]
    with LayerStore(store) as ls:
        assert ls.is_unpacked(r.diff_id) and len(ls.list_unpacked()) == 1


def test_a_killed_unpack_leaves_no_half_layer(store: Store) -> None:
    r = write_layer(store, [d("a"), f("a/1", b"1"), f("a/2", b"2")])
    child = spawn(store, r, 30)
    layers_dir = store.root / "layers"
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(".tmp-") and any((p / "root").iterdir()) for p in _dirs(layers_dir)):
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with LayerStore(store) as ls:
        assert not ls.is_unpacked(r.diff_id) and not ls.layer_dir(r.diff_id).exists()
        ls.gc_unpacked(set())
        assert not any(p.name.startswith(".tmp-") for p in _dirs(layers_dir))
        path = ls.ensure_unpacked(r.descriptor, r.diff_id)  # the dead process's lock is gone with it
        assert (path / "root/a/2").read_bytes() == b"2"


def _dirs(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.exists() else []


def test_a_view_is_a_layer_source_read_through_its_files_on_disk(layers: LayerStore) -> None:
    view = view_of(layers, [d("usr"), d("usr/lib"), f("usr/lib/a.so", b"A" * 70_000, uid=3), sym("lib", "usr/lib")])
    real = view.resolve("lib/a.so")
    assert real == "usr/lib/a.so"
    host = view.host_path(real)
    assert host is not None and host.read_bytes() == b"A" * 70_000
    assert view.host_path("usr/lib") is None and view.host_path("lib") is None
    info = view.lstat(real)
    assert info is not None
    copied = LayerEntry(
        FileInfo("app/a.so", "file", info.mode, info.uid, info.gid, info.size), source_fs=view, source_path=real
    )
    result, path = layers.write_layer([d("app"), copied])
    assert (path / "root/app/a.so").read_bytes() == b"A" * 70_000
    assert layers.index(result.diff_id).entries["app/a.so"][2] == 3
