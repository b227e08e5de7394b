"""Reference parsing and normalisation must match docker's (distribution/reference) behaviour."""

from __future__ import annotations

import pytest

from imgci.errors import InvalidReferenceError
from imgci.reference import is_loopback_host, parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "full"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "docker.io/library/busybox:1.36"),
        ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("index.docker.io/library/x", "docker.io", "library/x", "latest", None, "docker.io/library/x:latest"),
        ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
        ("localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", None, "localhost:5000/a/b:v1"),
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None, "127.0.0.1:5000/app:latest"),
        ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None, "[::1]:5000/app:x"),
        ("ghcr.io/o/r/sub@" + D, "ghcr.io", "o/r/sub", None, D, "ghcr.io/o/r/sub@" + D),
        ("quay.io/o/r:t@" + D, "quay.io", "o/r", "t", D, "quay.io/o/r:t@" + D),
        (
            "reg.example.com:443/a__b/c-d.e",
            "reg.example.com:443",
            "a__b/c-d.e",
            "latest",
            None,
            "reg.example.com:443/a__b/c-d.e:latest",
        ),
    ],
)
def test_normalisation(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, full: str
) -> None:
    ref = parse(text)
    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.tag == tag
    assert (ref.digest.value if ref.digest else None) == digest
    assert str(ref) == full


def test_endpoint_and_familiar() -> None:
    assert parse("busybox").endpoint == "registry-1.docker.io"
    assert parse("busybox").familiar() == "busybox:latest"
    assert parse("user/app:1").familiar() == "user/app:1"
    assert parse("localhost:5000/x:y").endpoint == "localhost:5000"
    assert parse("localhost:5000/x:y").familiar() == "localhost:5000/x:y"
    assert parse("busybox@" + D).identifier == D
    assert parse("busybox:1").identifier == "1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "Busybox",
        "user/App",
        "a//b",
        "a/b/",
        "-a",
        "a:",
        "a:-tag",
        "a@sha256:xyz",
        "a@sha256:../x",
        "a@md5:" + "0" * 32,
        "reg.io:port/a",
        "a" * 256,
        "a b",
        "UPPER.io/app/Name",
    ],
)
def test_malformed_references_are_rejected(text: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid reference format"):
        parse(text)


def test_uppercase_message_says_lowercase() -> None:
    with pytest.raises(InvalidReferenceError, match="must be lowercase"):
        parse("user/MyApp")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry.example.com", False),
        ("docker.io", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
