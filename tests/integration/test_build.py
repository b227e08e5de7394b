"""`imgci build` end to end through the CLI: stages, outputs, determinism, concurrency, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from imgci.oci import Manifest
from imgci.store import Store
from tests.conftest import Imgci
from tests.infra.faultproxy import FaultProxy, delay
from tests.infra.registry import RegistryServer


def _context(tmp_path: Path, dockerfile: str, files: dict[str, bytes | str] | None = None) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(textwrap.dedent(dockerfile).lstrip())
    for name, data in (files or {}).items():
        p = ctx / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return ctx


def _config(imgci: Imgci, name: str) -> dict:
    return json.loads(imgci.run("inspect", name, "--type", "config").stdout)


def _files(imgci: Imgci, name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"unpacked-{name.replace('/', '_').replace(':', '_')}"
    imgci.run("unpack", name, "-o", str(out))
    return out


def test_multi_stage_copy_and_metadata(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ctx = _context(
        tmp_path,
        f"""
        ARG BASE={busybox}
        FROM $BASE AS base
        ENV APP=/app GREETING="hello world"
        WORKDIR $APP
        COPY a.txt ./
        COPY sub/ ./sub/
        LABEL org.example.stage=base
        EXPOSE 8080 53/udp
        FROM base AS final
        COPY --from=base --chown=nobody:nogroup $APP/a.txt /copied.txt
        USER nobody
        ENTRYPOINT ["sh", "-c"]
        CMD ["echo $GREETING"]
        STOPSIGNAL SIGTERM
        HEALTHCHECK --interval=5s --retries=2 CMD true
        """,
        {"a.txt": "A\n", "sub/b.txt": "B\n"},
    )
    imgci.run("build", "-t", "test/multi:1", str(ctx))
    cfg = _config(imgci, "test/multi:1")
    c = cfg["config"]
    assert "APP=/app" in c["Env"] and "GREETING=hello world" in c["Env"]
    assert c["WorkingDir"] == "/app"
    assert c["User"] == "nobody"
    assert c["Entrypoint"] == ["sh", "-c"] and c["Cmd"] == ["echo $GREETING"]
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert c["Labels"] == {"org.example.stage": "base"}
    assert c["StopSignal"] == "SIGTERM"
    assert c["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 5_000_000_000, "Retries": 2}
    created_by = [h["created_by"] for h in cfg["history"]]
    assert "COPY a.txt ./ # buildkit" in created_by
    root = _files(imgci, "test/multi:1", tmp_path)
    assert (root / "app" / "a.txt").read_text() == "A\n"
    assert (root / "app" / "sub" / "b.txt").read_text() == "B\n"
    assert (root / "copied.txt").read_text() == "A\n"
    if os.geteuid() == 0:
        st = (root / "copied.txt").stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534)  # resolved from the image's own passwd/group


def test_same_input_twice_gives_the_same_digest_with_source_date_epoch(
    imgci_factory: Callable[[], Imgci], busybox_tar: Path, tmp_path: Path
) -> None:
    ctx = _context(tmp_path, "FROM localhost/busybox:latest\nCOPY . /src/\nENV X=1\n", {"f": "data", "d/g": "more"})
    digests = []
    for i in range(2):
        cli = imgci_factory()
        cli.env["SOURCE_DATE_EPOCH"] = "1700000000"
        cli.run("import", str(busybox_tar), "localhost/busybox:latest")
        os.utime(ctx / "f", None)  # a newer mtime is clamped to SOURCE_DATE_EPOCH: no difference
        iid = tmp_path / f"iid{i}"
        cli.run("build", "--iidfile", str(iid), str(ctx))
        digests.append(iid.read_text())
    assert digests[0] == digests[1]
    assert digests[0].startswith("sha256:")


def test_independent_stages_overlap_in_time(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    big = {"one.bin": os.urandom(12 << 20), "two.bin": os.urandom(12 << 20)}
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox} AS one
        COPY one.bin /one.bin
        FROM {busybox} AS two
        COPY two.bin /two.bin
        FROM {busybox}
        COPY --from=one /one.bin /a
        COPY --from=two /two.bin /b
        """,
        big,
    )
    proc = imgci.run("build", "--progress", "json", "-t", "test/parallel:1", str(ctx))
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    spans = {}
    for e in events:
        if e["event"] in ("started", "done"):
            spans.setdefault(e["name"], {})[e["event"]] = e["time"]
    one = next(v for k, v in spans.items() if k.startswith("[one 2/2] COPY"))
    two = next(v for k, v in spans.items() if k.startswith("[two 2/2] COPY"))
    assert one["started"] < two["done"] and two["started"] < one["done"], spans


def test_outputs_iidfile_and_metadata(imgci: Imgci, busybox: str, tmp_path: Path, registry: RegistryServer) -> None:
    ctx = _context(tmp_path, f"FROM {busybox}\nCOPY f /f\n", {"f": "x"})
    name = f"{registry.host}/build/out:1"
    meta = tmp_path / "meta.json"
    iid = tmp_path / "iid"
    oci = tmp_path / "image-oci.tar"
    docker = tmp_path / "image-docker.tar"
    local = tmp_path / "rootfs"
    imgci.run(
        "build",
        "-t",
        name,
        "--push",
        "--iidfile",
        str(iid),
        "--metadata-file",
        str(meta),
        "--output",
        f"type=oci,dest={oci}",
        "--output",
        f"type=local,dest={local}",
        str(ctx),
    )
    digest = iid.read_text()
    doc = json.loads(meta.read_text())
    assert doc["containerimage.digest"] == digest
    assert doc["image.name"] == name
    assert doc["containerimage.config.digest"].startswith("sha256:")
    assert doc["imgci.pushed"] == [name]
    assert 0 < doc["imgci.push_duration"] < 60  # the seconds the push took, part of the command's time
    assert (local / "f").read_text() == "x"
    with tarfile.open(oci) as t:
        assert "index.json" in t.getnames()
    fresh = Imgci(state=tmp_path / "pull-state", docker_config=imgci.docker_config)
    assert f"Digest: {digest}" in fresh.run("pull", name).stdout
    imgci.run("build", "-q", "--output", f"type=docker,dest={docker}", str(ctx))
    with tarfile.open(docker) as t:
        manifest = json.loads(t.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert len(manifest[0]["Layers"]) == 2


@pytest.mark.parametrize("helper", ["1", "0"])
def test_build_push_from_the_helper_process_or_in_process(
    imgci: Imgci, busybox: str, tmp_path: Path, basic_registry: RegistryServer, helper: str
) -> None:
    """``build --push`` pushes from a forked helper (IMGCI_PUSH_HELPER=1, the default) or from the build process
    (0): the same image in the registry, the same errors (a registry that wants a login)."""
    assert basic_registry.ca_path is not None
    imgci.trust(basic_registry.ca_path, tmp_path)
    imgci.env["IMGCI_PUSH_HELPER"] = helper
    imgci.env["SOURCE_DATE_EPOCH"] = "0"
    ctx = _context(tmp_path, f"FROM {busybox}\nCOPY f /f\n", {"f": "pushed"})
    name = f"{basic_registry.host}/helper/app:{helper}"
    err = imgci.fails("build", "--push", "-t", name, str(ctx))
    assert "imgci login" in err and basic_registry.host in err  # not logged in yet
    imgci.run("login", basic_registry.host, "-u", "testuser", "--password-stdin", input="testpass\n")
    meta = tmp_path / "meta.json"
    imgci.run("build", "--push", "-t", name, "--metadata-file", str(meta), str(ctx))
    doc = json.loads(meta.read_text())
    assert doc["imgci.pushed"] == [name] and doc["imgci.push_duration"] > 0
    fresh = Imgci(state=tmp_path / "pull-state", docker_config=imgci.docker_config)
    fresh.trust(basic_registry.ca_path, tmp_path)
    assert f"Digest: {doc['containerimage.digest']}" in fresh.run("pull", name).stdout
    again = imgci.run("build", "--push", "-t", name, str(ctx))  # warm: the tag names this digest already
    assert again.returncode == 0


def test_build_push_sends_the_image_layers_while_later_steps_run(
    imgci: Imgci, busybox: str, tmp_path: Path, proxy: FaultProxy
) -> None:
    """Each layer of the image goes to the registry once the build has it (a later RUN still running), each
    blob once; an intermediate stage's layer never; a build that turned out cached sends no blob at all."""
    imgci.env["SOURCE_DATE_EPOCH"] = "0"  # the same layers when built again
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox} AS side
        RUN echo side > /side
        FROM {busybox}
        COPY --from=side /side /side
        COPY f /f
        RUN sleep 2 && cat /f > /g
        """,
        {"f": "x"},
    )
    first = f"{proxy.host}/eager/a:1"
    imgci.run("build", "--push", "-t", first, str(ctx))
    store = Store(imgci.state)
    manifest = Manifest.parse(store.read_blob(store.get_ref(first).digest))
    image_blobs = [manifest.config.digest, *(d.digest for d in manifest.layers)]
    uploaded = [r.path for r in proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert sorted(re.search(r"digest=sha256(?::|%3A)(\w+)", p).group(1) for p in uploaded) == sorted(  # type: ignore[union-attr]
        d.hex for d in image_blobs
    )  # each of the image's blobs once, and nothing else (not the side stage's layer)
    assert proxy.count("HEAD", r"/blobs/") <= len(image_blobs)

    before = len(proxy.requests)
    imgci.run("build", "--push", "-t", first, str(ctx))  # all cached: the tag names this image already
    after = [(r.method, r.path) for r in proxy.requests[before:]]
    assert ("HEAD", "/v2/eager/a/manifests/1") in after
    assert [r for r in after if "/blobs/" in r[1]] == []

    # Again without the cache, to another repository: the COPY f layer is mounted from eager/a — that mount
    # answers after 1.5 s, and still the push after the build is short: it went during the 2 s RUN.
    copy_f = manifest.layers[-2].digest
    proxy.add_fault("POST", rf"/v2/eager/b/blobs/uploads/\?mount=sha256(:|%3A){copy_f.hex}", action=delay(1.5))
    meta = tmp_path / "meta.json"
    second = f"{proxy.host}/eager/b:1"
    imgci.run("build", "--no-cache", "--push", "-t", second, "--metadata-file", str(meta), str(ctx))
    doc = json.loads(meta.read_text())
    assert doc["containerimage.digest"] == store.get_ref(first).digest.value  # the same image
    assert proxy.count("POST", rf"/v2/eager/b/blobs/uploads/\?mount=sha256(:|%3A){copy_f.hex}") == 1
    assert doc["imgci.push_duration"] < 1.0, doc


def test_dockerfile_from_stdin_and_elsewhere_and_dockerignore(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ctx = _context(
        tmp_path,
        "",
        {
            "keep.txt": "k",
            "skip.log": "s",
            "sub/x.log": "x",
            "sub/y.txt": "y",
            ".dockerignore": "**/*.log\n!sub/x.log\n",
        },
    )
    (ctx / "Dockerfile").unlink()
    other = tmp_path / "elsewhere.Dockerfile"
    other.write_text(f"FROM {busybox}\nCOPY . /c/\n")
    imgci.run("build", "-f", str(other), "-t", "test/ignore:1", str(ctx))
    root = _files(imgci, "test/ignore:1", tmp_path)
    names = sorted(str(p.relative_to(root / "c")) for p in (root / "c").rglob("*"))
    assert names == [".dockerignore", "keep.txt", "sub", "sub/x.log", "sub/y.txt"]
    proc = subprocess.run(
        [sys.executable, "-m", "imgci", "build", "-q", "-f", "-", str(ctx)],
        input=f"FROM {busybox}\nLABEL from=stdin\n",
        capture_output=True,
        text=True,
        env=imgci.environ(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("sha256:")


def test_onbuild_triggers_fire_in_the_child(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    parent = _context(tmp_path, f"FROM {busybox}\nONBUILD COPY trigger.txt /from-trigger.txt\nONBUILD ENV T=1\n")
    imgci.run("build", "-t", "test/onbuild-parent:1", str(parent))
    assert _config(imgci, "test/onbuild-parent:1")["config"]["OnBuild"] == [
        "COPY trigger.txt /from-trigger.txt",
        "ENV T=1",
    ]
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    (child_dir / "trigger.txt").write_text("fired")
    (child_dir / "Dockerfile").write_text("FROM test/onbuild-parent:1\n")
    imgci.run("build", "-t", "test/onbuild-child:1", str(child_dir))
    cfg = _config(imgci, "test/onbuild-child:1")["config"]
    assert "T=1" in cfg["Env"] and not cfg.get("OnBuild")
    assert (_files(imgci, "test/onbuild-child:1", tmp_path) / "from-trigger.txt").read_text() == "fired"


def test_target_builds_only_what_it_needs(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox} AS unused
        COPY missing-file-never-read /x
        FROM {busybox} AS wanted
        LABEL stage=wanted
        FROM wanted AS last
        LABEL stage=last
        """,
    )
    proc = imgci.run("build", "--target", "wanted", "--progress", "plain", "-t", "test/target:1", str(ctx))
    assert "unused" not in proc.stderr
    assert _config(imgci, "test/target:1")["config"]["Labels"] == {"stage": "wanted"}
    err = imgci.fails("build", "--target", "wantd", str(ctx), code=1)
    assert 'target stage "wantd" could not be found' in err and "did you mean wanted" in err


@pytest.mark.parametrize(
    ("dockerfile", "line", "message"),
    [
        ("FROM {b}\nCOPPY a /a\n", 2, "did you mean COPY"),
        ("", 0, "cannot be empty"),
        ("FROM {b}\nSHELL sh -c\n", 2, "SHELL"),
        ("FROM {b}\nCOPY <<EOF /x\nunterminated\n", 2, "heredoc"),
        ("FROM {b}\nENV A=${{NOPE:?must_be_set}}\n", 2, "must_be_set"),
        ("FROM {b}\nCOPY does-not-exist /x\n", 2, "does-not-exist"),
        ("FROM {b}\nCOPY --from=7 /x /y\n", 2, "stage index"),
        ("FROM {b} AS a\nCOPY --from=b /x /y\nFROM {b} AS b\nCOPY --from=a /x /y\n", 2, "stage"),
        ("FROM {b}\nCOPY --chmod=999 f /f\n", 2, "chmod"),
        ("FROM {b}\nCOPY --chown=nosuchuser f /f\n", 2, "nosuchuser"),
        ("FROM {b}\nRUN exit 3\n", 2, "exit code 3"),
    ],
)
def test_bad_dockerfiles_name_file_and_line(
    imgci: Imgci, busybox: str, tmp_path: Path, dockerfile: str, line: int, message: str
) -> None:
    ctx = _context(tmp_path, "", {"f": "x"})
    (ctx / "Dockerfile").write_text(dockerfile.format(b=busybox))
    err = imgci.fails("build", str(ctx))
    where = f"{ctx / 'Dockerfile'}:{line}:" if line else f"{ctx / 'Dockerfile'}:"
    assert where in err, err
    assert message.lower() in err.lower(), err
    assert imgci.run("ls", "-q").stdout.split() == [busybox]  # nothing half-built was tagged


def test_missing_base_image_names_registry_and_reference(
    imgci: Imgci, tmp_path: Path, registry: RegistryServer
) -> None:
    ref = f"{registry.host}/no/such-image:1"
    ctx = _context(tmp_path, f"FROM {ref}\n")
    err = imgci.fails("build", str(ctx))
    assert ref in err and registry.host in err


def test_base_image_only_in_the_registry_is_pulled(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, tmp_path: Path, registry: RegistryServer
) -> None:
    remote = f"{registry.host}/build/base:1"
    imgci.run("tag", busybox, remote)
    imgci.run("push", remote)
    fresh = imgci_factory()  # an empty store: the base must come from the registry
    ctx = _context(tmp_path, f"FROM {remote}\nCOPY f /f\n", {"f": "pulled base"})
    fresh.run("build", "-t", "test/from-registry:1", str(ctx))
    assert sorted(fresh.run("ls", "-q").stdout.split()) == sorted([remote, "test/from-registry:1"])
    assert (_files(fresh, "test/from-registry:1", tmp_path) / "bin" / "busybox").exists()


def test_a_build_from_local_images_imports_no_http_or_ci_stack(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    """Start-up is a cost of every build: a build whose base image is in the store never imports requests (the
    registry client), PyGithub, pydantic or PyYAML (PYTHONPROFILEIMPORTTIME lists every module imported)."""
    ctx = tmp_path / "lazy"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {busybox}\nENV A=1\nCOPY Dockerfile /d\n")
    imgci.env["PYTHONPROFILEIMPORTTIME"] = "1"
    for _ in range(2):  # cold, then cached
        proc = imgci.run("build", "-q", str(ctx))
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "imgci.build.builder" in imported  # the listing is there
        for heavy in ("requests", "github", "pydantic", "yaml"):
            assert heavy not in imported, f"{heavy} was imported by a build from local images"
