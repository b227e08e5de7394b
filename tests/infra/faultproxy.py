"""A transparent HTTP/1.1 reverse proxy that injects faults, for testing registry clients against bad networks.

Contract:

* ``FaultProxy(upstream_url, ca_path=None)`` listens on 127.0.0.1 with a free port (plain HTTP toward the
  client) and forwards every request to the upstream (HTTP or HTTPS; ``ca_path`` is the CA to trust), one
  upstream connection per request. Bodies stream both ways; chunked request bodies are forwarded chunked.
  Headers pass through except hop-by-hop ones; ``Host`` is the upstream's; absolute ``Location`` headers
  pointing at the upstream are rewritten to the proxy's own address. Upstream failures answer 502.
  ``upstream_headers`` (optional) are set on every forwarded request, replacing the client's headers of the
  same names: a storage front end that authorises to the registry with credentials of its own.
* ``add_fault(method, path, times, action)`` appends a rule. For each request the first rule whose method
  (None = any) and path regex (``re.search`` on the request target, i.e. path *and* query string) match and
  which has firings left fires once (``times=None`` never runs out). Actions: :func:`status`,
  :func:`reset_after`, :func:`corrupt_body`, :func:`truncate_body`, :func:`delay`, :func:`relocate`,
  :func:`drop_answer`.
* ``requests`` lists ``(method, target, status)`` for every request, recorded before the client receives
  anything (status None when the connection was dropped before a status line); ``count()`` filters it.
  ``headers_seen`` lists the headers of every request as the client sent them (:class:`HeaderRecord`).

The actions themselves live in :mod:`tests.infra.faults` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.infra.faults import (
    Action,
    CorruptBody,
    Delay,
    DropAnswer,
    FaultRule,
    HeaderRecord,
    Relocate,
    RequestRecord,
    ResetAfter,
    Status,
    TruncateBody,
    corrupt_body,
    delay,
    drop_answer,
    flip_bytes,
    relocate,
    relocated,
    reset_after,
    status,
    truncate_body,
)

# The actions are re-exported so tests need one import: ``from tests.infra.faultproxy import FaultProxy, status``.
__all__ = [
    "Action",
    "FaultProxy",
    "FaultRule",
    "HeaderRecord",
    "RequestRecord",
    "corrupt_body",
    "delay",
    "drop_answer",
    "relocate",
    "reset_after",
    "status",
    "truncate_body",
]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    }
)
_BUFSIZE = 64 * 1024


# -- the proxy ----------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (and our own resets) are expected; only real bugs get a traceback.
        if not isinstance(sys.exc_info()[1], OSError | http.client.HTTPException):
            super().handle_error(request, client_address)


class FaultProxy:
    """The proxy; started by the constructor. ``url``/``host`` are its address; ``stop()`` or ``with``."""

    def __init__(
        self,
        upstream_url: str,
        *,
        ca_path: str | Path | None = None,
        timeout: float = 60.0,
        upstream_headers: Mapping[str, str] | None = None,
    ) -> None:
        upstream = urllib.parse.urlsplit(upstream_url)
        if upstream.scheme not in ("http", "https") or not upstream.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {upstream_url!r}")
        self.upstream_url = upstream_url.rstrip("/")
        self._upstream = upstream
        self._upstream_port = upstream.port or (443 if upstream.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if upstream.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=str(ca_path) if ca_path else None)
        self.timeout = timeout
        self.upstream_headers = dict(upstream_headers or {})
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._records: list[RequestRecord] = []
        self._header_records: list[HeaderRecord] = []
        self._connections: set[socket.socket] = set()

        handler = type("_Handler", (_ProxyHandler,), {"proxy": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self.port = self._httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="faultproxy", daemon=True)
        self._thread.start()

    # -- rules and records ---------------------------------------------------------------------------

    def add_fault(
        self, method: str | None = None, path: str = "", times: int | None = 1, *, action: Action
    ) -> FaultRule:
        """Append a rule (see the module docstring); returns it so tests can read ``fired``."""
        rule = FaultRule(method.upper() if method else None, re.compile(path), times, action)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    def _take_rule(self, method: str, target: str) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, target):
                    rule.fired += 1
                    return rule
        return None

    def _record(self, method: str, target: str, code: int | None) -> None:
        with self._lock:
            self._records.append(RequestRecord(method, target, code))

    def _record_headers(self, method: str, target: str, headers: dict[str, str]) -> None:
        with self._lock:
            self._header_records.append(HeaderRecord(method, target, headers))

    @property
    def headers_seen(self) -> list[HeaderRecord]:
        """The headers of every request so far, as the client sent them, oldest first."""
        with self._lock:
            return list(self._header_records)

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._records)

    def count(self, method: str | None = None, path: str | None = None, status: int | None = None) -> int:
        """How many recorded requests match the method, the path regex (``re.search``) and the status."""
        pattern = re.compile(path) if path is not None else None
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (pattern is None or pattern.search(r.path))
            and (status is None or r.status == status)
        )

    def clear(self) -> None:
        """Forget the recorded requests and headers (rules stay)."""
        with self._lock:
            self._records.clear()
            self._header_records.clear()

    # -- upstream ------------------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        host = self._upstream.hostname or "127.0.0.1"
        if self._ssl is not None:
            return http.client.HTTPSConnection(host, self._upstream_port, timeout=self.timeout, context=self._ssl)
        return http.client.HTTPConnection(host, self._upstream_port, timeout=self.timeout)

    def rewrite_location(self, location: str) -> str:
        """Point an absolute upstream URL at the proxy; anything else is returned unchanged."""
        loc = urllib.parse.urlsplit(location)
        same_port = (loc.port or (443 if loc.scheme == "https" else 80)) == self._upstream_port
        upstream_names = {self._upstream.hostname, "127.0.0.1", "localhost", "::1"}
        if loc.scheme == self._upstream.scheme and loc.hostname in upstream_names and same_port:
            return urllib.parse.urlunsplit(("http", self.host, loc.path, loc.query, loc.fragment))
        return location

    # -- lifecycle -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop listening and cut open client connections; idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections end eventually

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded on the proxy instead

    def __getattr__(self, name: str) -> Any:
        # Every method (GET, HEAD, PUT, PATCH, DELETE, ...) is proxied the same way.
        if name.startswith("do_"):
            return self._proxy_request
        raise AttributeError(name)

    # -- request body --------------------------------------------------------------------------------

    def _has_body(self) -> bool:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        return chunked or int(self.headers.get("Content-Length") or 0) > 0

    def _body_pieces(self, limit: int | None = None) -> Any:
        """Yield the request body (de-chunked) in pieces, stopping after ``limit`` bytes if given."""
        remaining = limit
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                while size > 0:
                    want = min(size, _BUFSIZE) if remaining is None else min(size, _BUFSIZE, remaining)
                    if want == 0:
                        return
                    piece = self.rfile.read(want)
                    if not piece:
                        return
                    size -= len(piece)
                    if remaining is not None:
                        remaining -= len(piece)
                    yield piece
                self.rfile.readline(16)  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        if remaining is not None:
            length = min(length, remaining)
        while length > 0:
            piece = self.rfile.read(min(length, _BUFSIZE))
            if not piece:
                return
            length -= len(piece)
            yield piece

    # -- faults --------------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Abort the client connection with a RST."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the makefile() reference would otherwise keep the fd open
            sock.close()
        except OSError:
            pass

    def _send_status(self, action: Status) -> None:
        for _ in self._body_pieces():
            pass
        self.send_response_only(action.code)
        headers = {k.lower(): (k, v) for k, v in (action.headers or {}).items()}
        for key, value in headers.values():
            self.send_header(key, value)
        if "content-length" not in headers:
            self.send_header("Content-Length", str(len(action.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(action.body)

    # -- forwarding ----------------------------------------------------------------------------------

    def _proxy_request(self) -> None:
        proxy, method, target = self.proxy, self.command, self.path
        proxy._record_headers(method, target, dict(self.headers.items()))
        rule = proxy._take_rule(method, target)
        action = rule.action if rule else None
        if isinstance(action, Delay):
            time.sleep(action.seconds)
        if isinstance(action, Status):
            proxy._record(method, target, action.code)
            self._send_status(action)
            return
        if isinstance(action, ResetAfter) and (action.on == "request" or (action.on == "auto" and self._has_body())):
            for _ in self._body_pieces(limit=action.nbytes):
                pass
            proxy._record(method, target, None)
            self._reset()
            return
        try:
            conn = proxy._connect()
        except OSError:
            self._bad_gateway(method, target)
            return
        try:
            self._forward(conn, method, target, action)
        finally:
            conn.close()

    def _bad_gateway(self, method: str, target: str) -> None:
        self.proxy._record(method, target, 502)
        self.close_connection = True
        self.send_response_only(502)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def _forward(self, conn: http.client.HTTPConnection, method: str, target: str, action: Action | None) -> None:
        proxy = self.proxy
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        dropped = {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", proxy._upstream.netloc)
            replaced = {name.lower() for name in proxy.upstream_headers}
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() not in dropped and name.lower() not in replaced:
                    conn.putheader(name, value)
            for name, value in proxy.upstream_headers.items():
                conn.putheader(name, value)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
        except (OSError, http.client.HTTPException):
            self._bad_gateway(method, target)
            return
        try:
            for piece in self._body_pieces():
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except OSError:
            # The upstream answered early and closed; its response may still be readable. We stopped reading
            # the client's body midway, so this client connection cannot be reused.
            self.close_connection = True
        try:
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            self._bad_gateway(method, target)
            return
        self._relay(resp, method, target, action)

    def _relay(self, resp: http.client.HTTPResponse, method: str, target: str, action: Action | None) -> None:
        if isinstance(action, DropAnswer):
            self.proxy._record(method, target, None)  # the upstream answered resp.status; the client hears nothing
            self._reset()
            return
        length = resp.getheader("Content-Length")
        has_body = method != "HEAD" and resp.status not in (204, 304) and resp.status >= 200
        rechunk = has_body and length is None
        self.proxy._record(method, target, resp.status)
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() in _HOP_BY_HOP:
                continue
            if name.lower() == "location":
                value = self.proxy.rewrite_location(value)
                if isinstance(action, Relocate):
                    value = relocated(value, action.base)
            self.send_header(name, value)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        limit: int | None = None
        if isinstance(action, TruncateBody | ResetAfter):
            limit = action.nbytes
        sent = 0
        while has_body and (limit is None or sent < limit):
            piece = resp.read1(_BUFSIZE)
            if not piece:
                break
            if limit is not None:
                piece = piece[: limit - sent]
            if isinstance(action, CorruptBody):
                piece = flip_bytes(piece, sent, action)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if rechunk else piece)
            sent += len(piece)
        if isinstance(action, ResetAfter):
            # let the client read what was sent first: a RST discards data still unread in its receive buffer,
            # and a loaded machine would otherwise make "reset after N bytes" a reset after 0 bytes
            with contextlib.suppress(OSError):
                self.wfile.flush()
            time.sleep(0.3)
            self._reset()
        elif isinstance(action, TruncateBody):
            self.close_connection = True  # finish() then shuts the socket down cleanly
        elif rechunk:
            self.wfile.write(b"0\r\n\r\n")
