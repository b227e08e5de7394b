"""Secrets never leak: one build that handles every kind of secret imgci sees, then a search of everything it wrote.

The secrets: the registry password (``imgci login``, Basic auth over TLS), ``GITHUB_TOKEN`` and
``IMGCI_GITHUB_TOKEN`` in the environment, a ``--secret id=s,env=MYSECRET`` value read by a ``RUN --mount=type=secret``,
and the user name and password in an ``ADD http://user:pw@host/file`` URL. Each is searched for raw, base64
(standard and URL-safe, at the three byte alignments) and URL-encoded in: every file of the state directory (layer
blobs decompressed), the local cache export, the registry's storage (the pushed image and the registry cache
export), the ``--metadata-file``, ``imgci-metadata.json``, ``$GITHUB_OUTPUT``, ``$GITHUB_STEP_SUMMARY`` and the
stdout and ``--debug`` stderr of every command. Zero hits, except ``::add-mask::`` lines (GitHub needs the value to
mask it).

A build arg named like a secret (``API_TOKEN``) is stored in the image history and the cache keys, as docker does:
its value is not searched for, but the build must warn about it (once per build, without the value).
"""

from __future__ import annotations

import base64
import gzip
import json
import secrets
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zstandard

from imgci.build.builder import secret_arg_warnings
from tests.conftest import Imgci
from tests.infra.ciemul import github_actions_env
from tests.infra.fakegithub import FakeGitHub
from tests.infra.registry import RegistryServer

pytestmark = pytest.mark.integration

SHA = "0123456789abcdef0123456789abcdef01234567"
SERVED = b"downloaded file contents\n"


# -- the secrets and their encodings ------------------------------------------------------------------------------
def _b64_aligned(secret: bytes) -> set[bytes]:
    """The base64 text of ``secret`` wherever it starts in the encoded data: for 0, 1 and 2 bytes before it, the
    characters that depend on the secret's bytes only (the partial characters at both edges trimmed)."""
    forms: set[bytes] = set()
    for shift in range(3):
        start = -(-8 * shift // 6)  # first character whose 6 bits all come from the secret
        end = 8 * (shift + len(secret)) // 6  # one past the last such character
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(b"\0" * shift + secret)[start:end])
    return forms


def encodings(secret: str) -> set[bytes]:
    """``secret`` raw, base64 (every alignment, standard and URL-safe) and URL-encoded (%XX and form encoding)."""
    raw = secret.encode()
    forms = {raw, *_b64_aligned(raw)}
    forms |= {urllib.parse.quote(secret, safe="").encode(), urllib.parse.quote_plus(secret).encode()}
    forms |= {urllib.parse.quote(secret).encode()}
    assert all(len(f) >= 12 for f in forms), forms  # long enough that a hit is never a coincidence
    return forms


def _decompressed(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _files(root: Path) -> Iterator[tuple[str, bytes]]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            yield str(p), _decompressed(p.read_bytes())


def _without_mask_commands(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("::add-mask::"))


# -- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secret_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A Basic-auth TLS registry of this module's own, with a random password, and empty storage to search."""
    password = f"reg+pw/{secrets.token_urlsafe(16)}"
    with RegistryServer(tmp_path_factory.mktemp("registry"), tls=True, auth="basic", password=password) as reg:
        yield reg


class _FileServer:
    """Serves ``SERVED`` for any GET and records the Authorization headers it got (the URL's credentials)."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.authorizations.append(self.headers.get("Authorization", ""))
                self.send_response(200)
                self.send_header("Content-Length", str(len(SERVED)))
                self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
                self.end_headers()
                self.wfile.write(SERVED)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dockerfile(base: str, url: str) -> str:
    """Two stages that both declare the secret-looking build arg (the warning is per build, not per stage); the
    host environment is dumped into a layer (GITHUB_TOKEN must not be in a RUN's environment), proxy variables
    aside (RUN gets those on purpose, as docker does)."""
    return f"""\
FROM {base} AS tools
ARG API_TOKEN
RUN echo tools > /tools.txt

FROM {base}
ARG API_TOKEN
ADD {url} /downloaded.txt
COPY --from=tools /tools.txt /tools.txt
RUN --mount=type=secret,id=s cat /run/secrets/s > /dev/null && echo used
RUN env | grep -iv proxy > /build-env.txt && echo "$API_TOKEN" | wc -c > /token-length
"""


def _github_env(cli: Imgci, tmp_path: Path, project: Path, api: str) -> dict[str, str]:
    """GitHub Actions as tests/integration/test_ci_step.py simulates it; the secrets stay in the environment."""
    keep = ("GITHUB_TOKEN", "IMGCI_GITHUB_TOKEN")
    env = {
        k: v for k, v in cli.environ().items() if k in keep or not k.startswith(("GITHUB_", "GITLAB_", "CI_", "INPUT_"))
    }
    env.update(github_actions_env(tmp_path, project, api, SHA))
    return env


def test_secret_like_build_arg_names_warn_without_the_value() -> None:
    secret_like = ["GITHUB_TOKEN", "db_password", "Passwd", "AWS_SECRET_ACCESS_KEY", "MY_API_KEY", "GCP_CREDENTIALS"]
    args = {name: f"value{n}" for n, name in enumerate([*secret_like, "VERSION", "HTTP_PROXY", "BASE"])}
    warnings = secret_arg_warnings(args)
    assert [w.split()[3] for w in warnings] == sorted(secret_like)
    for w in warnings:
        assert w.startswith("warning: build arg ") and "looks like a secret" in w and "--secret id=" in w
        assert "value" not in w


def test_no_secret_reaches_any_output(
    imgci_factory: Callable[[], Imgci], busybox_tar: Path, secret_registry: RegistryServer, tmp_path: Path
) -> None:
    reg = secret_registry
    assert reg.password is not None and reg.username is not None and reg.ca_path is not None
    url_user, url_password = f"u{secrets.token_hex(8)}", f"p@ss/w:rd+{secrets.token_urlsafe(12)}"
    proxy_password = f"proxy-{secrets.token_hex(10)}"
    github_token, imgci_token = f"ghs_{secrets.token_hex(18)}", f"ghp_{secrets.token_hex(18)}"
    secret_value = f"s3cr=t&{secrets.token_urlsafe(18)}"
    build_arg = f"argtok-{secrets.token_hex(12)}"  # stored in the history, as docker does: warned about, not searched
    searched = {
        "registry password": reg.password,
        "GITHUB_TOKEN": github_token,
        "IMGCI_GITHUB_TOKEN": imgci_token,
        "--secret value": secret_value,
        "ADD URL user": url_user,
        "ADD URL password": url_password,
        "proxy build arg password": proxy_password,
    }
    env = {"GITHUB_TOKEN": github_token, "IMGCI_GITHUB_TOKEN": imgci_token, "MYSECRET": secret_value}
    cli = imgci_factory()
    cli.env.update(env)
    cli.trust(reg.ca_path, tmp_path)
    outputs: dict[str, str] = {}  # every command's stdout and stderr

    def run(name: str, *args: str, stdin: str | None = None, c: Imgci = cli) -> subprocess.CompletedProcess[str]:
        proc = c.run(*args, input=stdin)
        outputs[f"{name} stdout"], outputs[f"{name} stderr"] = proc.stdout, proc.stderr
        return proc

    run("login", "login", reg.host, "-u", reg.username, "--password-stdin", stdin=reg.password + "\n")
    run("import", "import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
    basic = "Basic " + base64.b64encode(f"{url_user}:{url_password}".encode()).decode()
    project = tmp_path / "project"
    project.mkdir()
    local_cache, run_cache, meta = tmp_path / "cache-build", tmp_path / "cache-run", tmp_path / "build-meta.json"
    with _FileServer() as files, FakeGitHub() as gh:
        quoted = f"{urllib.parse.quote(url_user, safe='')}:{urllib.parse.quote(url_password, safe='')}"
        url_path = f"127.0.0.1:{files.port}/file.txt"
        (project / "Dockerfile").write_text(_dockerfile("localhost/busybox:latest", f"http://{quoted}@{url_path}"))

        # 1. imgci build --debug: push, a local and a registry cache export, a metadata file
        image = f"{reg.host}/secrets/app:1"
        proc = run(
            "build",
            "--debug",
            "build",
            "--progress",
            "plain",
            "--secret",
            "id=s,env=MYSECRET",
            "--build-arg",
            f"API_TOKEN={build_arg}",
            "--build-arg",
            f"FTP_PROXY=http://proxyuser:{proxy_password}@127.0.0.1:9/",
            "--cache-to",
            f"type=local,dest={local_cache},mode=max",
            "--cache-to",
            f"type=registry,ref={reg.host}/secrets/cache:build,mode=max",
            "--metadata-file",
            str(meta),
            "-t",
            image,
            "--push",
            str(project),
        )
        assert "used" in proc.stderr, proc.stderr  # the secret reached the RUN
        assert files.authorizations == [basic], files.authorizations  # and the URL's credentials the server
        warnings = [line for line in proc.stderr.splitlines() if "looks like a secret" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: build arg API_TOKEN looks like a secret: ")
        assert "--secret" in warnings[0] and build_arg not in warnings[0]
        config = json.loads(run("inspect", "inspect", image, "--type", "config").stdout)
        created_by = [h.get("created_by", "") for h in config["history"]]
        assert f"ADD http://xxxxx@{url_path} /downloaded.txt # buildkit" in created_by, created_by
        assert any(build_arg in c for c in created_by), created_by  # docker keeps the build arg of a RUN there too

        # 2. imgci run build.yaml --debug under GitHub Actions, from an empty state (every step runs again)
        run_cli = imgci_factory()
        run_cli.env.update(cli.env)
        run("run import", "import", str(busybox_tar), "localhost/busybox:latest", c=run_cli)
        (project / "build.yaml").write_text(
            f"""\
version: 1
targets:
  app:
    args: {{API_TOKEN: "{build_arg}"}}
    secrets: ["id=s,env=MYSECRET"]
    tags: ["{reg.host}/secrets/run:1"]
    push: true
    cache_to:
      - "type=local,dest={run_cache},mode=max"
      - "type=registry,ref={reg.host}/secrets/cache:run,mode=max"
"""
        )
        proc = subprocess.run(
            [sys.executable, "-m", "imgci", "--debug", "run", "build.yaml"],
            env=_github_env(run_cli, tmp_path, project, gh.url),
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
        )
        outputs["run stdout"], outputs["run stderr"] = proc.stdout, proc.stderr
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(files.authorizations) >= 2 and set(files.authorizations) == {basic}, files.authorizations
        assert gh.check_runs and all(r.authorization.endswith(imgci_token) for r in gh.requests)
        said = (proc.stdout + proc.stderr).splitlines()  # under GitHub Actions notes go to stdout, in the log group
        assert sum("API_TOKEN looks like a secret" in line for line in said) == 1, proc.stdout + proc.stderr

    places = [(where, _without_mask_commands(text).encode()) for where, text in outputs.items()]
    for path in (meta, project / "imgci-metadata.json", tmp_path / "gh-output", tmp_path / "gh-summary.md"):
        places.append((path.name, _without_mask_commands(path.read_text()).encode()))
    for root in (cli.state, run_cli.state, local_cache, run_cache, reg.storage_dir):
        assert root.is_dir(), root
        places += list(_files(root))
    # Controls, that the search would see a leak: the layers were decompressed, the login stored the password
    # (base64 of user:password, in docker's config.json, which is searched nowhere else) and the summary is there.
    assert any(SERVED in data for where, data in places if where.startswith(str(reg.storage_dir)))
    login = json.dumps(json.loads((cli.docker_config / "config.json").read_text())).encode()
    assert any(form in login for form in encodings(reg.password))
    assert "app" in (tmp_path / "gh-summary.md").read_text()
    forms = {what: encodings(value) for what, value in searched.items()}
    hits = [
        f"{what} ({form!r}) in {where}"
        for where, data in places
        for what, encoded in forms.items()
        for form in encoded
        if form in data
    ]
    assert not hits, "\n".join(hits)
