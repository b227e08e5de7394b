"""BuildContext / DirectoryFS: confinement, .dockerignore visibility, FileInfo, content digests and the stat cache."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from imgci.build.context import BuildContext, DirectoryFS
from imgci.build.copyplan import plan_copy
from imgci.build.fs import walk
from imgci.errors import BuildError

OLD = time.time() - 3600


def make(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        os.utime(p, (OLD, OLD))


@pytest.fixture
def ctxdir(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    make(root, {"etc/passwd": "context passwd\n", "src/main.go": "package main\n", "README.md": "hi\n"})
    return root


def test_symlink_to_absolute_path_reads_the_contexts_own_file(ctxdir: Path) -> None:
    (ctxdir / "pw").symlink_to("/etc/passwd")
    (ctxdir / "up").symlink_to("../../../../etc/passwd")
    with BuildContext(ctxdir) as ctx:
        for link in ("pw", "up"):
            assert ctx.resolve(link) == "etc/passwd"
            with ctx.open(link) as f:
                assert f.read() == b"context passwd\n"
        info = ctx.lstat("pw")
        assert info is not None and info.type == "symlink" and info.linkname == "/etc/passwd"


def test_symlink_out_of_the_context_never_reaches_the_host(ctxdir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    (ctxdir / "leak").symlink_to(secret)  # absolute host path: means <ctx>/<that path>, which does not exist
    (ctxdir / "dirleak").symlink_to(tmp_path)
    with BuildContext(ctxdir) as ctx:
        assert ctx.resolve("leak") is None
        assert ctx.lstat("dirleak/secret.txt") is None
        with pytest.raises(BuildError):
            ctx.open("leak")
        with pytest.raises(BuildError, match="not found"):
            plan_copy(["dirleak/secret.txt"], "/x", src_fs=ctx, dest_fs=None)


def test_dotdot_paths_are_clamped_in_the_tree_and_refused_by_copy(ctxdir: Path) -> None:
    with BuildContext(ctxdir) as ctx:
        assert ctx.resolve("../../etc/passwd") == "etc/passwd"
        assert ctx.lstat("src/../../README.md") is not None
        with pytest.raises(BuildError, match="outside the build context"):
            plan_copy(["../README.md"], "/x", src_fs=ctx, dest_fs=None)
        # an absolute source is inside the context
        entries = plan_copy(["/etc/passwd"], "/x", src_fs=ctx, dest_fs=None)
        assert [e.info.path for e in entries] == ["x"]


def test_parent_symlinks_are_followed_inside(ctxdir: Path) -> None:
    (ctxdir / "code").symlink_to("src")
    with BuildContext(ctxdir) as ctx:
        info = ctx.lstat("code/main.go")
        assert info is not None and info.type == "file" and info.path == "code/main.go"
        assert ctx.listdir("code") == ["main.go"]


def test_fileinfo_from_lstat(ctxdir: Path) -> None:
    os.chmod(ctxdir / "src/main.go", 0o750)
    with BuildContext(ctxdir) as ctx:
        info = ctx.lstat("src/main.go")
        assert info is not None
        assert (info.type, info.mode, info.size, info.uid, info.gid) == ("file", 0o750, 13, 0, 0)
        assert abs(info.mtime - OLD) < 1e-3
    with DirectoryFS(ctxdir, owner=None) as raw:
        info = raw.lstat("src/main.go")
        assert info is not None and (info.uid, info.gid) == (os.getuid(), os.getgid())


def test_sockets_are_invisible(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "s"))
        with BuildContext(root) as ctx:
            assert ctx.lstat("s") is None and ctx.listdir("") == []
    finally:
        sock.close()


def test_ignored_entries_are_invisible(ctxdir: Path) -> None:
    make(ctxdir, {".dockerignore": "# comment\n*.md\nsecret/\nvendor\n!vendor/keep.go\n", "secret/key": "k"})
    make(ctxdir, {"vendor/keep.go": "k", "vendor/drop.go": "d", "vendor/sub/x.go": "x"})
    with BuildContext(ctxdir) as ctx:
        assert ctx.dockerignore_path == ctxdir / ".dockerignore"
        assert ctx.lstat("README.md") is None
        assert ctx.lstat("secret") is None and ctx.lstat("secret/key") is None
        assert ctx.resolve("secret/key") is None
        assert "README.md" not in ctx.listdir("") and "secret" not in ctx.listdir("")
        # an excluded directory with a re-included entry stays, holding only that entry
        assert ctx.lstat("vendor") is not None
        assert ctx.listdir("vendor") == ["keep.go"]
        assert ctx.lstat("vendor/drop.go") is None
        assert ctx.is_ignored("README.md") and not ctx.is_ignored("src/main.go")
        assert sorted(i.path for i in walk(ctx)) == [
            ".dockerignore",
            "etc",
            "etc/passwd",
            "src",
            "src/main.go",
            "vendor",
            "vendor/keep.go",
        ]
        with pytest.raises(BuildError, match="not found") as info:
            plan_copy(["README.md"], "/x", src_fs=ctx, dest_fs=None)
        assert info.value.hint is not None and ".dockerignore" in info.value.hint


def test_dockerfile_specific_ignore_file_wins(ctxdir: Path, tmp_path: Path) -> None:
    make(ctxdir, {".dockerignore": "src\n"})
    dockerfile = tmp_path / "build" / "app.Dockerfile"
    make(tmp_path / "build", {"app.Dockerfile": "FROM scratch\n", "app.Dockerfile.dockerignore": "etc\n"})
    with BuildContext(ctxdir, dockerfile=dockerfile) as ctx:
        assert ctx.dockerignore_path == tmp_path / "build/app.Dockerfile.dockerignore"
        assert ctx.lstat("etc") is None and ctx.lstat("src/main.go") is not None
    with BuildContext(ctxdir, dockerfile=tmp_path / "build" / "other.Dockerfile") as ctx:
        assert ctx.lstat("src") is None and ctx.lstat("etc") is not None


def test_dockerfile_and_dockerignore_are_not_special(ctxdir: Path) -> None:
    make(ctxdir, {"Dockerfile": "FROM scratch\n", ".dockerignore": "Dockerfile\n.dockerignore\n"})
    with BuildContext(ctxdir, dockerfile=ctxdir / "Dockerfile") as ctx:
        assert ctx.lstat("Dockerfile") is None and ctx.lstat(".dockerignore") is None


def test_digest_covers_content_mode_and_links_but_not_mtime(ctxdir: Path) -> None:
    (ctxdir / "link").symlink_to("src/main.go")
    with BuildContext(ctxdir) as ctx:
        items = ["src", "src/main.go", "link"]
        first = ctx.digest_of(items)
        assert first.startswith("sha256:") and ctx.digest_of(reversed(items)) == first
        os.utime(ctxdir / "src/main.go", (OLD - 500, OLD - 500))
        assert ctx.digest_of(items) == first
        os.chmod(ctxdir / "src/main.go", 0o755)
        assert ctx.digest_of(items) != first
        assert ctx.digest_of(["src/main.go"]) != ctx.digest_of(["README.md"])
        assert ctx.digest_of(walk(ctx, "src")) == ctx.digest_of(["src/main.go"])
        with pytest.raises(BuildError, match="not found"):
            ctx.digest_of(["missing"])


def test_stat_cache_skips_unchanged_files_across_builds(ctxdir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make(ctxdir, {f"many/f{i}.txt": f"content {i}\n" for i in range(20)})
    paths = [f"many/f{i}.txt" for i in range(20)]
    with BuildContext(ctxdir, cache_dir=cache) as ctx:
        digest = ctx.digest_of(paths)
        assert ctx.hasher.files_read == 20
    with BuildContext(ctxdir, cache_dir=cache) as ctx:  # a second build: nothing is read again
        assert ctx.digest_of(paths) == digest
        assert ctx.hasher.files_read == 0
    make(ctxdir, {"many/f3.txt": "changed\n"})
    with BuildContext(ctxdir, cache_dir=cache) as ctx:
        assert ctx.digest_of(paths) != digest
        assert ctx.hasher.files_read == 1
    fresh = ctxdir / "many/f4.txt"
    fresh.write_text("just written\n")  # racy: modified now, so it is hashed but not remembered
    with BuildContext(ctxdir, cache_dir=cache) as ctx:
        ctx.digest_of(paths)
    with BuildContext(ctxdir, cache_dir=cache) as ctx:
        ctx.digest_of(paths)
        assert ctx.hasher.files_read == 1


def test_broken_stat_cache_is_only_a_miss(ctxdir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "context-stat-cache.sqlite").write_bytes(b"this is not a database" * 100)
    with BuildContext(ctxdir, cache_dir=cache) as ctx:
        assert ctx.digest_of(["README.md"]).startswith("sha256:")


def test_inode_key_for_hardlinks(ctxdir: Path) -> None:
    os.link(ctxdir / "README.md", ctxdir / "again.md")
    with BuildContext(ctxdir) as ctx:
        key = ctx.inode_key("README.md")
        assert key is not None and key == ctx.inode_key("again.md")
        assert ctx.inode_key("src/main.go") is None
    # through a symlink (a path that is not a real one): resolved to the file it names
    (ctxdir / "link.md").symlink_to("again.md")
    (ctxdir / "linkdir").symlink_to(".")
    with BuildContext(ctxdir) as ctx:
        key = ctx.inode_key("README.md")
        assert ctx.inode_key("link.md") == key and ctx.inode_key("linkdir/again.md") == key
        assert ctx.inode_key("missing.md") is None


def test_a_listing_answers_the_lstat_of_its_entries(ctxdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A COPY lists each directory, then lstats every entry (for its cache key, again for its layer): the listing's
    # own stat answers, instead of a walk to the directory and an lstat per entry each time.
    make(ctxdir, {f"many/f{i:03d}": str(i) for i in range(200)})
    with BuildContext(ctxdir) as ctx:
        names = ctx.listdir("many")
        assert len(names) == 200
        calls: list[str] = []
        real_lstat, real_open = os.lstat, os.open
        monkeypatch.setattr(os, "lstat", lambda *a, **k: (calls.append("lstat"), real_lstat(*a, **k))[1])
        monkeypatch.setattr(os, "open", lambda *a, **k: (calls.append("open"), real_open(*a, **k))[1])
        infos = [ctx.lstat(f"many/{n}") for n in names]
        assert calls == []
        with ctx.open("many/f007") as f:  # a real path: opened without resolving it component by component
            assert f.read() == b"7"
        calls.clear()
        with ctx.open("many/f008") as f:  # its directory's fd kept from the first: one open, of the file itself
            assert f.read() == b"8"
        assert calls == ["open"]
        monkeypatch.undo()
        assert [(i.type, i.size, i.mtime) for i in infos if i is not None] == [
            ("file", (ctxdir / "many" / n).stat().st_size, (ctxdir / "many" / n).stat().st_mtime_ns / 1e9)
            for n in names
        ]
        # what the listing did not hold did not exist then; the next listing sees it
        (ctxdir / "many" / "late").write_text("late")
        assert ctx.lstat("many/late") is None
        assert "late" in ctx.listdir("many")
        late = ctx.lstat("many/late")
        assert late is not None and late.size == 4


def test_listings_kept_are_bounded(ctxdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgci.build.context as context

    monkeypatch.setattr(context, "_LISTED_ENTRIES", 150)
    make(ctxdir, {f"d{d}/f{i:02d}": "x" for d in range(4) for i in range(60)})
    with BuildContext(ctxdir) as ctx:
        for d in range(4):
            ctx.listdir(f"d{d}")
            assert ctx._listed_entries <= 150
        assert sum(len(v) for v in ctx._listed.values()) == ctx._listed_entries
        assert list(ctx._listed) == ["d2", "d3"]  # the oldest went first
        # an evicted directory's entries are still found, by lstat itself
        info = ctx.lstat("d0/f01")
        assert info is not None and info.type == "file"
