"""Registry authentication: ``WWW-Authenticate`` challenges, Basic, and the Bearer token flow with a token cache.

Contract:
- :func:`parse_www_authenticate` accepts any RFC 7235 list of challenges, quoted values with commas and escapes
  included, and returns them in order with lower-cased scheme and parameter names.
- :class:`Authenticator` turns the registry's challenge plus the scopes a request needs into an ``Authorization``
  header value: ``Basic`` from username/password, ``Bearer`` from a token server (GET with Basic credentials, or
  POST OAuth2 ``refresh_token`` when an identity token is present), or a registry token used as is.
- Tokens are cached per (registry, scopes) until shortly before ``expires_in`` runs out; a cached token whose scopes
  include the requested ones is reused.
- A token server refusing the credentials raises :class:`AuthenticationError` with the ``imgci login`` hint;
  403 raises :class:`AuthorizationError`. No token or password ever appears in a message.

HTTP goes through a :class:`TokenFetcher` supplied by the transport (retries, TLS and proxies live there).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from imgci.errors import AuthenticationError, AuthorizationError, RegistryError, RegistryProtocolError
from imgci.registry.credentials import Credentials

_DEFAULT_EXPIRES_IN = 60.0  # seconds; what the docker token spec says to assume when expires_in is absent
_CLIENT_ID = "imgci"

# token68 or auth-param list; RFC 7235 section 2.1
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(,|$)')
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: ``scheme`` lower-cased, ``params`` keyed lower-case."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> list[str]:
        return [s for s in self.params.get("scope", "").split(" ") if s]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Every challenge in ``header`` (``Bearer realm="…",service="…",scope="a:b:pull,push"``, ``Basic realm=…``)."""
    out: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        while pos < n and header[pos] in " \t,":
            pos += 1
        m = _SCHEME_RE.match(header, pos)
        if m is None:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < n:
            pm = _PARAM_RE.match(header, pos)
            if pm is None:
                break
            # "Basic realm=x, Bearer realm=y": a bare token followed by space is the next scheme, not a param
            params[pm.group(1).lower()] = _unquote(pm.group(2))
            pos = pm.end()
        if not params and pos < n and _SCHEME_RE.match(header, pos) is None:
            pos = n  # token68 form (rare, unused by registries): ignore the rest
        out.append(Challenge(scheme, params))
    return out


def repository_scope(repository: str, *actions: str) -> str:
    """``repository:NAME:pull`` / ``repository:NAME:pull,push``."""
    return f"repository:{repository}:{','.join(actions or ('pull',))}"


def _scope_actions(scopes: Iterable[str]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        out.setdefault((kind, name), set()).update(a for a in actions.split(",") if a)
    return out


def merge_scopes(*groups: Iterable[str]) -> tuple[str, ...]:
    """Union of scopes, actions merged per resource, in a stable (sorted) order."""
    merged = _scope_actions(s for g in groups for s in g)
    return tuple(sorted(f"{k}:{n}:{','.join(sorted(a))}" for (k, n), a in merged.items()))


def _covers(have: tuple[str, ...], want: tuple[str, ...]) -> bool:
    got = _scope_actions(have)
    return all(actions <= got.get(res, set()) for res, actions in _scope_actions(want).items())


class TokenCache:
    """Bearer tokens per (registry, scopes), valid until a little before they expire. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}

    def get(self, registry: str, scopes: tuple[str, ...]) -> str | None:
        now = self._clock()
        with self._lock:
            exact = self._tokens.get((registry, scopes))
            if exact is not None and exact[1] > now:
                return exact[0]
            for (reg, have), (token, expiry) in self._tokens.items():
                if reg == registry and expiry > now and _covers(have, scopes):
                    return token
        return None

    def put(self, registry: str, scopes: tuple[str, ...], token: str, expires_in: float) -> None:
        # Refresh early: 10% of the lifetime, at most 30 s, so a token never expires mid-request.
        margin = min(30.0, expires_in * 0.1)
        with self._lock:
            self._tokens[(registry, scopes)] = (token, self._clock() + expires_in - margin)

    def invalidate(self, registry: str, token: str) -> None:
        with self._lock:
            for key in [k for k, v in self._tokens.items() if k[0] == registry and v[0] == token]:
                del self._tokens[key]


class TokenFetcher(Protocol):
    """Sends one token request; returns (status, body). Supplied by the transport (TLS, proxies, retries)."""

    def __call__(
        self,
        method: str,
        url: str,
        *,
        params: list[tuple[str, str]] | None = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]: ...


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def login_hint(registry: str) -> str:
    return f"run `imgci login {registry}`"


class Authenticator:
    """Produces ``Authorization`` values for one registry. Thread-safe.

    ``credentials`` is called at most once, lazily, and only when the registry asks for authentication; it may
    return None for anonymous access.
    """

    def __init__(
        self,
        registry: str,
        credentials: Callable[[], Credentials | None],
        fetch: TokenFetcher,
        *,
        cache: TokenCache | None = None,
    ) -> None:
        self.registry = registry
        self._credentials_fn = credentials
        self._credentials: Credentials | None = None
        self._loaded = False
        self._fetch = fetch
        self.cache = cache if cache is not None else TokenCache()
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()  # parallel requests needing the same token fetch it once
        self._challenge: Challenge | None = None

    @property
    def challenge(self) -> Challenge | None:
        return self._challenge

    def credentials(self) -> Credentials | None:
        with self._lock:
            if not self._loaded:
                creds = self._credentials_fn()
                self._credentials = None if creds is None or creds.is_empty else creds
                self._loaded = True
            return self._credentials

    def set_challenge(self, header: str) -> tuple[str, ...] | None:
        """Adopt the first Bearer or Basic challenge of ``header`` for later requests and return the scopes it
        asks for (used only for the request it answered); None when there is no challenge imgci supports."""
        for ch in parse_www_authenticate(header):
            if ch.scheme in ("bearer", "basic"):
                self._challenge = Challenge(ch.scheme, {k: v for k, v in ch.params.items() if k != "scope"})
                return tuple(ch.scopes)
        return None

    def authorization(self, scopes: tuple[str, ...], *, fresh: bool = False) -> str | None:
        """The header value for a request needing ``scopes``; None when no challenge was seen (anonymous)."""
        ch = self._challenge
        if ch is None:
            return None
        creds = self.credentials()
        if ch.scheme == "basic":
            if creds is None or not (creds.username or creds.password):
                return None
            return basic_header(creds.username, creds.password)
        if creds is not None and creds.registry_token:
            return "Bearer " + creds.registry_token
        scopes = merge_scopes(scopes)
        if not fresh:
            cached = self.cache.get(self.registry, scopes)
            if cached is not None:
                return "Bearer " + cached
        with self._fetch_lock:
            if not fresh:  # another thread may have fetched it while this one waited
                cached = self.cache.get(self.registry, scopes)
                if cached is not None:
                    return "Bearer " + cached
            token, expires_in = self._fetch_token(ch, scopes, creds)
            self.cache.put(self.registry, scopes, token, expires_in)
        return "Bearer " + token

    def forget(self, authorization: str | None) -> None:
        """Drop a token the registry just refused so the next ``authorization`` fetches a new one."""
        if authorization and authorization.startswith("Bearer "):
            self.cache.invalidate(self.registry, authorization[7:])

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...], creds: Credentials | None) -> tuple[str, float]:
        if not ch.realm.startswith(("https://", "http://")):
            raise RegistryProtocolError(
                f"registry {self.registry} sent a Bearer challenge without a usable realm", registry=self.registry
            )
        headers: dict[str, str] = {}
        if creds is not None and creds.identity_token:
            data = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": _CLIENT_ID,
                "access_type": "offline",
            }
            if ch.service:
                data["service"] = ch.service
            if scopes:
                data["scope"] = " ".join(scopes)
            status, body = self._fetch("POST", ch.realm, data=data, headers=headers)
        else:
            params = [("service", ch.service)] if ch.service else []
            params += [("scope", s) for s in scopes]
            if creds is not None and (creds.username or creds.password):
                headers["Authorization"] = basic_header(creds.username, creds.password)
            status, body = self._fetch("GET", ch.realm, params=params, headers=headers)
        who = f"as {creds.username}" if creds is not None and creds.username else "anonymously"
        if status == 401:
            raise AuthenticationError(
                f"the token server of registry {self.registry} refused the credentials (tried {who})",
                registry=self.registry,
                status=401,
                hint=login_hint(self.registry),
            )
        if status == 403:
            raise AuthorizationError(
                f"the token server of registry {self.registry} denied access {who} to {' '.join(scopes)}",
                registry=self.registry,
                status=403,
            )
        if status != 200:
            raise RegistryError(
                f"the token server of registry {self.registry} answered HTTP {status}",
                registry=self.registry,
                status=status,
                temporary=status in (408, 429) or status >= 500,
            )
        try:
            doc = json.loads(body)
            token = str(doc.get("token") or doc.get("access_token") or "")
            expires_in = float(doc.get("expires_in") or 0) or _DEFAULT_EXPIRES_IN
        except (ValueError, AttributeError, TypeError):
            raise RegistryProtocolError(
                f"the token server of registry {self.registry} answered something that is not a token response",
                registry=self.registry,
            ) from None
        if not token:
            raise RegistryProtocolError(
                f"the token server of registry {self.registry} answered without a token", registry=self.registry
            )
        return token, expires_in if expires_in > 0 else _DEFAULT_EXPIRES_IN
