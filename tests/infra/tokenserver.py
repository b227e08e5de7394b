"""A Bearer token issuer for the docker/OCI registry token flow, for tests only.

Contract:

* ``GET /token?service=S&scope=repository:NAME:pull,push&scope=…`` with optional HTTP Basic credentials
  answers ``{"token", "access_token", "expires_in", "issued_at"}``; the token is a JWT (RS256 for an RSA key,
  ES256 for EC) with claims ``iss, sub, aud=service, exp, nbf, iat, jti, access``.
* ``POST /token`` with a form body (``grant_type=password`` + username/password, the OAuth2 flow docker uses
  with ``--password-stdin`` logins) answers ``{"access_token", "expires_in", "issued_at", "scope"}``.
* The configured user gets every action it asks for; an anonymous caller gets the requested actions that
  are also in ``anonymous_actions`` (default: pull only; an empty tuple grants nothing, and the registry
  then answers 401 with the empty-access token). A wrong password or unknown user answers 401.
  ``policy`` replaces these rules entirely when given.
* Every request is recorded in ``requests`` (thread-safe); ``scopes`` flattens the requested scopes.

Distribution 2.8 accepts the signing key through either JWS header it knows: ``kid`` (looked up, by libtrust
key ID, among the public keys of the certificates in ``auth.token.rootcertbundle``) or ``x5c`` (a chain
verified against that bundle). ``header="kid"`` (default) and ``header="x5c"`` select which one is sent.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import jwt

from tests.infra import certs

# policy(account or None for anonymous, resource type, resource name, requested actions) -> granted actions
Policy = Callable[[str | None, str, str, list[str]], list[str]]


@dataclass(frozen=True)
class TokenRequest:
    """One request seen by the token server."""

    method: str
    account: str | None  # the authenticated user; None for anonymous or rejected requests
    service: str | None
    scopes: tuple[str, ...]
    status: int
    access: list[dict[str, Any]] = field(default_factory=list)  # what the issued token grants


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split ``type:name:a,b`` (the name may contain ':' for a host:port) into its parts; None if malformed."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """A threaded token issuer on 127.0.0.1 with a free port; started by the constructor.

    ``cert_path`` is the PEM of the signing certificate, to be used as the registry's ``rootcertbundle``.
    Use as a context manager or call ``stop()``.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        service: str = "imgci-test-registry",
        issuer: str = "imgci-test-issuer",
        username: str = "testuser",
        password: str = "testpass",
        anonymous_actions: Collection[str] = ("pull",),
        policy: Policy | None = None,
        key_type: certs.KeyType = "rsa",
        header: Literal["kid", "x5c"] = "kid",
        ttl: int = 300,
    ) -> None:
        self._owns_dir = workdir is None
        parent = None if workdir is None else Path(workdir)
        self.workdir = Path(tempfile.mkdtemp(prefix="tokenserver-", dir=parent))
        self.service = service
        self.issuer = issuer
        self.username = username
        self.password = password
        self.anonymous_actions = frozenset(anonymous_actions)
        self.policy = policy
        self.header = header
        self.ttl = ttl
        self._key = certs.generate_key(key_type)
        self._algorithm = "RS256" if key_type == "rsa" else "ES256"
        self._cert = certs.make_self_signed(self._key, "imgci test token signer", ca=True)
        self.cert_path = certs.write_cert(self.workdir / "token-signer.pem", self._cert)
        self.key_id = certs.libtrust_key_id(self._key)
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []

        handler = type("_Handler", (_TokenHandler,), {"token_server": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.realm = f"{self.url}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="tokenserver", daemon=True)
        self._thread.start()

    # -- recording -----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def scopes(self) -> list[str]:
        """Every scope string requested so far, in order, duplicates kept."""
        return [s for r in self.requests for s in r.scopes]

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # -- issuing -------------------------------------------------------------------------------------

    def authenticate(self, username: str | None, password: str | None) -> tuple[bool, str | None]:
        """(ok, account): no credentials is ok and anonymous; wrong ones are not ok."""
        if username is None:
            return True, None
        if secrets.compare_digest(username, self.username) and secrets.compare_digest(password or "", self.password):
            return True, username
        return False, None

    def grant(self, account: str | None, scopes: Collection[str]) -> list[dict[str, Any]]:
        """The ``access`` claim for ``account`` asking for ``scopes``."""
        merged: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            if self.policy is not None:
                granted = self.policy(account, kind, name, actions)
            elif account is not None:
                granted = actions
            else:
                granted = [a for a in actions if a in self.anonymous_actions]
            have = merged.setdefault((kind, name), [])
            have.extend(a for a in granted if a not in have)
        return [{"type": k, "name": n, "actions": a} for (k, n), a in merged.items() if a]

    def issue(self, account: str | None, service: str | None, access: list[dict[str, Any]]) -> str:
        """A signed JWT; ``aud`` is the requested service (or ours when none was given)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": service or self.service,
            "exp": now + self.ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        # Distribution 2.8 finds the key by libtrust ``kid`` among rootcertbundle keys, or verifies ``x5c``.
        headers: dict[str, Any] = (
            {"x5c": [certs.cert_der_b64(self._cert)]} if self.header == "x5c" else {"kid": self.key_id}
        )
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=headers)

    # -- lifecycle -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop serving; idempotent. Removes the work directory only if the server created it itself."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TokenServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _TokenHandler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; requests are recorded on the server instead

    def _basic_credentials(self) -> tuple[str | None, str | None]:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, None
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
        except ValueError:
            return "", ""
        return user, password

    def _send_json(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _answer(
        self, account_given: tuple[str | None, str | None], service: str | None, scopes: tuple[str, ...], oauth: bool
    ) -> None:
        server = self.token_server
        ok, account = server.authenticate(*account_given)
        if not ok:
            server._record(TokenRequest(self.command, None, service, scopes, 401))
            self._send_json(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                {"WWW-Authenticate": 'Basic realm="imgci-test-token"'},
            )
            return
        access = server.grant(account, scopes)
        token = server.issue(account, service, access)
        server._record(TokenRequest(self.command, account, service, scopes, 200, access))
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        payload: dict[str, Any] = {"access_token": token, "expires_in": server.ttl, "issued_at": issued_at}
        if oauth:
            payload["scope"] = " ".join(scopes)
        else:
            payload["token"] = token
        self._send_json(200, payload)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self._send_json(404, {"error": "not found"})
            return
        query = urllib.parse.parse_qs(url.query)
        service = query.get("service", [None])[0]
        scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
        self._answer(self._basic_credentials(), service, scopes, oauth=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        if urllib.parse.urlsplit(self.path).path != "/token":
            self._send_json(404, {"error": "not found"})
            return
        if form.get("grant_type", [""])[0] != "password":
            self._send_json(400, {"error": "unsupported_grant_type"})
            return
        creds = (form.get("username", [None])[0], form.get("password", [None])[0])
        service = form.get("service", [None])[0]
        scopes = tuple(s for value in form.get("scope", []) for s in value.split(" ") if s)
        self._answer(creds, service, scopes, oauth=True)
