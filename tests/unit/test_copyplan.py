"""plan_copy: BuildKit's COPY/ADD rules as a table of small trees (MemFS sources and destinations)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from imgci.build.context import DirectoryFS
from imgci.build.copyperms import parse_chmod, resolve_chown
from imgci.build.copyplan import CopyOptions, FromFS, Inline, plan_copy, source_digest
from imgci.build.fs import LayerEntry
from imgci.errors import BuildError, CorruptArchiveError
from tests.unit.memfs import MTIME, MemFS

NOW = 2_000_000_000.0


def opts(**kw: object) -> CopyOptions:
    kw.setdefault("now", NOW)
    return CopyOptions(**kw)  # type: ignore[arg-type]


def table(entries: list[LayerEntry]) -> dict[str, tuple[str, int, int, int]]:
    """path -> (type, mode, uid, gid)"""
    return {e.info.path: (e.info.type, e.info.mode, e.info.uid, e.info.gid) for e in entries}


def content(entry: LayerEntry) -> bytes:
    with entry.open() as f:
        return f.read()


def by_path(entries: list[LayerEntry]) -> dict[str, LayerEntry]:
    return {e.info.path: e for e in entries}


@pytest.fixture
def ctx() -> MemFS:
    fs = MemFS("build context")
    fs.add_file("a.txt", "A").add_file("b.txt", "B", mode=0o600).add_file("run.sh", "#!/bin/sh\n", mode=0o755)
    fs.add_dir("app", mode=0o750).add_file("app/main.go", "package main").add_file("app/sub/deep.txt", "deep")
    fs.add_symlink("app/link", "../a.txt").add_symlink("alink", "a.txt").add_symlink("dlink", "/app")
    fs.add_file("src/x/one.txt", "1").add_file("src/y/one.txt", "2").add_file("src/y/two.md", "3")
    return fs


@pytest.fixture
def image() -> MemFS:
    fs = MemFS("image")
    fs.add_dir("usr", mode=0o755).add_dir("usr/local", mode=0o755).add_dir("opt/bin", mode=0o711, mtime=5.0)
    fs.add_symlink("usr/local/bin", "/opt/bin").add_dir("root", mode=0o700, mtime=7.0).add_file("etc/hostname", "h")
    fs.add_dir("srv", mode=0o775, uid=33, gid=33, mtime=9.0).add_symlink("srv/www", "/etc")
    fs.add_file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n")
    fs.add_file("etc/group", "root:x:0:\nstaff:x:50:\nwww:x:34:\n")
    return fs


# -- destinations ----------------------------------------------------------------------------------------------
def test_file_to_new_name_creates_parents(ctx: MemFS) -> None:
    entries = plan_copy(["a.txt"], "/opt/app/conf", src_fs=ctx, dest_fs=MemFS(), options=opts())
    assert table(entries) == {
        "opt": ("dir", 0o755, 0, 0),
        "opt/app": ("dir", 0o755, 0, 0),
        "opt/app/conf": ("file", 0o644, 0, 0),
    }
    conf = by_path(entries)["opt/app/conf"]
    assert content(conf) == b"A" and conf.info.mtime == MTIME and by_path(entries)["opt"].info.mtime == NOW


def test_file_into_dir_by_slash_or_existing_dir(ctx: MemFS, image: MemFS) -> None:
    assert "new/a.txt" in table(plan_copy(["a.txt"], "/new/", src_fs=ctx, dest_fs=image, options=opts()))
    assert "root/a.txt" in table(plan_copy(["a.txt"], "/root", src_fs=ctx, dest_fs=image, options=opts()))
    assert "etc/hostname" in table(plan_copy(["a.txt"], "/etc/hostname", src_fs=ctx, dest_fs=image, options=opts()))


def test_relative_dest_is_relative_to_workdir(ctx: MemFS) -> None:
    assert "w/d/a.txt" in table(plan_copy(["a.txt"], "d/", src_fs=ctx, dest_fs=None, workdir="/w", options=opts()))
    assert "w/a.txt" in table(plan_copy(["a.txt"], ".", src_fs=ctx, dest_fs=None, workdir="/w", options=opts()))
    assert "w/a.txt" in table(plan_copy(["a.txt"], "./", src_fs=ctx, dest_fs=None, workdir="/w/", options=opts()))


def test_existing_parents_carry_dest_metadata(ctx: MemFS, image: MemFS) -> None:
    entries = by_path(plan_copy(["a.txt"], "/root/.config/x", src_fs=ctx, dest_fs=image, options=opts()))
    assert (entries["root"].info.mode, entries["root"].info.mtime) == (0o700, 7.0)
    assert (entries["root/.config"].info.mode, entries["root/.config"].info.mtime) == (0o755, NOW)


def test_dest_resolves_through_symlinks_in_the_image(ctx: MemFS, image: MemFS) -> None:
    entries = plan_copy(["run.sh"], "/usr/local/bin/", src_fs=ctx, dest_fs=image, options=opts())
    assert table(entries) == {
        "opt": ("dir", 0o755, 0, 0),
        "opt/bin": ("dir", 0o711, 0, 0),
        "opt/bin/run.sh": ("file", 0o755, 0, 0),
    }
    assert by_path(entries)["opt/bin"].info.mtime == 5.0


def test_link_ignores_the_destination_tree(ctx: MemFS, image: MemFS) -> None:
    entries = table(plan_copy(["run.sh"], "/usr/local/bin/", src_fs=ctx, dest_fs=image, options=opts(link=True)))
    assert entries == {
        "usr": ("dir", 0o755, 0, 0),
        "usr/local": ("dir", 0o755, 0, 0),
        "usr/local/bin": ("dir", 0o755, 0, 0),
        "usr/local/bin/run.sh": ("file", 0o755, 0, 0),
    }
    # without the image, /root is not known to be a directory: the file becomes /root
    assert "root" in table(plan_copy(["a.txt"], "/root", src_fs=ctx, dest_fs=image, options=opts(link=True)))


# -- sources ---------------------------------------------------------------------------------------------------
def test_directory_copies_its_contents(ctx: MemFS) -> None:
    entries = plan_copy(["app"], "/srv/app", src_fs=ctx, dest_fs=MemFS(), options=opts())
    assert table(entries) == {
        "srv": ("dir", 0o755, 0, 0),
        "srv/app": ("dir", 0o755, 0, 0),
        "srv/app/link": ("symlink", 0o777, 0, 0),
        "srv/app/main.go": ("file", 0o644, 0, 0),
        "srv/app/sub": ("dir", 0o755, 0, 0),
        "srv/app/sub/deep.txt": ("file", 0o644, 0, 0),
    }
    e = by_path(entries)
    assert e["srv/app/link"].info.linkname == "../a.txt"  # copied as a symlink, never followed
    assert e["srv/app"].info.mtime == MTIME  # the destination directory takes the source's mtime


def test_directory_merges_into_existing_dir(ctx: MemFS, image: MemFS) -> None:
    image.add_dir("dest", mode=0o711, uid=5, gid=5, mtime=1.0).add_dir("dest/sub", mode=0o700, uid=5, mtime=1.0)
    e = by_path(plan_copy(["app"], "/dest", src_fs=ctx, dest_fs=image, options=opts()))
    assert (e["dest"].info.mode, e["dest"].info.uid, e["dest"].info.mtime) == (0o711, 5, MTIME)  # top keeps its own
    assert (e["dest/sub"].info.mode, e["dest/sub"].info.uid) == (0o755, 0)  # nested takes the source's


def test_type_conflicts_are_errors(ctx: MemFS, image: MemFS) -> None:
    image.add_dir("d/main.go").add_file("f", "x").add_symlink("s/sub", "/etc")
    with pytest.raises(BuildError, match=r"cannot replace to directory /d/main\.go with file"):
        plan_copy(["app"], "/d", src_fs=ctx, dest_fs=image, options=opts())
    with pytest.raises(BuildError, match="cannot copy to non-directory: /f"):
        plan_copy(["app"], "/f", src_fs=ctx, dest_fs=image, options=opts())
    with pytest.raises(BuildError, match="cannot copy to non-directory: /s/sub"):
        plan_copy(["app"], "/s", src_fs=ctx, dest_fs=image, options=opts())


def test_top_level_symlink_source_is_followed(ctx: MemFS) -> None:
    e = by_path(plan_copy(["alink"], "/d/", src_fs=ctx, dest_fs=None, options=opts()))
    assert e["d/alink"].info.type == "file" and content(e["d/alink"]) == b"A"
    assert "d/main.go" in by_path(plan_copy(["dlink"], "/d/", src_fs=ctx, dest_fs=None, options=opts()))


def test_wildcards(ctx: MemFS) -> None:
    assert list(table(plan_copy(["*.txt"], "/d/", src_fs=ctx, dest_fs=None, options=opts()))) == [
        "d",
        "d/a.txt",
        "d/b.txt",
    ]
    assert "d/one.txt" in table(plan_copy(["src/*/one.txt"], "/d/", src_fs=ctx, dest_fs=None, options=opts()))
    assert "d/x/one.txt" in table(plan_copy(["s?c"], "/d/", src_fs=ctx, dest_fs=None, options=opts()))
    # one match into a non-directory is a plain file copy
    assert "d/single" in table(plan_copy(["r*.sh"], "/d/single", src_fs=ctx, dest_fs=None, options=opts()))
    assert plan_copy(["*.nothing"], "/d/", src_fs=ctx, dest_fs=None, options=opts()) == []
    with pytest.raises(BuildError, match=r'"nodir/\*\.txt": not found'):
        plan_copy(["nodir/*.txt"], "/d/", src_fs=ctx, dest_fs=None, options=opts())


def test_several_files_need_a_directory(ctx: MemFS, image: MemFS) -> None:
    for sources in (["a.txt", "b.txt"], ["*.txt"]):
        with pytest.raises(BuildError, match="destination must be a directory and end with a /"):
            plan_copy(sources, "/dest", src_fs=ctx, dest_fs=image, options=opts())
    assert "root/b.txt" in table(plan_copy(["a.txt", "b.txt"], "/root", src_fs=ctx, dest_fs=image, options=opts()))
    # a directory first makes the destination a directory (BuildKit merges)
    merged = table(plan_copy(["app", "a.txt"], "/m", src_fs=ctx, dest_fs=image, options=opts()))
    assert "m/main.go" in merged and "m/a.txt" in merged


def test_missing_source(ctx: MemFS) -> None:
    with pytest.raises(BuildError, match=r'COPY failed: "nope\.txt": not found in build context'):
        plan_copy(["a.txt", "nope.txt"], "/d/", src_fs=ctx, dest_fs=None, options=opts())


def test_escape_attempts_are_refused_or_confined(ctx: MemFS) -> None:
    ctx.add_symlink("out", "../../../../etc/shadow").add_file("etc/shadow", "context file")
    for bad in ("../a.txt", "app/../../a.txt", "./../x"):
        with pytest.raises(BuildError, match="outside the build context"):
            plan_copy([bad], "/d/", src_fs=ctx, dest_fs=None, options=opts())
    e = by_path(plan_copy(["out", "/../../a.txt"], "/d/", src_fs=ctx, dest_fs=None, options=opts()))
    assert content(e["d/out"]) == b"context file" and "d/a.txt" in e


def test_heredoc_sources(ctx: MemFS) -> None:
    e = by_path(plan_copy([Inline("EOF", b"hello\n")], "/etc/motd", src_fs=ctx, dest_fs=None, options=opts()))
    assert (e["etc/motd"].info.mode, e["etc/motd"].info.mtime, content(e["etc/motd"])) == (0o644, NOW, b"hello\n")
    e = by_path(plan_copy([Inline("script", b"x")], "/bin/", dest_fs=None, options=opts(chmod="755")))
    assert e["bin/script"].info.mode == 0o755


def test_ownership_is_kept_from_other_stages_and_reset_by_chown(ctx: MemFS) -> None:
    stage = MemFS('stage "builder"').add_file("out/app", "bin", mode=0o755, uid=1000, gid=1000)
    assert table(plan_copy(["/out/app"], "/app", src_fs=stage, dest_fs=None, options=opts()))["app"][2:] == (1000, 1000)
    entries = table(plan_copy(["/out"], "/o/", src_fs=stage, dest_fs=None, options=opts(chown=(7, 8))))
    assert set(entries.values()) == {("dir", 0o755, 7, 8), ("file", 0o755, 7, 8)}


def test_timestamp_sets_every_mtime(ctx: MemFS) -> None:
    entries = plan_copy(["app"], "/x/", src_fs=ctx, dest_fs=None, options=opts(timestamp=1234.0))
    assert {e.info.mtime for e in entries} == {1234.0}


def test_whiteout_names_are_refused(ctx: MemFS) -> None:
    ctx.add_file(".wh.evil", "x")
    with pytest.raises(BuildError, match=r"\.wh\."):
        plan_copy([".wh.evil"], "/d/", src_fs=ctx, dest_fs=None, options=opts())


def test_hardlinks_within_a_copy_are_preserved(tmp_path: Path) -> None:
    (tmp_path / "one").write_text("same")
    os.link(tmp_path / "one", tmp_path / "two")
    with DirectoryFS(tmp_path) as fs:
        e = by_path(plan_copy(["/"], "/d/", src_fs=fs, dest_fs=None, options=opts()))
    assert e["d/one"].info.type == "file" and e["d/two"].info.type == "hardlink"
    assert e["d/two"].info.linkname == "d/one"


def test_hardlinks_reported_by_the_source_tree() -> None:
    image = MemFS("image").add_file("bin/busybox", "bb", mode=0o755).add_hardlink("bin/sh", "bin/busybox")
    e = by_path(plan_copy(["/bin"], "/b/", src_fs=image, dest_fs=None, options=opts()))
    assert e["b/sh"].info.type == "hardlink" and e["b/sh"].info.linkname == "b/busybox"
    e = by_path(plan_copy(["/bin/sh"], "/b/", src_fs=image, dest_fs=None, options=opts()))
    assert e["b/sh"].info.type == "file" and content(e["b/sh"]) == b"bb"  # its target was not copied


def test_result_is_sorted_and_deterministic(ctx: MemFS) -> None:
    first = plan_copy(["src", "app"], "/z/", src_fs=ctx, dest_fs=None, options=opts())
    paths = [e.info.path for e in first]
    assert paths == sorted(paths, key=lambda p: p.split("/"))
    assert first == plan_copy(["src", "app"], "/z/", src_fs=ctx, dest_fs=None, options=opts())


# -- --chown / --chmod -----------------------------------------------------------------------------------------
def test_resolve_chown(image: MemFS) -> None:
    assert resolve_chown("1000", image) == (1000, 1000)
    assert resolve_chown("1000:50", image) == (1000, 50)
    assert resolve_chown("www", image) == (33, 34)  # primary group from /etc/passwd
    assert resolve_chown("www:staff", image) == (33, 50)
    assert resolve_chown("10:www", image) == (10, 34)
    assert resolve_chown("1:", image) == (1, 1)
    with pytest.raises(BuildError, match="unable to find user nobody"):
        resolve_chown("nobody", image)
    with pytest.raises(BuildError, match="unable to find group wheel"):
        resolve_chown("www:wheel", image)
    with pytest.raises(BuildError, match="does not exist"):
        resolve_chown("www", MemFS())
    assert resolve_chown("7:8", None) == (7, 8)
    linked = MemFS().add_file("data/passwd", "app:x:99:98::/:/bin/sh\n").add_symlink("etc/passwd", "/data/passwd")
    assert resolve_chown("app", linked) == (99, 98)


def test_chown_applies_to_created_parents_not_existing_ones(ctx: MemFS, image: MemFS) -> None:
    entries = table(plan_copy(["a.txt"], "/srv/new/", src_fs=ctx, dest_fs=image, options=opts(chown=(33, 34))))
    assert entries == {
        "srv": ("dir", 0o775, 33, 33),
        "srv/new": ("dir", 0o755, 33, 34),
        "srv/new/a.txt": ("file", 0o644, 33, 34),
    }


@pytest.mark.parametrize(
    ("spec", "file_mode", "dir_mode", "expected_file", "expected_dir"),
    [
        ("755", 0o600, 0o700, 0o755, 0o755),
        ("0640", 0o777, 0o777, 0o640, 0o640),
        ("4755", 0o644, 0o755, 0o4755, 0o4755),
        ("u+x", 0o644, 0o700, 0o744, 0o700),
        ("go-w", 0o666, 0o777, 0o644, 0o755),
        ("a=rX", 0o644, 0o700, 0o444, 0o555),
        ("a+X", 0o744, 0o700, 0o755, 0o711),
        ("u=rwx,go=u-w", 0o600, 0o600, 0o755, 0o755),
        ("+x", 0o644, 0o600, 0o755, 0o711),
        ("=r", 0o777, 0o777, 0o444, 0o444),
        ("g=u", 0o640, 0o700, 0o660, 0o770),
        ("u+s,+t", 0o755, 0o755, 0o5755, 0o5755),
        ("o+s", 0o755, 0o755, 0o755, 0o755),
    ],
)
def test_chmod(spec: str, file_mode: int, dir_mode: int, expected_file: int, expected_dir: int) -> None:
    chmod = parse_chmod(spec)
    assert oct(chmod.apply(file_mode, False)) == oct(expected_file)
    assert oct(chmod.apply(dir_mode, True)) == oct(expected_dir)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("999", "octal"),
        ("8", "octal"),
        ("0o755", "octal"),
        ("17777", "octal"),
        ("u+q", "invalid syntax"),
        ("", "invalid"),
        ("x+r", "invalid syntax"),
        ("u", "invalid syntax"),
    ],
)
def test_invalid_chmod(spec: str, message: str) -> None:
    with pytest.raises(BuildError, match=f"invalid chmod parameter.*{message}"):
        parse_chmod(spec)


def test_chmod_in_a_copy(ctx: MemFS) -> None:
    e = table(plan_copy(["app"], "/c/", src_fs=ctx, dest_fs=None, options=opts(chmod="a=rX")))
    assert e["c"] == ("dir", 0o555, 0, 0)  # created parent: 0755 with the chmod applied (BuildKit >= 0.21)
    assert e["c/main.go"] == ("file", 0o444, 0, 0) and e["c/sub"] == ("dir", 0o555, 0, 0)
    assert e["c/link"] == ("symlink", 0o777, 0, 0)  # symlinks are never chmod'ed


# -- --exclude / --parents -------------------------------------------------------------------------------------
def test_exclude(ctx: MemFS) -> None:
    e = table(plan_copy(["*.txt"], "/d/", src_fs=ctx, dest_fs=None, options=opts(excludes=("b.txt",))))
    assert "d/a.txt" in e and "d/b.txt" not in e
    e = table(plan_copy(["src"], "/d/", src_fs=ctx, dest_fs=None, options=opts(excludes=("*/*.md", "x"))))
    assert list(e) == ["d", "d/y", "d/y/one.txt"]
    e = table(plan_copy(["src"], "/d/", src_fs=ctx, dest_fs=None, options=opts(excludes=("y", "!y/two.md"))))
    assert list(e) == ["d", "d/x", "d/x/one.txt", "d/y", "d/y/two.md"]


def test_parents(ctx: MemFS) -> None:
    e = table(plan_copy(["src/y/one.txt", "app/sub"], "/p/", src_fs=ctx, dest_fs=None, options=opts(parents=True)))
    assert list(e) == ["p", "p/app", "p/app/sub", "p/app/sub/deep.txt", "p/src", "p/src/y", "p/src/y/one.txt"]
    assert e["p/app"] == ("dir", 0o750, 0, 0)  # intermediate directories take the source's metadata
    e = table(plan_copy(["src/./*/one.txt"], "/p/", src_fs=ctx, dest_fs=None, options=opts(parents=True)))
    assert list(e) == ["p", "p/x", "p/x/one.txt", "p/y", "p/y/one.txt"]
    e = table(plan_copy(["**/*.md"], "/p/", src_fs=ctx, dest_fs=None, options=opts(parents=True)))
    assert list(e) == ["p", "p/src", "p/src/y", "p/src/y/two.md"]
    with pytest.raises(BuildError, match="not found"):
        plan_copy(["src/./nope.txt"], "/p/", src_fs=ctx, dest_fs=None, options=opts(parents=True))


# -- ADD of local archives -------------------------------------------------------------------------------------
def tarball(members: list[tuple[str, bytes | str | None]], *, compress: str = "gzip") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.mode = 1_600_000_000, 1000, 1001, 0o640
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o750
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = (
                    (tarfile.LNKTYPE, data[1:]) if data.startswith("=") else (tarfile.SYMTYPE, data)
                )
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compress == "gzip":
        return gzip.compress(raw)
    if compress == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_add_extracts_archives_by_content(ctx: MemFS, tmp_path: Path, compress: str) -> None:
    ctx.add_file(
        "release.bin", tarball([("pkg/", None), ("pkg/bin/tool", b"ELF"), ("pkg/l", "bin/tool")], compress=compress)
    )
    e = by_path(
        plan_copy(["release.bin"], "/opt", src_fs=ctx, dest_fs=None, options=opts(unpack=True), scratch=tmp_path)
    )
    assert e["opt/pkg"].info.mode == 0o750 and e["opt/pkg/bin"].info.mode == 0o755  # implied parent
    tool = e["opt/pkg/bin/tool"]
    assert (tool.info.mode, tool.info.uid, tool.info.gid, tool.info.mtime) == (0o640, 1000, 1001, 1_600_000_000)
    assert content(tool) == b"ELF" and tool.host_path is not None and tool.host_path.parent == tmp_path
    assert e["opt/pkg/l"].info.linkname == "bin/tool"
    assert e["opt"].info.mode == 0o755


def test_add_archive_options(ctx: MemFS, image: MemFS, tmp_path: Path) -> None:
    ctx.add_file("a.tar.gz", tarball([("f", b"1"), ("hard", "=f"), ("www/index.html", b"<p>")]))
    e = by_path(plan_copy(["a.tar.gz"], "/x/", src_fs=ctx, dest_fs=None, options=opts(unpack=False)))
    assert e["x/a.tar.gz"].info.type == "file"  # COPY, or ADD --unpack=false, copies the archive itself
    e = by_path(
        plan_copy(
            ["a.tar.gz"], "/srv", src_fs=ctx, dest_fs=image, options=opts(unpack=True, chown=(5, 6)), scratch=tmp_path
        )
    )
    assert (e["srv/f"].info.uid, e["srv/f"].info.gid) == (5, 6)
    assert e["srv/hard"].info.type == "hardlink" and e["srv/hard"].info.linkname == "srv/f"
    assert "etc/index.html" in e  # srv/www -> /etc in the image: extraction goes through the symlink
    ctx.add_file("plain.gz", gzip.compress(b"not a tar"))
    assert "y/plain.gz" in by_path(
        plan_copy(["plain.gz"], "/y/", src_fs=ctx, dest_fs=None, options=opts(unpack=True), scratch=tmp_path)
    )


def test_add_archive_escapes_are_refused(ctx: MemFS, tmp_path: Path) -> None:
    ctx.add_file("evil.tar", tarball([("../../etc/passwd", b"x")], compress="none"))
    with pytest.raises(BuildError, match="outside extraction root"):
        plan_copy(["evil.tar"], "/d", src_fs=ctx, dest_fs=None, options=opts(unpack=True), scratch=tmp_path)
    ctx.add_file("abs.tar", tarball([("/etc/motd", b"y"), ("a/../b", b"z")], compress="none"))
    e = by_path(plan_copy(["abs.tar"], "/d", src_fs=ctx, dest_fs=None, options=opts(unpack=True), scratch=tmp_path))
    assert "d/etc/motd" in e and "d/b" in e  # absolute names are inside the destination
    ctx.add_file("cut.tar.gz", tarball([("big", os.urandom(100_000))])[:-300])
    with pytest.raises(CorruptArchiveError):
        plan_copy(["cut.tar.gz"], "/d", src_fs=ctx, dest_fs=None, options=opts(unpack=True), scratch=tmp_path)


def test_fromfs_sources(ctx: MemFS) -> None:
    other = MemFS("download").add_file("file.bin", "x", mode=0o600)
    e = table(plan_copy([FromFS(other, "file.bin"), "a.txt"], "/d/", src_fs=ctx, dest_fs=None, options=opts()))
    assert e["d/file.bin"] == ("file", 0o600, 0, 0) and "d/a.txt" in e


# -- cache keys ------------------------------------------------------------------------------------------------
def test_source_digest_covers_what_the_copy_reads(ctx: MemFS) -> None:
    base = source_digest(["app", "*.txt"], src_fs=ctx)
    assert base == source_digest(["app", "*.txt"], src_fs=ctx) and base.startswith("sha256:")
    assert source_digest(["*.txt", "app"], src_fs=ctx) != base  # order matters (later sources win)
    ctx.add_file("app/main.go", "package other")
    changed = source_digest(["app", "*.txt"], src_fs=ctx)
    assert changed != base
    ctx.add_file("app/main.go", "package other", mtime=1.0)  # mtimes are not part of it
    assert source_digest(["app", "*.txt"], src_fs=ctx) == changed
    ctx.add_file("app/sub/ignored.log", "x")
    with_excludes = opts(excludes=("*.log", "sub/*.log"))
    assert source_digest(["app"], src_fs=ctx, options=with_excludes) == source_digest(
        ["app"], src_fs=ctx.add_file("app/sub/ignored.log", "y"), options=with_excludes
    )
    assert source_digest([Inline("EOF", b"a")]) != source_digest([Inline("EOF", b"b")])
    with pytest.raises(BuildError, match="not found"):
        source_digest(["missing"], src_fs=ctx)


def test_source_digest_uses_the_context_stat_cache(tmp_path: Path) -> None:
    from imgci.build.context import BuildContext

    root = tmp_path / "ctx"
    (root / "d").mkdir(parents=True)
    for i in range(10):
        (root / "d" / f"{i}.txt").write_text(str(i))
        os.utime(root / "d" / f"{i}.txt", (1000, 1000))
    with BuildContext(root, cache_dir=tmp_path / "cache") as first:
        digest = source_digest(["d"], src_fs=first)
        assert first.hasher.files_read == 10
    with BuildContext(root, cache_dir=tmp_path / "cache") as second:
        assert source_digest(["d"], src_fs=second) == digest and second.hasher.files_read == 0


def test_the_planned_metadata_keeps_every_field_of_the_source() -> None:
    """``_Planner._meta`` builds the FileInfo by position (fast): every field not COPY's to change is kept."""
    import dataclasses

    from imgci.build.copyplan import _Planner
    from imgci.build.fs import FileInfo

    values = {"path": "a/b", "type": "file", "mode": 0o4751, "uid": 7, "gid": 8, "size": 9, "mtime": 10.5}
    values |= {"linkname": "l", "devmajor": 11, "devminor": 12, "xattrs": (("user.x", b"1"),)}
    assert set(values) == {f.name for f in dataclasses.fields(FileInfo)}, "a new FileInfo field: _meta must copy it"
    src = FileInfo(**values)  # type: ignore[arg-type]
    planner = _Planner(dest_fs=None, options=CopyOptions(), scratch=None, now=0.0)
    assert planner._meta(src, "dest/b") == dataclasses.replace(src, path="dest/b")
