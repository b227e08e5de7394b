"""The image commands end to end, through the CLI, against real registries (plain, TLS, Basic, token)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Imgci
from tests.infra.faultproxy import FaultProxy
from tests.infra.registry import RegistryServer


def _digest_of(imgci: Imgci, name: str) -> str:
    out = json.loads(imgci.run("ls", "--format", "json").stdout)
    matches = [i["digest"] for i in out if i["name"].endswith(name) or i["name"] == name]
    assert matches, out
    return str(matches[0])


def test_import_ls_inspect_unpack(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ls = imgci.run("ls").stdout.splitlines()
    assert ls[0].split() == ["NAME", "SIZE", "CREATED", "AT", "UPDATED", "AT", "DIGEST"]
    assert ls[1].startswith("localhost/busybox:latest")
    assert "sha256:" in ls[1]
    doc = json.loads(imgci.run("inspect", busybox).stdout)
    assert doc["Config"]["config"]["Cmd"] == ["sh"]
    assert doc["Config"]["rootfs"]["type"] == "layers"
    assert len(doc["Manifest"]["layers"]) == 1

    target = tmp_path / "rootfs"
    out = imgci.run("unpack", busybox, "-o", str(target)).stdout
    assert f"to: {target}" in out
    assert (target / "bin" / "sh").is_symlink()
    run = subprocess.run([str(target / "bin" / "sh"), "-c", "echo unpacked ok"], capture_output=True, text=True)
    assert run.stdout.strip() == "unpacked ok"
    # unpacking into a non-empty directory is refused, nothing is touched
    imgci.fails("unpack", busybox, "-o", str(target), code=2)


def test_tag_rm_prune_du(imgci: Imgci, busybox: str) -> None:
    out = imgci.run("tag", busybox, "example.com/team/app:v1").stdout
    assert "Successfully tagged" in out
    names = imgci.run("ls", "-q").stdout.split()
    assert names == ["example.com/team/app:v1", "localhost/busybox:latest"]
    filtered = imgci.run("ls", "-q", "--filter", "reference=example.com/*").stdout.split()
    assert filtered == ["example.com/team/app:v1"]

    imgci.run("rm", "example.com/team/app:v1")
    assert imgci.run("ls", "-q").stdout.split() == ["localhost/busybox:latest"]
    blobs_before = len(list((imgci.state / "blobs" / "sha256").iterdir()))
    assert blobs_before == 3  # the other tag shared every blob: nothing was deleted

    du = imgci.run("du").stdout
    assert "layer 1/1 of localhost/busybox:latest" in du
    assert "Reclaimable:\t0B" in du

    imgci.run("rm", busybox)
    assert imgci.run("ls", "-q").stdout.split() == []
    assert list((imgci.state / "blobs" / "sha256").iterdir()) == []
    assert "ok: 0 blobs" in imgci.run("fsck").stdout
    imgci.fails("rm", busybox)


def _push_pull_round_trip(src: Imgci, dst: Imgci, busybox: str, reg: RegistryServer, repo: str) -> str:
    name = f"{reg.host}/{repo}:1"
    src.run("tag", busybox, name)
    out = src.run("push", name).stdout
    assert "Successfully pushed" in out
    digest = _digest_of(src, name)
    assert digest in out
    pulled = dst.run("pull", name).stdout
    assert f"Digest: {digest}" in pulled
    assert _digest_of(dst, name) == digest
    assert "ok:" in dst.run("fsck").stdout
    return digest


def test_push_pull_plain_http(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, registry: RegistryServer
) -> None:
    _push_pull_round_trip(imgci, imgci_factory(), busybox, registry, "plain/busybox")


def test_push_pull_tls_with_trusted_ca(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, tls_registry: RegistryServer, tmp_path: Path
) -> None:
    assert tls_registry.ca_path is not None
    name = f"{tls_registry.host}/tls/busybox:1"
    imgci.run("tag", busybox, name)
    err = imgci.fails("push", name)  # the test CA is not trusted yet
    assert "certificate" in err.lower() or "tls" in err.lower()
    imgci.trust(tls_registry.ca_path, tmp_path)
    other = imgci_factory()
    other.trust(tls_registry.ca_path, tmp_path)
    _push_pull_round_trip(imgci, other, busybox, tls_registry, "tls/busybox")


def test_push_pull_tls_with_the_ca_in_certs_d(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, tls_registry: RegistryServer, tmp_path: Path
) -> None:
    """docker's layout: ``certs.d/HOST:PORT/ca.crt`` trusts a CA for that registry only, on top of the system's."""
    assert tls_registry.ca_path is not None
    certs_d = tmp_path / "config" / "imgci" / "certs.d"
    name = f"{tls_registry.host}/certsd/busybox:1"
    imgci.run("tag", busybox, name)
    imgci.env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # ~/.config/imgci/certs.d
    (certs_d / "127.0.0.1:1").mkdir(parents=True)  # another registry's directory: not used for this one
    (certs_d / "127.0.0.1:1" / "ca.crt").write_bytes(tls_registry.ca_path.read_bytes())
    err = imgci.fails("push", name)
    assert "certificate" in err.lower(), err
    host_dir = certs_d / tls_registry.host
    host_dir.mkdir()
    (host_dir / "ca.crt").write_text("not a certificate\n")
    err = imgci.fails("push", name)  # a broken CA file: named, no traceback
    assert str(host_dir / "ca.crt") in err, err
    (host_dir / "ca.crt").write_bytes(tls_registry.ca_path.read_bytes())
    other = imgci_factory()
    other.env["IMGCI_CERTS_D"] = str(certs_d)  # the same, through the variable
    _push_pull_round_trip(imgci, other, busybox, tls_registry, "certsd/busybox")


def test_login_push_pull_basic_auth(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, basic_registry: RegistryServer, tmp_path: Path
) -> None:
    assert basic_registry.ca_path is not None and basic_registry.password is not None
    imgci.trust(basic_registry.ca_path, tmp_path)
    name = f"{basic_registry.host}/auth/busybox:1"
    imgci.run("tag", busybox, name)
    err = imgci.fails("push", name)
    assert "imgci login" in err and basic_registry.host in err

    bad = imgci.fails("login", basic_registry.host, "-u", "testuser", "--password-stdin", input="wrong\n")
    assert "wrong" not in bad
    out = imgci.run("login", basic_registry.host, "-u", "testuser", "--password-stdin", input="testpass\n")
    assert "Login Succeeded" in out.stdout
    assert "testpass" not in out.stdout + out.stderr
    config = json.loads((imgci.docker_config / "config.json").read_text())
    assert basic_registry.host in json.dumps(config["auths"])
    assert (imgci.docker_config / "config.json").stat().st_mode & 0o077 == 0

    other = imgci_factory()  # shares the docker config, so it is logged in too
    other.trust(basic_registry.ca_path, tmp_path)
    _push_pull_round_trip(imgci, other, busybox, basic_registry, "auth/busybox")

    imgci.run("logout", basic_registry.host)
    assert basic_registry.host not in (imgci.docker_config / "config.json").read_text()
    err = imgci.fails("pull", name)
    assert "imgci login" in err


def test_push_pull_token_auth(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, token_registry: RegistryServer
) -> None:
    name = f"{token_registry.host}/token/busybox:1"
    imgci.run("tag", busybox, name)
    err = imgci.fails("push", name)  # anonymous may pull but not push
    assert "imgci login" in err or "denied" in err.lower() or "not allowed" in err.lower()
    imgci.run("login", token_registry.host, "-u", "testuser", "--password-stdin", input="testpass\n")
    src_digest = _push_pull_round_trip(imgci, imgci_factory(), busybox, token_registry, "token/busybox")
    # anonymous pull is allowed by the token server's policy
    anon = Imgci(state=imgci.state.parent / "anon-state", docker_config=imgci.state.parent / "anon-docker")
    anon.docker_config.mkdir()
    assert f"Digest: {src_digest}" in anon.run("pull", name).stdout
    assert token_registry.token_server is not None
    assert any(s.startswith("repository:token/busybox:") for s in token_registry.token_server.scopes)


def test_repush_uploads_no_blob(imgci: Imgci, busybox: str, registry: RegistryServer) -> None:
    with FaultProxy(registry.url) as proxy:
        name = f"{proxy.host}/repush/busybox:1"
        imgci.run("tag", busybox, name)
        first = imgci.run("push", name).stdout
        assert "Uploaded 2 blobs" in first  # config + layer
        uploads = proxy.count("POST", r"/blobs/uploads/")
        assert uploads == 2
        proxy.clear()
        second = imgci.run("push", name).stdout
        assert "Uploaded 0 blobs" in second
        assert proxy.count("POST", r"/blobs/uploads/") == 0
        assert proxy.count("PATCH") == 0
        assert proxy.count("PUT", r"/blobs/") == 0


def test_save_docker_archive_layout_and_oci_round_trip(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, tmp_path: Path
) -> None:
    digest = _digest_of(imgci, busybox)
    archive = tmp_path / "busybox-docker.tar"
    imgci.run("save", busybox, "-o", str(archive))
    inspect = json.loads(imgci.run("inspect", busybox).stdout)
    diff_ids = inspect["Config"]["rootfs"]["diff_ids"]
    with tarfile.open(archive) as tar:
        manifest_member = tar.extractfile("manifest.json")
        assert manifest_member is not None
        manifest = json.loads(manifest_member.read())
        assert manifest[0]["RepoTags"] == ["localhost/busybox:latest"]
        config_member = tar.extractfile(manifest[0]["Config"])
        assert config_member is not None
        assert json.loads(config_member.read())["rootfs"]["diff_ids"] == diff_ids
        # every layer is an uncompressed tar whose sha256 is the config's diff_id (what docker load checks)
        import hashlib

        for layer_path, diff_id in zip(manifest[0]["Layers"], diff_ids, strict=True):
            member = tar.extractfile(layer_path)
            assert member is not None
            data = member.read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == diff_id
            with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                assert "bin/busybox" in {m.name.lstrip("./") for m in layer.getmembers()}

    oci = tmp_path / "busybox-oci.tar"
    imgci.run("save", "--format", "oci", busybox, "-o", str(oci))
    fresh = imgci_factory()
    loaded = fresh.run("load", "-i", str(oci)).stdout
    assert "Loaded image" in loaded
    assert _digest_of(fresh, busybox) == digest

    # save to stdout, load from stdin
    stream = subprocess.run(
        [*_cli(imgci), "save", busybox], capture_output=True, env=imgci.environ(), check=True
    ).stdout
    again = imgci_factory()
    subprocess.run([*_cli(again), "load"], input=stream, env=again.environ(), check=True, capture_output=True)
    assert _digest_of(again, busybox) == digest


def _cli(imgci: Imgci) -> list[str]:
    import sys

    return [sys.executable, "-m", "imgci"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pull", "Not/Valid"], "invalid reference format"),
        (["pull", "busybox@sha256:../x"], "invalid reference format"),
        (["tag", "missing:1", "x:1"], "not in the local store"),
        (["inspect", "nothing"], "not in the local store"),
        (["ls", "--filter", "nokey"], "invalid filter"),
    ],
)
def test_bad_input_is_a_clear_error(imgci: Imgci, args: list[str], message: str) -> None:
    proc = imgci.run(*args, check=False)
    assert proc.returncode in (1, 2)
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_unreachable_registry_names_the_registry(imgci: Imgci) -> None:
    from tests.infra.registry import free_port

    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    err = imgci.fails("--retries", "2", "pull", f"{host}/nothing/here:1")
    assert "2 attempts" in err
    assert host in err


def test_unknown_registry_host_is_clear_and_not_retried(imgci: Imgci, tmp_path: Path) -> None:
    """Name resolution limited to /etc/hosts (in a private mount namespace), so no DNS query leaves the machine."""
    import time

    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("hosts: files\n")
    script = f'mount --bind "{nsswitch}" /etc/nsswitch.conf && exec "$@"'
    start = time.monotonic()
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            *_cli(imgci),
            "pull",
            "no-such-registry.example:5000/app:1",
        ],
        capture_output=True,
        text=True,
        env=imgci.environ(),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no-such-registry.example:5000" in proc.stderr
    assert "cannot resolve the host name" in proc.stderr
    assert time.monotonic() - start < 10  # not retried with backoff


def test_pull_explicit_platform_mismatch_is_refused(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], busybox: str, registry: RegistryServer
) -> None:
    name = f"{registry.host}/platform/busybox:1"
    imgci.run("tag", busybox, name)
    imgci.run("push", name)
    host_arch = json.loads(imgci.run("inspect", name, "--type", "config").stdout)["architecture"]
    other = "arm64" if host_arch != "arm64" else "amd64"
    fresh = imgci_factory()
    err = fresh.fails("pull", "--platform", f"linux/{other}", name)
    assert f"not the requested linux/{other}" in err
    assert fresh.run("ls", "-q").stdout.split() == []
    assert f"Pulled {name}" in fresh.run("pull", "--platform", f"linux/{host_arch}", name).stdout
