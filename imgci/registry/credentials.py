"""Registry credentials from docker's ``config.json`` and ``docker-credential-*`` helpers, as docker reads them.

Contract:
- The file is ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``; a missing file means anonymous.
- Lookup order for a registry: ``credHelpers[key]`` → ``credsStore`` → the ``auths`` entry. ``key`` is
  ``https://index.docker.io/v1/`` for Docker Hub and ``host[:port]`` otherwise; ``auths`` keys are compared after
  docker's normalisation (``http(s)://`` and any path stripped), so ``https://reg.example/v1/`` matches ``reg.example``.
- A helper answering "credentials not found" means anonymous; any other helper failure, and a config file that is
  not a JSON object, raise :class:`CredentialsError` naming the file or the helper.
- ``save_credentials`` and ``remove_credentials`` go through the configured helper when there is one, else edit
  ``auths``; the file is rewritten atomically with mode 0600 and every key imgci does not own is preserved.
- Secrets never appear in ``repr`` or in any error message.

This module does not import requests: ``imgci login``/``logout`` and config parsing stay cheap.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgci.errors import CredentialsError

DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io", DOCKER_HUB_SERVER}
_TOKEN_USERNAME = "<token>"  # what docker helpers return as Username when Secret is an identity token
_HELPER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Credentials:
    """What to authenticate with. ``identity_token`` is an OAuth2 refresh token; ``registry_token`` a bearer token
    sent to the registry as is. Secrets are hidden from ``repr``."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @property
    def is_empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)


def config_dir() -> Path:
    """``$DOCKER_CONFIG`` or ``~/.docker``."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env).expanduser() if env else Path.home() / ".docker"


def config_path() -> Path:
    return config_dir() / "config.json"


def server_key(registry: str) -> str:
    """The key docker uses for ``registry`` in config.json and with helpers."""
    return DOCKER_HUB_SERVER if registry in _HUB_NAMES else registry


def normalize_key(key: str) -> str:
    """docker's ``ConvertToHostname``: strip ``http://``/``https://`` and anything after the first ``/``."""
    if key == DOCKER_HUB_SERVER:
        return key
    stripped = key.removeprefix("http://").removeprefix("https://")
    host = stripped.split("/", 1)[0]
    return DOCKER_HUB_SERVER if host in _HUB_NAMES else host


def _load_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CredentialsError(f"cannot read docker config {path}: {e.strerror or e}") from None
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise CredentialsError(f"docker config {path} is not valid JSON: {e}", hint="fix or remove the file") from None
    if not isinstance(doc, dict):
        raise CredentialsError(f"docker config {path} is not a JSON object", hint="fix or remove the file")
    for name in ("auths", "credHelpers"):
        if name in doc and not isinstance(doc[name], dict):
            raise CredentialsError(f"docker config {path}: {name!r} must be an object")
    if "credsStore" in doc and not isinstance(doc["credsStore"], str):
        raise CredentialsError(f"docker config {path}: 'credsStore' must be a string")
    return doc


def _helper_for(doc: dict[str, Any], key: str) -> str:
    helpers: dict[str, Any] = doc.get("credHelpers") or {}
    for candidate in (key, normalize_key(key)):
        helper = helpers.get(candidate)
        if isinstance(helper, str) and helper:
            return helper
    store = doc.get("credsStore")
    return store if isinstance(store, str) else ""


def _find_auth_entry(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    auths: dict[str, Any] = doc.get("auths") or {}
    entry = auths.get(key)
    if entry is None:
        wanted = normalize_key(key)
        for k, v in auths.items():
            if normalize_key(k) == wanted:
                entry = v
                break
    return entry if isinstance(entry, dict) else None


def _decode_entry(entry: dict[str, Any], key: str, path: Path) -> Credentials | None:
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    auth = entry.get("auth")
    if auth:
        try:
            decoded = base64.b64decode(str(auth), validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"docker config {path}: the 'auth' value for {key} is not base64") from None
        user, sep, pw = decoded.partition(":")
        if not sep:
            raise CredentialsError(f"docker config {path}: the 'auth' value for {key} is not base64 of user:password")
        username, password = user, pw
    creds = Credentials(
        username=username,
        password=password,
        identity_token=str(entry.get("identitytoken") or ""),
        registry_token=str(entry.get("registrytoken") or ""),
    )
    return None if creds.is_empty else creds


# Credential helpers --------------------------------------------------------------------------------------------
def _run_helper(helper: str, action: str, stdin: str) -> subprocess.CompletedProcess[str]:
    program = f"docker-credential-{helper}"
    exe = shutil.which(program)
    if exe is None:
        raise CredentialsError(
            f"credential helper {program} (configured in {config_path()}) is not on PATH",
            hint=f"install {program} or remove it from the docker config",
        )
    try:
        return subprocess.run(
            [exe, action], input=stdin, capture_output=True, text=True, timeout=_HELPER_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CredentialsError(f"credential helper {program} {action} failed: {e}") from None


def _helper_message(proc: subprocess.CompletedProcess[str]) -> str:
    # Helpers print their error on stdout; never echo it whole in case it holds a secret — first line only.
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return text[0][:200] if text else f"exit status {proc.returncode}"


def _is_not_found(proc: subprocess.CompletedProcess[str]) -> bool:
    return "credentials not found" in (proc.stdout + proc.stderr).lower()


def helper_get(helper: str, key: str) -> Credentials | None:
    """``docker-credential-<helper> get``; None when the helper has nothing for ``key``."""
    proc = _run_helper(helper, "get", key)
    if proc.returncode != 0:
        if _is_not_found(proc):
            return None
        raise CredentialsError(f"credential helper docker-credential-{helper} get failed: {_helper_message(proc)}")
    try:
        doc = json.loads(proc.stdout)
        username, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    except (ValueError, AttributeError):
        raise CredentialsError(f"credential helper docker-credential-{helper} get printed invalid JSON") from None
    if username == _TOKEN_USERNAME:
        return Credentials(identity_token=secret)
    creds = Credentials(username=username, password=secret)
    return None if creds.is_empty else creds


def _helper_store(helper: str, key: str, username: str, secret: str) -> None:
    payload = json.dumps({"ServerURL": key, "Username": username, "Secret": secret})
    proc = _run_helper(helper, "store", payload)
    if proc.returncode != 0:
        raise CredentialsError(f"credential helper docker-credential-{helper} store failed: {_helper_message(proc)}")


def _helper_erase(helper: str, key: str) -> None:
    proc = _run_helper(helper, "erase", key)
    if proc.returncode != 0 and not _is_not_found(proc):
        raise CredentialsError(f"credential helper docker-credential-{helper} erase failed: {_helper_message(proc)}")


# Public API ----------------------------------------------------------------------------------------------------
def load_credentials(registry: str, *, path: Path | None = None) -> Credentials | None:
    """The credentials docker would use for ``registry`` (a host[:port] or ``docker.io``); None = anonymous."""
    path = path or config_path()
    doc = _load_config(path)
    key = server_key(registry)
    helper = _helper_for(doc, key)
    if helper:
        creds = helper_get(helper, key)
        if creds is not None:
            return creds
        # docker falls back to the file only for credsStore misses it can't distinguish; we do the same.
    entry = _find_auth_entry(doc, key)
    return None if entry is None else _decode_entry(entry, key, path)


def _write_config(path: Path, doc: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)
                json.dump(doc, f, indent="\t")
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise CredentialsError(f"cannot write docker config {path}: {e.strerror or e}") from None


def _drop_auth_entries(doc: dict[str, Any], key: str) -> bool:
    auths: dict[str, Any] = doc.get("auths") or {}
    wanted = normalize_key(key)
    doomed = [k for k in auths if k == key or normalize_key(k) == wanted]
    for k in doomed:
        del auths[k]
    return bool(doomed)


def save_credentials(registry: str, username: str, password: str, *, path: Path | None = None) -> Path:
    """Remember credentials for ``registry`` the way ``docker login`` does; returns the config file path.

    With a helper configured the secret goes to the helper and ``auths`` keeps an empty entry (as docker does);
    otherwise ``auths[key].auth`` holds base64(user:password).
    """
    path = path or config_path()
    doc = _load_config(path)
    key = server_key(registry)
    helper = _helper_for(doc, key)
    _drop_auth_entries(doc, key)
    auths = doc.setdefault("auths", {})
    if helper:
        _helper_store(helper, key, username, password)
        auths[key] = {}
    else:
        auths[key] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode("ascii")}
    _write_config(path, doc)
    return path


def remove_credentials(registry: str, *, path: Path | None = None) -> bool:
    """Forget credentials for ``registry`` (helper and file); True if anything was removed from the file."""
    path = path or config_path()
    doc = _load_config(path)
    key = server_key(registry)
    helper = _helper_for(doc, key)
    if helper:
        _helper_erase(helper, key)
    removed = _drop_auth_entries(doc, key)
    if removed:
        _write_config(path, doc)
    return removed or bool(helper)
