"""WWW-Authenticate parsing, scopes, the token cache and the token flows (with a fake token fetcher)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from imgci.errors import AuthenticationError, AuthorizationError, RegistryError
from imgci.registry.auth import (
    Authenticator,
    TokenCache,
    merge_scopes,
    parse_www_authenticate,
    repository_scope,
)
from imgci.registry.client import RegistryClient
from imgci.registry.credentials import Credentials


# -- parsing ----------------------------------------------------------------------------------------------------
def test_bearer_with_quoted_commas() -> None:
    [ch] = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert ch.scheme == "bearer"
    assert ch.realm == "https://auth.docker.io/token"
    assert ch.service == "registry.docker.io"
    assert ch.scopes == ["repository:library/busybox:pull,push"]


def test_several_scopes_and_error_param() -> None:
    [ch] = parse_www_authenticate(
        'Bearer realm="r",scope="repository:a:pull repository:b:pull,push",error="insufficient_scope"'
    )
    assert ch.scopes == ["repository:a:pull", "repository:b:pull,push"]
    assert ch.params["error"] == "insufficient_scope"


def test_basic_and_case_and_spacing() -> None:
    [ch] = parse_www_authenticate('BASIC   Realm = "Registry Realm"')
    assert ch.scheme == "basic" and ch.realm == "Registry Realm"


def test_multiple_challenges_and_unquoted_values() -> None:
    chs = parse_www_authenticate('Basic realm=simple, Bearer realm="https://x/t",service=svc')
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[0].realm == "simple"
    assert chs[1].service == "svc"


def test_escaped_quotes() -> None:
    [ch] = parse_www_authenticate(r'Bearer realm="a\"b",service="s"')
    assert ch.realm == 'a"b' and ch.service == "s"


def test_empty_and_scheme_only() -> None:
    assert parse_www_authenticate("") == []
    [ch] = parse_www_authenticate("Negotiate")
    assert ch.scheme == "negotiate" and ch.params == {}


# -- scopes and cache -------------------------------------------------------------------------------------------
def test_scopes() -> None:
    assert repository_scope("team/app") == "repository:team/app:pull"
    assert repository_scope("team/app", "pull", "push") == "repository:team/app:pull,push"
    assert merge_scopes(["repository:a:pull"], ["repository:a:push", "repository:b:pull"]) == (
        "repository:a:pull,push",
        "repository:b:pull",
    )
    assert RegistryClient.scopes("dst", push=True, mount_from="src") == (
        "repository:dst:pull,push",
        "repository:src:pull",
    )


def test_token_cache_expiry_and_superset_reuse() -> None:
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    push = ("repository:a:pull,push",)
    cache.put("reg", push, "T", 100)
    assert cache.get("reg", push) == "T"
    assert cache.get("reg", ("repository:a:pull",)) == "T"  # push token covers pull
    assert cache.get("reg", ("repository:b:pull",)) is None
    assert cache.get("other", push) is None
    now[0] += 89
    assert cache.get("reg", push) == "T"
    now[0] += 2  # inside the last 10 % of its lifetime: refreshed early rather than used
    assert cache.get("reg", push) is None


# -- token flows ------------------------------------------------------------------------------------------------
class FakeFetch:
    def __init__(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = status
        self.body = body if body is not None else {"token": "tok", "expires_in": 300}

    def __call__(self, method: str, url: str, **kw: Any) -> tuple[int, bytes]:
        self.calls.append({"method": method, "url": url, **kw})
        return self.status, json.dumps(self.body).encode()


BEARER = 'Bearer realm="https://auth.example/token",service="reg.example"'


def make(creds: Credentials | None, fetch: FakeFetch) -> Authenticator:
    a = Authenticator("reg.example", lambda: creds, fetch)
    a.set_challenge(BEARER)
    return a


def test_password_flow_is_get_with_basic() -> None:
    fetch = FakeFetch()
    auth = make(Credentials("alice", "pw"), fetch)
    assert auth.authorization(("repository:a:pull",)) == "Bearer tok"
    [call] = fetch.calls
    assert call["method"] == "GET" and call["url"] == "https://auth.example/token"
    assert ("service", "reg.example") in call["params"] and ("scope", "repository:a:pull") in call["params"]
    assert call["headers"]["Authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()
    auth.authorization(("repository:a:pull",))
    assert len(fetch.calls) == 1  # cached


def test_anonymous_flow_sends_no_credentials() -> None:
    fetch = FakeFetch(body={"access_token": "anon"})
    auth = make(None, fetch)
    assert auth.authorization(("repository:a:pull",)) == "Bearer anon"
    assert "Authorization" not in fetch.calls[0]["headers"]


def test_registry_token_is_used_as_is() -> None:
    fetch = FakeFetch()
    auth = make(Credentials(registry_token="direct"), fetch)
    assert auth.authorization(("repository:a:pull",)) == "Bearer direct"
    assert fetch.calls == []


def test_basic_challenge_uses_credentials_directly() -> None:
    auth = Authenticator("reg", lambda: Credentials("u", "p"), FakeFetch())
    auth.set_challenge('Basic realm="x"')
    assert auth.authorization(()) == "Basic " + base64.b64encode(b"u:p").decode()
    anon = Authenticator("reg", lambda: None, FakeFetch())
    anon.set_challenge('Basic realm="x"')
    assert anon.authorization(()) is None


def test_no_challenge_means_no_header_and_no_credential_lookup() -> None:
    looked: list[int] = []

    def creds() -> Credentials | None:
        looked.append(1)
        return None

    auth = Authenticator("reg", creds, FakeFetch())
    assert auth.authorization(("repository:a:pull",)) is None
    assert looked == []


def test_token_server_refusal_is_authentication_error_with_login_hint() -> None:
    auth = make(Credentials("alice", "very-secret"), FakeFetch(status=401, body={}))
    with pytest.raises(AuthenticationError) as exc:
        auth.authorization(("repository:a:pull",))
    assert exc.value.hint == "run `imgci login reg.example`"
    assert "alice" in str(exc.value) and "very-secret" not in str(exc.value)


def test_token_server_403_and_5xx() -> None:
    with pytest.raises(AuthorizationError):
        make(None, FakeFetch(status=403, body={})).authorization(("repository:a:push",))
    with pytest.raises(RegistryError) as exc:
        make(None, FakeFetch(status=503, body={})).authorization(("repository:a:pull",))
    assert exc.value.temporary


def test_challenge_scope_is_not_sticky() -> None:
    fetch = FakeFetch()
    auth = Authenticator("reg", lambda: None, fetch)
    wanted = auth.set_challenge('Bearer realm="https://t/x",scope="repository:a:pull"')
    assert wanted == ("repository:a:pull",)
    auth.authorization(("repository:b:pull",))
    assert [v for k, v in fetch.calls[0]["params"] if k == "scope"] == ["repository:b:pull"]


def test_forget_drops_a_refused_token() -> None:
    fetch = FakeFetch()
    auth = make(None, fetch)
    header = auth.authorization(("repository:a:pull",))
    auth.forget(header)
    auth.authorization(("repository:a:pull",))
    assert len(fetch.calls) == 2
