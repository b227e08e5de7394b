"""docker's config.json and credential helpers (a fake ``docker-credential-test`` on PATH)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from imgci.errors import CredentialsError
from imgci.registry import login, logout, normalize_server
from imgci.registry.credentials import (
    Credentials,
    config_path,
    load_credentials,
    normalize_key,
    remove_credentials,
    save_credentials,
    server_key,
)


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "docker"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d / "config.json"


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


HELPER = r"""#!/usr/bin/env python3
import json, os, sys
store = os.environ["FAKE_HELPER_STORE"]
action = sys.argv[1]
data = json.load(open(store)) if os.path.exists(store) else {}
with open(store + ".log", "a") as log:
    log.write(action + "\n")
if action == "get":
    url = sys.stdin.read().strip()
    if url == "explode":
        print("the keychain is on fire"); sys.exit(1)
    if url not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps({"ServerURL": url, "Username": data[url][0], "Secret": data[url][1]}))
elif action == "store":
    req = json.load(sys.stdin)
    data[req["ServerURL"]] = [req["Username"], req["Secret"]]
    json.dump(data, open(store, "w"))
elif action == "erase":
    url = sys.stdin.read().strip()
    data.pop(url, None)
    json.dump(data, open(store, "w"))
"""


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "docker-credential-test"
    script.write_text(HELPER)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    store = tmp_path / "helper-store.json"
    monkeypatch.setenv("FAKE_HELPER_STORE", str(store))
    return store


def test_config_path_honours_docker_config(docker_config: Path) -> None:
    assert config_path() == docker_config


def test_missing_file_is_anonymous(docker_config: Path) -> None:
    assert load_credentials("localhost:5000") is None


def test_auth_field_and_username_password(docker_config: Path) -> None:
    docker_config.write_text(
        json.dumps(
            {
                "auths": {
                    "localhost:5000": {"auth": b64("alice:pa:ss")},
                    "reg.example": {"username": "bob", "password": "pw"},
                }
            }
        )
    )
    assert load_credentials("localhost:5000") == Credentials("alice", "pa:ss")
    assert load_credentials("reg.example") == Credentials("bob", "pw")


def test_keys_are_normalised_like_docker(docker_config: Path) -> None:
    docker_config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": b64("hub:1")},
                    "https://reg.example/v1/": {"auth": b64("old:2")},
                    "http://plain.example:5000": {"auth": b64("plain:3")},
                }
            }
        )
    )
    assert load_credentials("docker.io") == Credentials("hub", "1")
    assert load_credentials("reg.example") == Credentials("old", "2")
    assert load_credentials("plain.example:5000") == Credentials("plain", "3")
    assert server_key("docker.io") == "https://index.docker.io/v1/"
    assert normalize_key("https://registry-1.docker.io/v2/") == "https://index.docker.io/v1/"
    assert normalize_server("https://index.docker.io/v1/") == "docker.io"
    assert normalize_server("http://localhost:5000/") == "localhost:5000"


def test_identity_and_registry_tokens(docker_config: Path) -> None:
    docker_config.write_text(
        json.dumps({"auths": {"a.example": {"identitytoken": "refresh"}, "b.example": {"registrytoken": "bearer"}}})
    )
    assert load_credentials("a.example") == Credentials(identity_token="refresh")
    assert load_credentials("b.example") == Credentials(registry_token="bearer")


def test_secrets_are_not_in_repr() -> None:
    text = repr(Credentials("alice", "hunter2", "idtok", "regtok"))
    assert "alice" in text and "hunter2" not in text and "idtok" not in text and "regtok" not in text


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"auths": []}', '{"credsStore": 3}'],
)
def test_malformed_config_names_the_file(docker_config: Path, content: str) -> None:
    docker_config.write_text(content)
    with pytest.raises(CredentialsError, match=str(docker_config)):
        load_credentials("localhost:5000")


def test_bad_base64_is_reported_without_the_value(docker_config: Path) -> None:
    docker_config.write_text(json.dumps({"auths": {"r.example": {"auth": b64("no-colon-here")}}}))
    with pytest.raises(CredentialsError, match=r"r\.example") as exc:
        load_credentials("r.example")
    assert "no-colon-here" not in str(exc.value)


def test_save_writes_0600_atomically_and_keeps_other_keys(docker_config: Path) -> None:
    docker_config.write_text(
        json.dumps({"auths": {"other.example": {"auth": b64("o:p")}}, "psFormat": "table {{.ID}}", "proxies": {}})
    )
    save_credentials("localhost:5000", "alice", "s3cret")
    doc = json.loads(docker_config.read_text())
    assert doc["psFormat"] == "table {{.ID}}" and doc["proxies"] == {}
    assert doc["auths"]["other.example"] == {"auth": b64("o:p")}
    assert doc["auths"]["localhost:5000"] == {"auth": b64("alice:s3cret")}
    assert stat.S_IMODE(docker_config.stat().st_mode) == 0o600
    assert [p.name for p in docker_config.parent.iterdir()] == ["config.json"]  # no temp file left
    assert load_credentials("localhost:5000") == Credentials("alice", "s3cret")


def test_save_replaces_legacy_spelling_and_remove(docker_config: Path) -> None:
    docker_config.write_text(json.dumps({"auths": {"https://localhost:5000/v1/": {"auth": b64("old:x")}}}))
    save_credentials("localhost:5000", "new", "y")
    assert list(json.loads(docker_config.read_text())["auths"]) == ["localhost:5000"]
    assert remove_credentials("localhost:5000") is True
    assert load_credentials("localhost:5000") is None
    assert json.loads(docker_config.read_text())["auths"] == {}


def test_creds_store_helper_get_store_erase(docker_config: Path, helper: Path) -> None:
    docker_config.write_text(json.dumps({"credsStore": "test", "auths": {}}))
    assert load_credentials("localhost:5000") is None  # "credentials not found" → anonymous
    save_credentials("localhost:5000", "alice", "from-helper")
    doc = json.loads(docker_config.read_text())
    assert doc["auths"]["localhost:5000"] == {}  # as docker: the secret lives in the helper only
    assert "from-helper" not in docker_config.read_text()
    assert load_credentials("localhost:5000") == Credentials("alice", "from-helper")
    remove_credentials("localhost:5000")
    assert load_credentials("localhost:5000") is None
    assert helper.with_suffix(".json.log").read_text().split() == ["get", "store", "get", "erase", "get"]


def test_cred_helpers_per_registry_and_token_username(docker_config: Path, helper: Path) -> None:
    helper.write_text(json.dumps({"reg.example": ["<token>", "identity-123"]}))
    docker_config.write_text(json.dumps({"credHelpers": {"reg.example": "test"}}))
    assert load_credentials("reg.example") == Credentials(identity_token="identity-123")


def test_helper_failure_and_missing_helper(docker_config: Path, helper: Path) -> None:
    docker_config.write_text(json.dumps({"credHelpers": {"explode": "test", "gone.example": "absent"}}))
    with pytest.raises(CredentialsError, match="docker-credential-test get failed: the keychain is on fire"):
        load_credentials("explode")
    with pytest.raises(CredentialsError, match=r"docker-credential-absent .* is not on PATH"):
        load_credentials("gone.example")


def test_logout_and_login_without_registry_contact_for_logout(docker_config: Path) -> None:
    save_credentials("localhost:5000", "a", "b")
    assert logout("http://localhost:5000") == "localhost:5000"
    assert load_credentials("localhost:5000") is None
    assert callable(login)
