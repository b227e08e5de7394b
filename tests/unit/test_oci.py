"""OCI wire models: digests validated before use, raw bytes kept, platform selection like docker's."""

from __future__ import annotations

import json

import pytest

from imgci.errors import DigestMismatchError, InvalidDigestError, PlatformError, RegistryProtocolError
from imgci.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    Index,
    Manifest,
    Platform,
    parse_manifest_or_index,
)

H = "a" * 64


@pytest.mark.parametrize(
    "bad", ["sha256:../x", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "sha256", "", "sha256:/" + H]
)
def test_malformed_digests_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidDigestError):
        Digest(bad)


def test_digest_verify() -> None:
    d = Digest.of(b"x")
    d.verify(b"x")
    with pytest.raises(DigestMismatchError):
        d.verify(b"y")
    assert Digest("sha512:" + "b" * 128).algorithm == "sha512"


def test_manifest_keeps_raw_bytes_and_digest_of_those_bytes() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + H, "size": 2},
        "layers": [{"mediaType": "x", "digest": "sha256:" + "b" * 64, "size": 3}],
    }
    raw = json.dumps(doc, indent=7).encode()  # odd formatting must survive untouched
    m = parse_manifest_or_index(raw)
    assert isinstance(m, Manifest)
    assert m.raw == raw and m.digest == Digest.of(raw)
    assert m.media_type == DOCKER_MANIFEST
    assert m.layers[0].size == 3


def test_manifest_with_bad_descriptor_is_a_protocol_error() -> None:
    raw = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": "sha256:../x", "size": 1}, "layers": []}
    ).encode()
    with pytest.raises(InvalidDigestError):
        Manifest.parse(raw)
    with pytest.raises(RegistryProtocolError):
        Manifest.parse(b"[1,2]")
    with pytest.raises(RegistryProtocolError, match="schema1"):
        parse_manifest_or_index(b'{"schemaVersion": 1, "name": "x"}')


def _index() -> Index:
    def entry(plat: dict[str, str], c: str) -> dict[str, object]:
        return {"mediaType": OCI_MANIFEST, "digest": "sha256:" + c * 64, "size": 10, "platform": plat}

    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                entry({"os": "unknown", "architecture": "unknown"}, "0"),
                entry({"os": "linux", "architecture": "amd64"}, "1"),
                entry({"os": "linux", "architecture": "arm", "variant": "v6"}, "2"),
                entry({"os": "linux", "architecture": "arm", "variant": "v7"}, "3"),
                entry({"os": "linux", "architecture": "arm64", "variant": "v8"}, "4"),
            ],
        }
    ).encode()
    idx = parse_manifest_or_index(raw)
    assert isinstance(idx, Index)
    return idx


@pytest.mark.parametrize(
    ("wanted", "hexchar"),
    [
        ("linux/amd64", "1"),
        ("linux/arm/v6", "2"),
        ("linux/arm", "3"),
        ("linux/arm64", "4"),
        ("linux/aarch64", "4"),
        ("arm64", "4"),
    ],
)
def test_platform_selection(wanted: str, hexchar: str) -> None:
    assert _index().select(Platform.parse(wanted)).digest.hex == hexchar * 64


def test_platform_not_found_lists_available() -> None:
    with pytest.raises(PlatformError, match=r"linux/s390x.*available: linux/amd64, linux/arm/v6"):
        _index().select(Platform.parse("linux/s390x"))
    with pytest.raises(PlatformError):
        Platform.parse("linux/")


def test_built_documents_round_trip() -> None:
    cfg = Descriptor(OCI_CONFIG, Digest.of(b"{}"), 2)
    m = Manifest.build(cfg, [], annotations={"a": "b"})
    again = Manifest.parse(m.raw)
    assert again.config == cfg and again.annotations == {"a": "b"}
    idx = Index.build([m.descriptor(Platform.parse("linux/amd64"))])
    assert Index.parse(idx.raw).manifests[0].platform == Platform("linux", "amd64")
    assert Platform.host().os == "linux"
