"""The conformance harness itself: contexts, normalisation of real reference archives, comparison.

Needs no builder: the fixtures are images BuildKit (docker save) and buildah (OCI archive) produced for the
``from_scratch`` case, checked in under fixtures/.
"""

from __future__ import annotations

import copy
import io
import json
import os
import stat
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.harness import (
    BUILD_TIME,
    BUILDER_IGNORES,
    CASES_DIR,
    CONTEXT_MTIME,
    DEFAULT_IGNORES,
    EMPTY_BASE,
    EXPECTED_DIR,
    FIXTURES_DIR,
    archive_bytes,
    base_info,
    build_order,
    compare,
    dumps,
    list_cases,
    load_case,
    make_base_rootfs,
    materialise_context,
    normalise_archive,
    read_layer,
    serve_http,
)
from tests.infra import rootfs

DOCKER_FIXTURE = FIXTURES_DIR / "from_scratch.buildkit.docker.tar"
OCI_FIXTURE = FIXTURES_DIR / "from_scratch.buildah.oci.tar"


# -- the cases and their expectations ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_cases())
def test_case_has_a_consistent_expectation(name: str) -> None:
    case = load_case(name)
    assert case.spec.get("description"), f"{name}: case.json needs a description"
    exp = case.expected()
    assert exp["case"] == name
    assert set(exp) >= {"reference", "config", "history", "layers", "delta", "build"}
    assert exp["build"]["build_args"] == case.build_args and exp["build"]["target"] == case.target
    if case.manual:
        assert exp["reference"].startswith("manual (") and case.manual in exp["reference"]
    else:
        assert exp["reference"].startswith("BuildKit (docker "), exp["reference"]
        assert "buildah" in exp, "reference cases record whether buildah agreed"
    # one history entry per layer, in order
    assert sum(not h["empty_layer"] for h in exp["history"]) == len(exp["layers"])
    # the expected file is what dumps() writes, so regenerating it gives no spurious diff
    assert (EXPECTED_DIR / f"{name}.json").read_text() == dumps(exp) + "\n"


def test_every_expectation_has_a_case() -> None:
    cases = set(list_cases())
    assert {p.stem for p in EXPECTED_DIR.glob("*.json")} == cases
    assert len(cases) >= 40


def test_build_order_puts_needed_cases_first() -> None:
    assert build_order(["onbuild_trigger"]) == ["onbuild_record", "onbuild_trigger"]


# -- contexts ------------------------------------------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_materialise_modes_links_empty_dirs_and_mtimes(tmp_path: Path) -> None:
    ctx = materialise_context("copy_exec_bits", tmp_path / "a")
    assert _mode(ctx / "modes/f4755") == 0o4755
    assert _mode(ctx / "modes/f2755") == 0o2755
    assert _mode(ctx / "modes/d1777") == 0o1777
    assert _mode(ctx / "modes/f444") == 0o444
    assert os.lstat(ctx / "modes/d750/inner").st_mtime == CONTEXT_MTIME
    assert os.lstat(ctx / "modes").st_mtime == CONTEXT_MTIME

    ctx = materialise_context("copy_hardlinks", tmp_path / "b")
    assert (
        os.stat(ctx / "hl/one.txt").st_ino
        == os.stat(ctx / "hl/two.txt").st_ino
        == os.stat(ctx / "hl/sub/four.txt").st_ino
    )
    assert os.stat(ctx / "hl/three.txt").st_ino != os.stat(ctx / "hl/one.txt").st_ino

    ctx = materialise_context("copy_symlinks", tmp_path / "c")
    assert os.readlink(ctx / "links/abs") == "/etc/passwd"
    assert os.readlink(ctx / "links/dangling") == "nowhere"
    assert os.lstat(ctx / "links/rel").st_mtime == CONTEXT_MTIME

    ctx = materialise_context("copy_empty_dirs", tmp_path / "d")
    assert list((ctx / "empty").iterdir()) == [] and _mode(ctx / "tree/a/empty-sub") == 0o700

    ctx = materialise_context("copy_file_to_file", tmp_path / "e")  # exec bit from the checkout
    assert _mode(ctx / "script.sh") == 0o755 and _mode(ctx / "a.txt") == 0o644


def test_materialise_archives(tmp_path: Path) -> None:
    ctx = materialise_context("add_archives", tmp_path)
    with tarfile.open(ctx / "a.tar") as t:
        members = {m.name: m for m in t.getmembers()}
    assert members["top/f.txt"].uid == 1000 and members["top/f.txt"].mode == 0o640
    assert members["top/hard"].islnk() and members["top/link"].issym()
    for name in ("b.tar.gz", "c.tar.xz", "d.tar.bz2"):
        with tarfile.open(ctx / name) as t:
            assert t.getnames()
    assert (ctx / "fake.tar.gz").read_bytes() == b"not an archive\n"
    spec = load_case("add_archives").spec["context"][1]
    assert archive_bytes(spec) == archive_bytes(spec), "archives are reproducible"


def test_serve_http_sends_last_modified() -> None:
    files = {"x.txt": {"content": "hi\n", "last_modified": "Wed, 21 Oct 2015 07:28:00 GMT"}}
    with serve_http(files) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
        with opener.open(srv.url + "/x.txt", timeout=10) as resp:
            assert resp.read() == b"hi\n"
            assert resp.headers["Last-Modified"] == "Wed, 21 Oct 2015 07:28:00 GMT"
        assert srv.requests == ["/x.txt"]


# -- normalising real reference output -------------------------------------------------------------------------
def test_docker_archive_fixture_normalises_to_the_expectation() -> None:
    expected = load_case("from_scratch").expected()
    actual = normalise_archive(DOCKER_FIXTURE, EMPTY_BASE)
    assert compare(expected, actual) == []
    # byte-for-byte the same normalisation, except that without build_started no mtime is "build-time"
    for exp_layer, act_layer in zip(expected["layers"], actual["layers"], strict=True):
        for e, a in zip(exp_layer["entries"], act_layer["entries"], strict=True):
            assert {**a, "mtime": e["mtime"]} == e if e["mtime"] == BUILD_TIME else a == e
    assert [h["created_by"] for h in actual["history"]] == [
        "COPY rootfs/ / # buildkit",
        "COPY a.txt /home/app/ # buildkit",
        'CMD ["/bin/app"]',
    ]


def test_oci_layout_fixture_from_buildah() -> None:
    expected = load_case("from_scratch").expected()
    actual = normalise_archive(OCI_FIXTURE, None)
    assert compare(expected, actual, ignore=BUILDER_IGNORES) == expected["buildah"]["differences"]
    assert actual["config"]["Labels"] == {"io.buildah.version": "1.28.2"}
    files = {e["path"]: e for e in actual["delta"]["entries"]}
    assert files["lib/alias.so.1"]["hardlink_group"] == files["lib/libapp.so.1"]["hardlink_group"] == "lib/alias.so.1"
    assert files["lib/libapp.so"] == {**files["lib/libapp.so"], "type": "symlink", "linkname": "libapp.so.1"}
    assert files["etc/config"]["mode"] == "0600" and files["home/app/a.txt"]["uid"] == 1000


def test_fixtures_are_small() -> None:
    for p in FIXTURES_DIR.iterdir():
        assert p.stat().st_size < 100_000, p


# -- the normaliser on synthetic images: base, whiteouts, hardlinks, restated parents -----------------------------
def _docker_archive(path: Path, layers: list[bytes], history: list[dict[str, Any]], config: dict[str, Any]) -> Path:
    import hashlib

    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    doc = {"config": config, "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": history}
    cfg = json.dumps(doc).encode()
    names = [f"{i}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["t:latest"], "Layers": names}]).encode()
    entries = [rootfs.file("manifest.json", manifest), rootfs.file("config.json", cfg)]
    entries += [rootfs.file(n, b) for n, b in zip(names, layers, strict=True)]
    return rootfs.make_tar(path, entries)


def test_normalise_delta_against_a_base(tmp_path: Path) -> None:
    base_layer = rootfs.build_tar(
        [
            rootfs.directory("etc"),
            rootfs.file("etc/passwd", b"root\n"),
            rootfs.directory("var"),
            rootfs.directory("var/cache"),
            rootfs.file("var/cache/x", b"x"),
            rootfs.file("gone", b"bye"),
        ]
    )
    base_hist = [{"created_by": "base"}]
    base = base_info(_docker_archive(tmp_path / "base.tar", [base_layer], base_hist, {"Cmd": ["sh"]}))
    assert set(base.listing) == {"etc", "etc/passwd", "var", "var/cache", "var/cache/x", "gone"}

    layer = rootfs.build_tar(
        [
            rootfs.directory("etc", mtime=1_800_000_000),  # a restated parent: only its mtime differs
            rootfs.file("etc/new", b"new", mode=0o600, uid=5, gid=6),
            rootfs.hardlink("etc/new2", "etc/new"),
            rootfs.whiteout("gone"),
            rootfs.opaque_whiteout("var/cache"),
            rootfs.file("var/cache/y", b"y"),
            rootfs.symlink("link", "/etc/new"),
        ]
    )
    hist = [*base_hist, {"created_by": "COPY x # buildkit"}, {"created_by": "ENV A=1", "empty_layer": True}]
    image = _docker_archive(tmp_path / "img.tar", [base_layer, layer], hist, {"Env": ["A=1"], "Cmd": ["sh"]})
    result = normalise_archive(image, base, build_started=1_799_999_999)

    assert result["history"] == [
        {"created_by": "COPY x # buildkit", "empty_layer": False, "comment": None},
        {"created_by": "ENV A=1", "empty_layer": True, "comment": None},
    ]
    assert result["config"]["Env"] == ["A=1"] and result["config"]["Labels"] is None
    entries = {e["path"]: e for e in result["layers"][0]["entries"] if e["type"] not in ("whiteout", "opaque")}
    assert entries["etc"]["restates"] is True and entries["etc"]["mtime"] == BUILD_TIME
    assert entries["etc/new2"]["type"] == "hardlink" and entries["etc/new2"]["hardlink_group"] == "etc/new"
    delta = {e["path"]: e for e in result["delta"]["entries"]}
    assert set(delta) == {"etc/new", "etc/new2", "var/cache/y", "link"}
    assert delta["etc/new"] == {
        "path": "etc/new",
        "type": "file",
        "mode": "0600",
        "uid": 5,
        "gid": 6,
        "size": 3,
        "sha256": "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd85c67c9b8431b36fff21c437",
        "hardlink_group": "etc/new",
        "mtime": rootfs.FIXED_MTIME,
    }
    assert delta["etc/new2"]["sha256"] == delta["etc/new"]["sha256"]
    assert result["delta"]["deleted"] == ["gone", "var/cache/x"]

    with pytest.raises(ValueError, match="does not start with the base"):
        normalise_archive(_docker_archive(tmp_path / "other.tar", [layer], hist, {}), base)


def test_read_layer_handles_compression_and_root_entries(tmp_path: Path) -> None:
    data = rootfs.build_tar([rootfs.directory("."), rootfs.file("./a", b"a", mode=0o100755)])
    import gzip

    for blob in (data, gzip.compress(data)):
        from tests.conformance.harness import _open_stream

        entries = read_layer(_open_stream(io.BytesIO(blob)))
        assert [(e["path"], e["mode"]) for e in entries] == [("a", "0755")]


def test_base_rootfs_has_the_users_the_cases_need(tmp_path: Path) -> None:
    with tarfile.open(make_base_rootfs(tmp_path / "b.tar")) as t:
        passwd = t.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        group = t.extractfile("etc/group").read().decode()  # type: ignore[union-attr]
    assert "app:x:1000:1000:" in passwd and "svc:x:1001:50:" in passwd
    assert "staff:x:50:" in group and "other:x:2000:" in group


# -- comparing -----------------------------------------------------------------------------------------------
def test_compare_reports_each_kind_of_difference() -> None:
    expected = load_case("copy_chown_names").expected()
    assert compare(expected, expected) == []
    actual = copy.deepcopy(expected)
    entry = next(e for e in actual["delta"]["entries"] if e["path"] == "names/svc")
    entry["gid"] = 1001
    actual["delta"]["entries"] = [e for e in actual["delta"]["entries"] if e["path"] != "names/nobody"]
    actual["config"]["Env"] = [*actual["config"]["Env"], "X=1"]
    actual["history"][0]["created_by"] = "ADD --chown=app:app a.txt /names/app-app # buildkit"
    actual["history"][1]["created_by"] = "COPY --chown=app a.txt /names/app # buildkit"  # wording only
    actual["layers"][0]["entries"][1]["mtime"] = 1
    diffs = compare(expected, actual)
    assert "delta: /names/svc: gid expected 50, got 1001" in diffs
    assert any(d.startswith("delta: /names/nobody missing") for d in diffs)
    assert any(d.startswith("config.Env: expected") for d in diffs)
    assert any(d.startswith("history[0].created_by: expected a COPY entry") for d in diffs)
    assert not any(d.startswith("history[1]") for d in diffs)
    strict = {k: v for k, v in DEFAULT_IGNORES.items() if k != "history.created_by.wording"}
    assert any(d.startswith("history[1].created_by: expected") for d in compare(expected, actual, ignore=strict))
    assert "layers[0]: /names/app-app: mtime expected 1650000000, got 1" in diffs
    assert not any("history[0].created_by" in d for d in compare(expected, actual, ignore={"history.created_by": ""}))


def test_compare_tolerates_builder_specific_details() -> None:
    expected = load_case("copy_file_to_file").expected()
    actual = copy.deepcopy(expected)
    for layer in actual["layers"]:
        # a builder that writes no entries for unchanged parent directories, and its own clock
        layer["entries"] = [e for e in layer["entries"] if not e.get("restates")]
        for e in layer["entries"]:
            if e["mtime"] == BUILD_TIME:
                e["mtime"] = 1_234_567_890
    for h in actual["history"]:
        h["comment"] = "imgci"
    assert compare(expected, actual) == []
    # but a missing layer or a different empty_layer flag is a difference
    actual["history"][0]["empty_layer"] = True
    actual["layers"].pop()
    diffs = compare(expected, actual)
    assert "layers: expected 4, got 3" in diffs
    assert any("empty_layer expected False, got True" in d for d in diffs)


def test_cases_dir_has_only_cases() -> None:
    for p in CASES_DIR.iterdir():
        assert (p / "Dockerfile").is_file() and (p / "case.json").is_file(), p
