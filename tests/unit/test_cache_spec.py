"""``--cache-from`` / ``--cache-to`` parsing: buildx spellings, defaults, and clear errors for everything else."""

from __future__ import annotations

import dataclasses

import pytest

from imgci.cache.backends.spec import CacheSpec, parse_cache_from, parse_cache_to, parse_size
from imgci.errors import UsageError


def test_cache_from_bare_ref_and_registry_and_local() -> None:
    assert parse_cache_from("localhost:5000/cache/app:buildcache") == CacheSpec(
        "registry", "localhost:5000/cache/app:buildcache", raw="localhost:5000/cache/app:buildcache"
    )
    bare = parse_cache_from("alpine")
    assert (bare.type, bare.location) == ("registry", "docker.io/library/alpine:latest")
    spec = parse_cache_from("type=registry,ref=ghcr.io/o/app:cache")
    assert (spec.type, spec.location, spec.describe()) == ("registry", "ghcr.io/o/app:cache", "ghcr.io/o/app:cache")
    local = parse_cache_from("type=local,src=/tmp/cache")
    assert (local.type, local.location, local.describe()) == ("local", "/tmp/cache", "local:/tmp/cache")


def test_cache_to_defaults_and_every_field() -> None:
    spec = parse_cache_to("type=registry,ref=r.example/app:cache")
    assert parse_cache_to("r.example/app:cache") == dataclasses.replace(spec, raw="r.example/app:cache")
    assert (spec.mode, spec.compression, spec.ignore_error, spec.max_size) == ("min", "gzip", True, None)
    spec = parse_cache_to(
        "type=registry,ref=r.example/app:cache,mode=max,compression=zstd,compression-level=3,"
        "force-compression=true,image-manifest=true,oci-mediatypes=true,ignore-error=false"
    )
    assert (spec.mode, spec.compression, spec.ignore_error) == ("max", "zstd", False)
    assert spec.extra == {
        "compression-level": "3",
        "force-compression": "true",
        "image-manifest": "true",
        "oci-mediatypes": "true",
    }
    local = parse_cache_to("type=local,dest=/c,mode=MAX,max-size=500m")
    assert (local.type, local.location, local.mode, local.max_size) == ("local", "/c", "max", 500 << 20)
    inline = parse_cache_to("type=inline")
    assert (inline.type, inline.describe()) == ("inline", "inline")


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), ("500m", 500 << 20), ("2g", 2 << 30), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("10kb", 10240)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("flag", "text", "message"),
    [
        ("to", "type=regsitry,ref=r/app:c", "--cache-to: unknown type 'regsitry' (did you mean registry?)"),
        ("to", "type=gha", "--cache-to: unknown type 'gha' (expected one of: registry, local, inline)"),
        ("to", "ref=r/app:c", "--cache-to: type= is missing"),
        ("to", "", "--cache-to: empty value"),
        ("to", "r/app@sha256:" + "b" * 64, "must name a tag to write"),
        ("to", "type=registry", "--cache-to: type=registry needs ref="),
        ("to", "type=local,mode=max", "--cache-to: type=local needs dest="),
        ("to", "type=registry,ref=r/app:c,mdoe=max", "unknown key 'mdoe' for type=registry (did you mean mode?)"),
        ("to", "type=registry,ref=r/app:c,mode=all", "--cache-to: mode='all' must be min or max"),
        ("to", "type=registry,ref=r/app:c,ignore-error=maybe", "ignore-error='maybe' is not a boolean"),
        ("to", "type=registry,ref=r/app:c,compression=estargz", "compression='estargz' is not supported"),
        ("to", "type=local,dest=/c,max-size=lots", "max-size: invalid size 'lots'"),
        ("to", "type=registry,ref=r/app:c,max-size=1g", "unknown key 'max-size' for type=registry"),
        ("to", "type=inline,mode=max", "unknown key 'mode' for type=inline"),
        ("to", "type=registry,ref=r/app:c,mode=max,mode=min", "mode= given twice"),
        ("to", "type=registry,ref=r/app@sha256:" + "a" * 64, "must name a tag to write, not a digest"),
        ("to", "type=registry,ref=Bad Ref", "--cache-to: invalid ref 'Bad Ref'"),
        ("to", "type=local,dest", "'dest' is not key=value"),
        ("to", "type=local,src=/c", "unknown key 'src' for type=local (--cache-to writes dest=DIR)"),
        ("from", "type=local", "--cache-from: type=local needs src="),
        ("from", "type=local,dest=/c", "unknown key 'dest' for type=local (--cache-from reads src=DIR"),
        ("from", "type=inline", "type 'inline' cannot be used here (use type=registry,ref=IMAGE"),
        ("from", "type=lcoal,src=/c", "--cache-from: unknown type 'lcoal' (did you mean local?)"),
        ("from", "", "--cache-from: empty value"),
    ],
)
def test_errors_name_the_flag_and_the_field(flag: str, text: str, message: str) -> None:
    parse = parse_cache_to if flag == "to" else parse_cache_from
    with pytest.raises(UsageError) as e:
        parse(text)
    assert message in e.value.message
