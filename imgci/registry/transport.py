"""HTTP to one registry: scheme selection, TLS, authentication, redirects, retries and error translation.

Contract:
- HTTPS is verified against ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` or the system store.
  Plain HTTP is possible only for registries marked insecure and loopback hosts, and then only as docker does it:
  HTTPS is tried first and HTTP used when TLS or the connection fails. An insecure registry's certificate is not
  verified (docker's ``--insecure-registry``); a loopback registry's is.
- Retries (see :mod:`imgci.registry.retry`) only for temporary failures, and never for a request whose body cannot
  be rewound (bytes can; a seekable file is sought back to where it started; an iterator cannot).
- A streamed response can be consumed inside the retried attempt (``handler``), so a connection that breaks while
  the body is read is retried like one that broke before the status line.
- Redirects are followed by hand: the registry's ``Authorization`` header is sent only to the registry's own
  host:port, never to a host a blob download or an upload ``Location`` points to. Nothing raised or logged
  contains an ``Authorization`` value.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

from imgci import __version__
from imgci.errors import RegistryError, RegistryProtocolError, RegistryUnreachableError
from imgci.reference import is_loopback_host
from imgci.registry.auth import Authenticator, TokenCache, merge_scopes
from imgci.registry.credentials import Credentials, load_credentials
from imgci.registry.responses import Operation, connection_error, status_error
from imgci.registry.retry import RetryPolicy, run_with_retries

if TYPE_CHECKING:
    import requests

log = logging.getLogger("imgci.registry")

USER_AGENT = f"imgci/{__version__}"
_MAX_REDIRECTS = 10
_ERROR_BODY_LIMIT = 64 * 1024
Body = bytes | IO[bytes] | Iterable[bytes] | None
Headers = Mapping[str, str] | Callable[[], Mapping[str, str]] | None
T = TypeVar("T")


def _netloc(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.hostname or "").lower(), port


_TLS_CONTEXTS: dict[str, ssl.SSLContext] = {}
_TLS_CONTEXTS_LOCK = threading.Lock()
# A ``verify=`` value standing for "this base trust plus these CA files" (a registry's certs.d directory): the
# directory is what requests sees (it checks that the path exists); the adapter maps it to one SSL context.
_EXTRA_TRUST: dict[str, tuple[str | bool, tuple[str, ...]]] = {}


def _tls_context(ca_path: str) -> ssl.SSLContext:
    """One SSL context per CA bundle for the whole process: loading a bundle costs ~20 ms of CPU, and requests
    would load it again for every new connection (four parallel blob transfers: four loads)."""
    with _TLS_CONTEXTS_LOCK:
        ctx = _TLS_CONTEXTS.get(ca_path)
        if ctx is None:
            from urllib3.util.ssl_ import create_urllib3_context

            base, extra = _EXTRA_TRUST.get(ca_path, (ca_path, ()))
            ctx = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
            if isinstance(base, str):
                _load_trust(ctx, base)
            else:
                import certifi

                ctx.load_verify_locations(cafile=certifi.where())  # requests' own default, as without certs.d
            for cafile in extra:
                _load_trust(ctx, cafile)
            _TLS_CONTEXTS[ca_path] = ctx
        return ctx


def _load_trust(ctx: ssl.SSLContext, path: str) -> None:
    try:
        if os.path.isdir(path):
            ctx.load_verify_locations(capath=path)
        else:
            ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as e:
        raise RegistryError(
            f"cannot use the CA certificates in {path}: {getattr(e, 'reason', None) or e}",
            hint="a registry's CA goes in PEM form in certs.d/HOST:PORT/ca.crt (or REQUESTS_CA_BUNDLE)",
        ) from None


def certs_d_dirs() -> list[Path]:
    """The directories whose ``HOST[:PORT]/*.crt`` files are CAs trusted for that registry, on top of the system's
    (docker's and podman's layout): ``$IMGCI_CERTS_D`` (``:``-separated) when set, else
    ``$XDG_CONFIG_HOME/imgci/certs.d`` (``~/.config/imgci/certs.d``), ``/etc/imgci/certs.d``,
    ``/etc/containers/certs.d`` and ``/etc/docker/certs.d``."""
    override = os.environ.get("IMGCI_CERTS_D")
    if override is not None:
        return [Path(p) for p in override.split(":") if p]
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path(config, "imgci", "certs.d"), *(Path(d) for d in _SYSTEM_CERTS_D)]


_SYSTEM_CERTS_D = ("/etc/imgci/certs.d", "/etc/containers/certs.d", "/etc/docker/certs.d")


@functools.lru_cache(maxsize=64)
def registry_cas(netloc: str, dirs: tuple[Path, ...]) -> tuple[str, ...]:
    """The ``*.crt`` files of ``DIR/HOST:PORT/`` (for port 443 also ``DIR/HOST/``) in each of ``dirs``."""
    host, port = _netloc(f"https://{netloc}")
    names = [f"{host}:{port}"] + ([host] if port == 443 else [])
    if host.count(":") > 1:  # IPv6: docker names the directory with brackets
        names = [f"[{host}]:{port}"] + ([f"[{host}]"] if port == 443 else [])
    found: list[str] = []
    for base in dirs:
        for name in names:
            try:
                entries = sorted(os.scandir(base / name), key=lambda e: e.name)
            except OSError:
                continue
            found += [e.path for e in entries if e.name.endswith(".crt") and e.is_file()]
    return tuple(found)


def _with_registry_cas(base: str | bool, cas: tuple[str, ...]) -> str:
    key = os.path.dirname(cas[0])
    with _TLS_CONTEXTS_LOCK:
        _EXTRA_TRUST[key] = (base, cas)
    return key


@functools.cache
def _adapter_class() -> type:
    import requests.adapters

    class CachedTLSAdapter(requests.adapters.HTTPAdapter):
        """An HTTPAdapter whose connections verify with a shared, already loaded SSL context per CA bundle."""

        def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
            host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
            ca = pool_kwargs.get("ca_certs") or pool_kwargs.get("ca_cert_dir")
            if ca and pool_kwargs.get("cert_reqs") == "CERT_REQUIRED" and host_params.get("scheme") == "https":
                pool_kwargs.pop("ca_certs", None)
                pool_kwargs.pop("ca_cert_dir", None)
                pool_kwargs["ssl_context"] = _tls_context(ca)
            return host_params, pool_kwargs

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            super().cert_verify(conn, url, verify, cert)
            if verify and (getattr(conn, "conn_kw", None) or {}).get("ssl_context") is not None:
                conn.ca_certs = None  # the context has them already: not loaded again per connection
                conn.ca_cert_dir = None

    return CachedTLSAdapter


def _default_verify() -> str | bool:
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        path = os.environ.get(var)
        if path and os.path.exists(path):
            return _system_dir_for(path)
    return _system_trust()


@functools.cache
def _system_dir_for(path: str) -> str:
    """``path``, or the system's hashed certificate directory where ``path`` is the system's bundle and that
    directory holds the same number of CAs (Debian's update-ca-certificates writes both from one list; CI images
    often point REQUESTS_CA_BUNDLE/SSL_CERT_FILE at that bundle): the same trust, without parsing all of it."""
    paths = ssl.get_default_verify_paths()
    system_file, system_dir = paths.openssl_cafile, paths.openssl_capath
    try:
        if not (system_file and system_dir and os.path.samefile(path, system_file)):
            return path
        with open(path, "rb") as f:
            in_bundle = f.read().count(b"-----BEGIN CERTIFICATE-----")
        with os.scandir(system_dir) as entries:
            in_dir = sum(1 for e in entries if _HASH_NAME.fullmatch(e.name))
    except OSError:
        return path
    return system_dir if in_bundle and in_bundle == in_dir else path


@functools.cache
def _system_trust() -> str | bool:
    """The system's CAs: its hashed certificate directory where it has one (OpenSSL reads only the CA a server's
    chain needs, instead of parsing the whole bundle — ~20 ms — in every process), else its bundle."""
    paths = ssl.get_default_verify_paths()
    if paths.capath and _is_hashed_dir(paths.capath):
        return paths.capath
    for candidate in (paths.cafile, paths.capath):
        if candidate and os.path.exists(candidate):
            return candidate
    return True


def _is_hashed_dir(path: str) -> bool:
    """Whether ``path`` holds ``c_rehash`` links (``5ad8a5d6.0``), as Debian's ``/etc/ssl/certs`` does."""
    try:
        with os.scandir(path) as entries:
            return any(_HASH_NAME.fullmatch(e.name) for e in entries)
    except OSError:
        return False


_HASH_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")


class _Body:
    """A request body and whether it can be sent again: bytes always, seekable files from where they started."""

    def __init__(self, data: Body) -> None:
        self.data = data
        self.start: int | None = None
        self.rewindable = data is None or isinstance(data, bytes | bytearray | memoryview)
        seek, tell = getattr(data, "seek", None), getattr(data, "tell", None)
        if not self.rewindable and callable(seek) and callable(tell):
            try:
                seekable = getattr(data, "seekable", lambda: True)()
                if seekable:
                    self.start = int(tell())
                    self.rewindable = True
            except (OSError, ValueError):
                pass
        self._used = False

    def take(self) -> Any:
        if self._used:
            if not self.rewindable:
                raise _NotReplayable()
            if self.start is not None:
                self.data.seek(self.start)  # type: ignore[union-attr]
        self._used = True
        return self.data


class _NotReplayable(Exception):
    """Internal: the body was consumed and cannot be sent again."""


class Transport:
    """Requests to one registry endpoint. Thread-safe; share one per registry and ``close`` it when done."""

    def __init__(
        self,
        registry: str,
        *,
        endpoint: str | None = None,
        insecure: bool = False,
        credentials: Credentials | Callable[[], Credentials | None] | None = None,
        retry: RetryPolicy | None = None,
        timeout: tuple[float, float] = (15.0, 120.0),
        token_cache: TokenCache | None = None,
        verify: str | bool | None = None,
        sleep: Callable[[float], None] = time.sleep,
        user_agent: str = USER_AGENT,
    ) -> None:
        """``registry`` names the registry in messages and for credentials (``docker.io``); ``endpoint`` is the
        host[:port] to talk to (default: ``registry``). ``credentials`` None means "docker's config.json, read
        when the registry asks"; ``Credentials()`` means anonymous. ``verify`` overrides the CA bundle."""
        self.registry = registry
        self.endpoint = endpoint or registry
        self.insecure = insecure
        self.allow_http = insecure or is_loopback_host(self.endpoint)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.sleep = sleep
        self.user_agent = user_agent
        self._verify = verify
        if credentials is None:
            creds_fn: Callable[[], Credentials | None] = lambda: load_credentials(registry)  # noqa: E731
        elif isinstance(credentials, Credentials):
            creds_fn = lambda: credentials  # noqa: E731
        else:
            creds_fn = credentials
        self.auth = Authenticator(registry, creds_fn, self._fetch_token, cache=token_cache)
        self._session: requests.Session | None = None
        self._base: str | None = None
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()  # one probe at a time: parallel first requests share its result

    # -- plumbing -----------------------------------------------------------------------------------------------
    def session(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                import requests
                import requests.adapters

                s = requests.Session()
                s.trust_env = False  # no ~/.netrc Authorization; proxies and CA bundle are chosen per request
                adapter = _adapter_class()(pool_connections=4, pool_maxsize=16, max_retries=0)
                s.mount("https://", adapter)
                s.mount("http://", adapter)
                s.headers["User-Agent"] = self.user_agent
                if self.insecure:
                    import urllib3

                    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                self._session = s
            return self._session

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def _verify_for(self, url: str) -> str | bool:
        if self.insecure and _netloc(url)[0] == _netloc(f"https://{self.endpoint}")[0]:
            return False
        if self._verify is not None:
            return self._verify
        base = _default_verify()
        cas = registry_cas(urlsplit(url).netloc.rpartition("@")[2], tuple(certs_d_dirs()))
        return _with_registry_cas(base, cas) if cas else base

    def _proxies_for(self, url: str) -> dict[str, str]:
        if is_loopback_host(urlsplit(url).netloc):
            return {}  # as Go's ProxyFromEnvironment: loopback is never proxied
        import requests.utils

        return dict(requests.utils.get_environ_proxies(url))

    @property
    def base_url(self) -> str:
        """``https://endpoint`` or ``http://endpoint``, probing the registry on first use."""
        return self.ensure_base(Operation("connect to"))

    def ensure_base(self, op: Operation) -> str:
        """The base URL; the first call probes the registry (retried), naming ``op`` in any error."""
        if self._base is None:
            with self._probe_lock:
                if self._base is None:
                    run_with_retries(lambda: self._probe(op), self.retry, sleep=self.sleep)
        assert self._base is not None
        return self._base

    def warm_up(self, scopes: tuple[str, ...] = ()) -> None:
        """Best effort and once, without retries: probe the registry (the HTTP stack imported, TLS set up, the
        connection left in the pool, the auth challenge learnt), then get a token for ``scopes`` — so that the
        first real request, later, finds all that done. Run in the background while a build runs. Whatever fails
        is left for that request to meet again, retry and report; nothing is remembered from a failure."""
        try:
            with self._probe_lock:
                if self._base is None:
                    self._probe(Operation("connect to"))
            if scopes and self.auth.challenge is not None:
                self.auth.authorization(scopes)
        except RegistryError as e:
            log.debug("registry %s: warm-up: %s", self.endpoint, e.message)

    def url(self, path: str) -> str:
        """``path`` joined to the base URL; absolute URLs (upload locations, redirects) are returned as they are."""
        return urljoin(self.base_url + "/", path)

    def is_registry_url(self, url: str) -> bool:
        return _netloc(url) == _netloc(self.base_url)

    def _send(
        self,
        method: str,
        url: str,
        *,
        body: _Body,
        op: Operation,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
        stream: bool = False,
        authorization: str | None = None,
        auth_url: str | None = None,
    ) -> requests.Response:
        """One request, following redirects by hand; ``authorization`` goes only to ``auth_url``'s host:port."""
        import requests

        auth_netloc = _netloc(auth_url) if auth_url else None
        for _ in range(_MAX_REDIRECTS + 1):
            h = dict(headers or {})
            if authorization and auth_netloc == _netloc(url):
                h["Authorization"] = authorization
            try:
                data = body.take()
            except _NotReplayable:
                raise RegistryProtocolError(
                    f"{op.describe(self.registry)}: the registry redirected or re-challenged a request whose body "
                    "cannot be sent twice",
                    **op.fields(self.registry),
                ) from None
            try:
                resp = self.session().request(
                    method,
                    url,
                    headers=h,
                    params=params,
                    data=data,
                    stream=stream,
                    allow_redirects=False,
                    timeout=self.timeout,
                    verify=self._verify_for(url),
                    proxies=self._proxies_for(url),
                )
            except requests.exceptions.RequestException as e:
                raise connection_error(self.registry, self.endpoint, op, e, urlsplit(url).netloc) from None
            log.debug("%s %s -> %s", method, url.split("?", 1)[0], resp.status_code)
            location = resp.headers.get("Location")
            if resp.status_code not in (301, 302, 303, 307, 308) or not location:
                return resp
            resp.close()
            url = urljoin(resp.url, location)
            params = None  # the new location carries its own query
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, body = ("HEAD" if method == "HEAD" else "GET"), _Body(None)
        raise RegistryProtocolError(
            f"{op.describe(self.registry)}: more than {_MAX_REDIRECTS} redirects", **op.fields(self.registry)
        )

    def _probe(self, op: Operation) -> None:
        """Pick the scheme (https, or http where allowed and https fails) and learn the auth challenge."""
        if self._base is not None:
            return
        schemes = ("https", "http") if self.allow_http else ("https",)
        last: RegistryError | None = None
        for scheme in schemes:
            base = f"{scheme}://{self.endpoint}"
            try:
                resp = self._send("GET", base + "/v2/", body=_Body(None), op=op)
            except RegistryUnreachableError as e:
                last = e
                continue
            with resp:
                if scheme == "http" and resp.status_code == 400 and last is not None and not last.temporary:
                    raise last  # a TLS server answering plain HTTP: the TLS error is the real story
                if resp.status_code == 401:
                    self.auth.set_challenge(resp.headers.get("WWW-Authenticate", ""))
                elif resp.status_code in (408, 429) or resp.status_code >= 500:
                    raise self.error_for(resp, op)
            if scheme == "http" and last is not None:
                log.info("registry %s: using plain HTTP (https failed: %s)", self.endpoint, last.message)
            with self._lock:
                self._base = base
            return
        assert last is not None
        raise last  # retried by the caller when temporary (connection refused), final for a TLS failure

    def error_for(self, resp: requests.Response, op: Operation) -> RegistryError:
        """The RegistryError for a response with an unexpected status (reads at most 64 KiB of its body)."""
        import requests

        body = b""
        if resp.request is not None and resp.request.method != "HEAD":
            try:
                body = next(resp.iter_content(_ERROR_BODY_LIMIT), b"")
            except (requests.exceptions.RequestException, OSError):
                body = b""  # best effort: the status alone still makes a good error
        # A 401 from another host (an upload Location, a redirect) is not about the user's credentials: none went
        # there. (``_base`` directly, not ``base_url``: this also runs inside the probe, which holds the probe lock.)
        other_host = ""
        if resp.status_code == 401 and resp.url and self._base is not None and _netloc(resp.url) != _netloc(self._base):
            other_host = urlsplit(resp.url).netloc
        creds = self.auth.credentials() if resp.status_code == 401 and not other_host else None
        return status_error(
            self.registry,
            op,
            resp.status_code,
            resp.reason or "",
            body,
            resp.headers,
            username=creds.username if creds is not None else "",
            other_host=other_host,
        )

    # -- requests -------------------------------------------------------------------------------------------
    def call(
        self,
        method: str,
        url: str,
        handler: Callable[[requests.Response], T],
        *,
        op: Operation,
        scopes: tuple[str, ...] = (),
        ok: Iterable[int] = (200,),
        headers: Headers = None,
        params: Any = None,
        body: Body = None,
        stream: bool = True,
        retry: bool = True,
    ) -> T:
        """Send ``method url`` (a path is joined to the registry base) authenticated for ``scopes`` and return
        ``handler(response)`` when the status is in ``ok``; anything else raises the RegistryError. Temporary
        failures, including a connection that breaks inside ``handler``, are retried (unless ``retry`` is False
        or the body cannot be rewound). ``headers`` may be a callable, evaluated for each attempt."""
        ok_set = frozenset(ok)
        wrapped = _Body(body)
        self.ensure_base(op)  # outside the attempt loop: the probe has its own retries

        def attempt() -> T:
            import requests

            full = self.url(url)
            h = headers() if callable(headers) else headers
            auth_url = self.base_url
            authorization = self.auth.authorization(scopes) if self.is_registry_url(full) else None
            send = functools.partial(
                self._send,
                method,
                full,
                body=wrapped,
                op=op,
                headers=h,
                params=params,
                stream=stream,
                auth_url=auth_url,
            )
            resp = send(authorization=authorization)
            if resp.status_code == 401 and self.is_registry_url(resp.url):
                challenge = resp.headers.get("WWW-Authenticate", "")
                wanted = self.auth.set_challenge(challenge) if challenge else None
                if wanted is not None:
                    self.auth.forget(authorization)
                    renewed = self.auth.authorization(merge_scopes(scopes, wanted), fresh=True)
                    if renewed is not None and renewed != authorization and wrapped.rewindable:
                        resp.close()
                        resp = send(authorization=renewed)
            with resp:
                if resp.status_code not in ok_set:
                    raise self.error_for(resp, op)
                try:
                    return handler(resp)
                except requests.exceptions.RequestException as e:
                    raise connection_error(self.registry, self.endpoint, op, e, urlsplit(full).netloc) from None

        return run_with_retries(
            attempt, self.retry if retry else _NO_RETRY, replayable=lambda: wrapped.rewindable, sleep=self.sleep
        )

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """:meth:`call` returning the response itself, its body already read."""
        kwargs["stream"] = False
        resp: requests.Response = self.call(method, url, _keep, **kwargs)
        return resp

    def _fetch_token(
        self,
        method: str,
        url: str,
        *,
        params: list[tuple[str, str]] | None = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """The transport's :class:`TokenFetcher`: credentials go to the token realm's host only."""
        op = Operation("get a token for")
        h = dict(headers or {})
        authorization = h.pop("Authorization", None)
        payload = urlencode(data).encode() if data is not None else None
        if payload is not None:
            h["Content-Type"] = "application/x-www-form-urlencoded"

        def attempt() -> tuple[int, bytes]:
            resp = self._send(
                method,
                url,
                body=_Body(payload),
                op=op,
                headers=h,
                params=params,
                authorization=authorization,
                auth_url=url,
            )
            with resp:
                if resp.status_code in (408, 429) or resp.status_code >= 500:
                    raise self.error_for(resp, op)
                return resp.status_code, resp.content

        return run_with_retries(attempt, self.retry, sleep=self.sleep)


_NO_RETRY = RetryPolicy(attempts=1)


def _keep(resp: requests.Response) -> requests.Response:
    return resp
