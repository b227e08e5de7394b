"""A real distribution registry (``docker-registry serve``, v2.8) on 127.0.0.1, for integration tests.

Contract: ``RegistryServer(...)`` starts the registry in the constructor and returns once ``GET /v2/``
answers 200 or 401; ``stop()`` (or leaving the ``with`` block) terminates it, then kills it after a grace
period. Everything it writes (config, certificates, htpasswd, storage, log) lives in a directory it creates:
a fresh ``tempfile.mkdtemp`` under ``workdir`` (so several servers can share a pytest ``tmp_path``), or under
the system temp dir when ``workdir`` is None, in which case ``stop()`` removes it.

Modes:

* plain HTTP: ``RegistryServer(workdir)``;
* TLS: ``tls=True`` — a fresh CA and a server certificate for 127.0.0.1, ::1 and localhost; ``ca_path`` is the
  CA PEM to trust;
* Basic auth: ``auth="basic"`` — a bcrypt htpasswd for ``username``/``password``. Distribution 2.8 serves
  htpasswd auth over plain HTTP too (the docs ask for TLS, the code does not enforce it), so basic does not
  imply TLS; pass ``tls=True`` as well to get both;
* Bearer tokens: ``auth="token"`` — a :class:`TokenServer` (``token_server``) issues the tokens; the registry
  trusts its signing certificate. ``anonymous_actions`` is passed on to it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import requests

from tests.infra import certs
from tests.infra.process import terminate
from tests.infra.tokenserver import TokenServer

REGISTRY_BINARY = "docker-registry"


class RegistryStartError(RuntimeError):
    """The registry did not come up; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 race applies; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def make_htpasswd(username: str, password: str) -> str:
    """One bcrypt htpasswd line (distribution only accepts bcrypt), via the ``bcrypt`` module or htpasswd(1)."""
    try:
        import bcrypt  # optional; apache2-utils is the fallback

        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        return f"{username}:{hashed}\n"
    except ImportError:
        out = subprocess.run(
            ["htpasswd", "-Bbn", "-C", "5", username, password],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip() + "\n"


class RegistryServer:
    """A running ``docker-registry`` on 127.0.0.1; see the module docstring for modes and lifecycle.

    Attributes: ``host`` ("127.0.0.1:PORT"), ``port``, ``url`` (http:// or https://), ``ca_path`` (or None),
    ``username``/``password`` (None without auth), ``storage_dir``, ``log_path``, ``config_path``,
    ``workdir``, ``token_server`` (or None).
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        tls: bool = False,
        auth: Literal["basic", "token"] | None = None,
        username: str = "testuser",
        password: str = "testpass",
        anonymous_actions: Collection[str] = ("pull",),
        token_key_type: certs.KeyType = "rsa",
        token_header: Literal["kid", "x5c"] = "kid",
        binary: str = REGISTRY_BINARY,
        start_timeout: float = 15.0,
    ) -> None:
        if auth not in (None, "basic", "token"):
            raise ValueError(f"unknown auth mode {auth!r}")
        self._owns_dir = workdir is None
        parent = None if workdir is None else Path(workdir)
        self.workdir = Path(tempfile.mkdtemp(prefix="registry-", dir=parent))
        self.tls = tls
        self.auth = auth
        self.username = username if auth else None
        self.password = password if auth else None
        self.storage_dir = self.workdir / "storage"
        self.storage_dir.mkdir()
        self.log_path = self.workdir / "registry.log"
        self.config_path = self.workdir / "config.yml"
        self.ca_path: Path | None = None
        self.token_server: TokenServer | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.port = 0
        try:
            self._tls_files = self._make_tls() if tls else None
            auth_config = self._make_auth(username, password, anonymous_actions, token_key_type, token_header)
            self._start(binary, auth_config, start_timeout)
        except BaseException:
            self.stop()
            raise

    # -- setup ---------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def verify(self) -> str | bool:
        """What to pass as ``requests``' ``verify=``: the CA path under TLS, else True."""
        return str(self.ca_path) if self.ca_path else True

    def _make_tls(self) -> tuple[Path, Path]:
        ca_key = certs.generate_key("ec")
        ca_cert = certs.make_self_signed(ca_key, "imgci test CA", ca=True)
        self.ca_path = certs.write_cert(self.workdir / "ca.pem", ca_cert)
        key = certs.generate_key("ec")
        cert = certs.make_server_cert(ca_key, ca_cert, key)
        # The chain file carries the leaf then the CA, as a real server would send it.
        return (
            certs.write_cert(self.workdir / "server.pem", cert, ca_cert),
            certs.write_key(self.workdir / "server-key.pem", key),
        )

    def _make_auth(
        self,
        username: str,
        password: str,
        anonymous_actions: Collection[str],
        key_type: certs.KeyType,
        header: Literal["kid", "x5c"],
    ) -> dict[str, Any] | None:
        if self.auth == "basic":
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(make_htpasswd(username, password))
            return {"htpasswd": {"realm": "imgci-test", "path": str(htpasswd)}}
        if self.auth == "token":
            self.token_server = TokenServer(
                self.workdir,
                username=username,
                password=password,
                anonymous_actions=anonymous_actions,
                key_type=key_type,
                header=header,
            )
            ts = self.token_server
            return {
                "token": {
                    "realm": ts.realm,
                    "service": ts.service,
                    "issuer": ts.issuer,
                    "rootcertbundle": str(ts.cert_path),
                }
            }
        return None

    def _config(self, auth_config: dict[str, Any] | None) -> dict[str, Any]:
        http: dict[str, Any] = {
            "addr": self.host,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self._tls_files:
            http["tls"] = {"certificate": str(self._tls_files[0]), "key": str(self._tls_files[1])}
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
            "health": {"storagedriver": {"enabled": False}},
        }
        if auth_config:
            config["auth"] = auth_config
        return config

    def _start(self, binary: str, auth_config: dict[str, Any] | None, timeout: float) -> None:
        # REGISTRY_* variables override the config file; a stray one in CI would change the mode under test.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            # JSON is YAML, so no YAML library is needed to write the config.
            self.config_path.write_text(json.dumps(self._config(auth_config), indent=2))
            self._proc = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )
            if self._wait_ready(timeout):
                return
            if "address already in use" not in self.log_tail():
                break
        raise RegistryStartError(f"docker-registry did not start ({self.config_path}):\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        with requests.Session() as session:
            session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override verify=
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False
                try:
                    status = session.get(f"{self.url}/v2/", verify=self.verify, timeout=1).status_code
                    if status in (200, 401):
                        return True
                except requests.RequestException:
                    pass
                time.sleep(0.05)
        self._terminate()
        return False

    # -- inspection ----------------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the registry's combined stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        """Whether the registry process is still alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------------

    def _terminate(self, grace: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, grace, after_kill=grace)

    def stop(self) -> None:
        """Stop the registry and its token server; idempotent. Removes the directory only if it made its own."""
        self._terminate()
        if self.token_server is not None:
            self.token_server.stop()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RegistryServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RegistryServer(url={self.url!r}, auth={self.auth!r}, workdir={str(self.workdir)!r})"
