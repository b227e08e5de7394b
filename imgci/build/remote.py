"""Remote sources of ADD: HTTP(S) downloads and git repositories, fetched into a scratch directory.

Contract:
- :func:`classify` tells ADD's remote sources apart the way BuildKit's Dockerfile frontend does: a git ref is a
  ``git://`` or ``ssh://`` URL, an SCP-like ``user@host:path``, or an ``http(s)://`` URL whose path ends in ``.git``;
  other ``http(s)://`` URLs are downloads; everything else is a local path (``github.com/x/y`` included).
- :func:`parse_git_ref` parses BuildKit's fragment forms ``#ref:subdir`` and ``##ref=..,commit=..,subdir=..`` and the
  ``?ref=/tag=/branch=/subdir=/checksum=/keep-git-dir=`` query form.
- :func:`fetch_url` streams a download to ``dest_dir/<unique>/<name>`` (``name`` is the last URL path component, or
  ``__unnamed__``), with ``requests`` honouring proxy environment variables, a size cap, and an optional
  ``--checksum`` (``sha256:``/``sha384:``/``sha512:``) that must match or the download is deleted and
  :class:`DigestMismatchError` names the URL and both digests. The file gets mode 0600 and the server's
  ``Last-Modified`` as mtime, as BuildKit's HTTP source does; :meth:`Download.fs` presents it as a SourceFS.
- :func:`clone_git` checks a ref out with the ``git`` CLI (``init`` + ``fetch --depth 1`` of the ref, falling back to
  a full fetch for a commit the server will not serve shallowly), with submodules, without ``.git`` unless
  ``keep_git_dir``. :meth:`GitCheckout.fs` presents the checkout (or its subdir, resolved inside it) as a SourceFS
  with git's modes, root ownership and either the checkout time or the commit time as mtimes.
- Secrets never leave this module: user info in URLs is replaced by ``xxxxx`` in every message
  (:func:`redact_url`; :func:`redact_urls` does the same to every URL in a text, for ADD's history entry, progress
  line and cache inputs); git gets HTTP credentials through an ``Authorization`` header in its environment, never on
  its command line, and its stderr is scrubbed before it is quoted.
"""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Literal

import requests

from imgci.build import treepath
from imgci.build.context import DirectoryFS
from imgci.build.urls import redact_url, redact_urls  # noqa: F401  (re-exported: remote callers use them)
from imgci.errors import BuildError, DigestMismatchError

DEFAULT_MAX_SIZE = 8 << 30
_CHUNK = 1 << 20
_SCP = re.compile(r"^([A-Za-z0-9_.-]+)@([A-Za-z0-9.-]+):(.*?)(?:#(.*))?$")
_PROTO = re.compile(r"^([A-Za-z0-9]+)://")
_GIT_SCHEMES = {"http", "https", "ssh", "git"}
_GIT_ENV_KEPT = {"GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "GIT_PROXY_SSL_CAINFO"}
_HEX = re.compile(r"^[0-9a-f]{7,64}$")
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})$")

SourceKind = Literal["git", "http", "local"]


# scheme://userinfo@ in running text; greedy up to the last "@" of the authority, as urlsplit reads it.
def _secrets(url: str) -> list[str]:
    parts = urllib.parse.urlsplit(url)
    found = [s for s in (parts.username, parts.password) if s]
    found += [urllib.parse.unquote(s) for s in found]
    return sorted(set(found), key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    for secret in _secrets(url):
        text = text.replace(secret, "xxxxx")
    return text


# -- git refs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GitRef:
    """A parsed git source: ``remote`` is what git fetches (credentials included, never to be printed)."""

    remote: str
    ref: str = ""
    subdir: str = ""
    checksum: str = ""
    keep_git_dir: bool | None = None
    submodules: bool = True

    @property
    def redacted(self) -> str:
        return redact_url(self.remote)


def _fragment(fragment: str) -> dict[str, str]:
    if fragment.startswith("#"):
        out: dict[str, str] = {}
        for field in filter(None, fragment[1:].split(",")):
            key, eq, value = field.partition("=")
            if not eq or key.lower() not in ("ref", "commit", "subdir"):
                raise BuildError(f"invalid git URL fragment field {field!r} (supported keys: ref, commit, subdir)")
            out[key.lower()] = value
        if out.get("commit") and not out.get("ref"):
            out["ref"] = out["commit"]
        return out
    ref, _, subdir = fragment.partition(":")
    return {"ref": ref, "subdir": subdir}


def _query(query: str, opts: dict[str, str]) -> tuple[bool | None, bool]:
    keep: bool | None = None
    submodules = True
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key in ("ref", "subdir"):
            if opts.get(key) and opts[key] != value:
                raise BuildError(f"git URL {key} conflicts: {opts[key]!r} vs {value!r}")
            opts[key] = value
        elif key in ("tag", "branch"):
            prefix = "refs/tags/" if key == "tag" else "refs/heads/"
            opts["ref"] = value if value.startswith(prefix) else prefix + value
        elif key in ("checksum", "commit"):
            opts["checksum"] = value
        elif key in ("keep-git-dir", "submodules"):
            flag = value.lower() in ("", "1", "true", "t", "yes")
            if value.lower() not in ("", "1", "0", "true", "false", "t", "f", "yes", "no"):
                raise BuildError(f"invalid {key} value: {value!r}")
            if key == "keep-git-dir":
                keep = flag
            else:
                submodules = flag
        else:
            raise BuildError(f"unexpected query {key!r} in git URL")
    if opts.get("checksum") and not opts.get("ref"):
        opts["ref"] = opts["checksum"]
    return keep, submodules


def parse_git_ref(src: str) -> GitRef | None:
    """The git source ``src`` names, or None when it is not a git ref (see the module contract)."""
    if src.startswith(("./", "../", "/", "github.com/")):
        return None
    m = _PROTO.match(src)
    if m:
        scheme = m.group(1).lower()
        if scheme not in _GIT_SCHEMES:
            return None
        parts = urllib.parse.urlsplit(src)
        if scheme in ("http", "https") and not parts.path.endswith(".git"):
            return None
        opts = _fragment(parts.fragment) if parts.fragment else {}
        keep, submodules = _query(parts.query, opts)
        remote = urllib.parse.urlunsplit(parts._replace(fragment="", query=""))
    else:
        scp = _SCP.match(src)
        if scp is None:
            return None
        opts = _fragment(scp.group(4)) if scp.group(4) else {}
        keep, submodules = None, True
        remote = src.split("#", 1)[0]
    return GitRef(
        remote=remote,
        ref=opts.get("ref", ""),
        subdir=opts.get("subdir", ""),
        checksum=opts.get("checksum", ""),
        keep_git_dir=keep,
        submodules=submodules,
    )


def classify(src: str) -> SourceKind:
    """Whether an ADD source is a git ref, an HTTP download, or a local path."""
    if parse_git_ref(src) is not None:
        return "git"
    if src.startswith(("http://", "https://")):
        return "http"
    return "local"


# -- downloads -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Download:
    """A fetched URL: ``path`` is ``<directory>/<filename>``; ``digest`` is ``sha256:<hex>`` of the content."""

    path: Path
    filename: str
    last_modified: float | None
    digest: str
    size: int

    def fs(self) -> DirectoryFS:
        return DirectoryFS(self.path.parent, description=f"download {self.filename}")


def url_filename(url: str) -> str:
    """The file name BuildKit gives a download: the URL path's last component, else ``__unnamed__``."""
    base = posixpath.basename(urllib.parse.urlsplit(url).path.rstrip("/"))
    return base if base not in ("", ".", "..") else "__unnamed__"


def fetch_url(
    url: str,
    *,
    dest_dir: Path,
    checksum: str | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    session: requests.Session | None = None,
    timeout: float = 300,
) -> Download:
    """Download ``url`` into a new directory under ``dest_dir``; see the module contract."""
    shown = redact_url(url)
    if not url.startswith(("http://", "https://")):
        raise BuildError(f"cannot download {shown}: only http:// and https:// URLs are supported")
    if checksum is not None and not _DIGEST.match(checksum):
        raise BuildError(f"invalid checksum {checksum!r} for {shown}: expected sha256:<hex>, sha384:… or sha512:…")
    filename = url_filename(url)
    workdir = Path(tempfile.mkdtemp(prefix="download-", dir=dest_dir))
    path = workdir / filename
    sha256 = hashlib.sha256()
    wanted = hashlib.new(checksum.split(":")[0]) if checksum else None
    size = 0
    http = session or requests.Session()
    try:
        with http.get(url, stream=True, timeout=timeout) as r:
            if r.status_code >= 400:
                raise BuildError(f"failed to download {shown}: HTTP {r.status_code} {r.reason}")
            declared = r.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_size:
                raise BuildError(f"{shown} is {int(declared)} bytes, more than the {max_size} byte limit")
            with open(path, "xb") as out:
                for chunk in r.iter_content(_CHUNK):
                    size += len(chunk)
                    if size > max_size:
                        raise BuildError(f"{shown} is larger than the {max_size} byte limit")
                    sha256.update(chunk)
                    if wanted is not None:
                        wanted.update(chunk)
                    out.write(chunk)
            last_modified = _http_date(r.headers.get("Last-Modified"))
    except requests.RequestException as e:
        shutil.rmtree(workdir, ignore_errors=True)
        raise BuildError(f"failed to download {shown}: {_scrub(type(e).__name__ + ': ' + str(e), url)}") from None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        if session is None:
            http.close()
    if wanted is not None and checksum is not None:
        actual = f"{checksum.split(':')[0]}:{wanted.hexdigest()}"
        if actual != checksum:
            shutil.rmtree(workdir, ignore_errors=True)
            raise DigestMismatchError(
                f"checksum mismatch for {shown}: expected {checksum}, got {actual}", expected=checksum, actual=actual
            )
    os.chmod(path, 0o600)
    if last_modified is not None:
        os.utime(path, (last_modified, last_modified))
    return Download(path, filename, last_modified, "sha256:" + sha256.hexdigest(), size)


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


# -- git -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GitCheckout:
    """A checked-out git tree at ``root``; ``subdir`` is the part ADD copies."""

    root: Path
    commit: str
    commit_time: float
    subdir: str = ""

    def fs(self, *, mtime: Literal["checkout", "commit"] = "checkout") -> DirectoryFS:
        """The checkout (its subdir, resolved inside the checkout) as a SourceFS."""
        whole = DirectoryFS(self.root, git_modes=True)
        try:
            real = whole.resolve(self.subdir) if self.subdir else ""
            info = whole.lstat(real) if real is not None else None
        finally:
            whole.close()
        if real is None or info is None or info.type != "dir":
            raise BuildError(f"git subdir {self.subdir!r} is not a directory at commit {self.commit[:12]}")
        return DirectoryFS(
            self.root / real if real else self.root,
            git_modes=True,
            fixed_mtime=self.commit_time if mtime == "commit" else None,
            description=f"git commit {self.commit[:12]}",
        )


def _git_env(url: str) -> tuple[str, dict[str, str]]:
    """The URL git may see (no credentials) and an environment that authenticates it and never prompts."""
    # No inherited GIT_DIR, GIT_WORK_TREE, GIT_CONFIG_*...: they would point git at another repository or config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k in _GIT_ENV_KEPT}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, LC_ALL="C")
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    parts = urllib.parse.urlsplit(url)
    # Only network transports: a submodule must not pull a repository from the build host's disk (file://, paths).
    config: list[tuple[str, str]] = [("protocol.allow", "never"), ("advice.detachedHead", "false")]
    config += [(f"protocol.{scheme}.allow", "always") for scheme in ("https", "http", "git", "ssh")]
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        host = parts.netloc.rpartition("@")[2]
        header = f"Authorization: Basic {token}"
        config.append((f"http.{parts.scheme}://{host}/.extraHeader", header))  # sent to this origin only
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for i, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return url, env


def clone_git(
    ref: GitRef | str,
    *,
    dest_dir: Path,
    keep_git_dir: bool | None = None,
    checksum: str | None = None,
    timeout: float = 600,
) -> GitCheckout:
    """Check out ``ref`` under ``dest_dir``; see the module contract.

    ``keep_git_dir`` and ``checksum`` are ADD's ``--keep-git-dir`` and ``--checksum`` (a commit sha or a prefix of
    one); they must agree with the URL's own ``keep-git-dir``/``checksum`` when both are given.
    """
    git_ref = parse_git_ref(ref) if isinstance(ref, str) else ref
    if git_ref is None:
        raise BuildError(f"{redact_url(str(ref))} is not a git URL")
    if keep_git_dir is not None and git_ref.keep_git_dir is not None and keep_git_dir != git_ref.keep_git_dir:
        raise BuildError("inconsistent keep-git-dir configuration")
    keep = bool(git_ref.keep_git_dir if keep_git_dir is None else keep_git_dir)
    subdir = git_ref.subdir.strip("/")
    if treepath.escapes(subdir):
        raise BuildError(f"git subdir {git_ref.subdir!r} leads outside the repository")
    if git_ref.ref.startswith("-") or git_ref.remote.startswith("-"):
        raise BuildError(f"invalid git ref {git_ref.ref!r} for {git_ref.redacted}")  # would be read as an option
    if checksum and git_ref.checksum and checksum != git_ref.checksum:
        raise BuildError(f"checksum mismatch {checksum!r} != {git_ref.checksum!r}")
    checksum = checksum or git_ref.checksum
    url, env = _git_env(git_ref.remote)
    root = Path(tempfile.mkdtemp(prefix="git-", dir=dest_dir))

    def git(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise BuildError(f"git {args[0]} of {git_ref.redacted} timed out after {timeout:.0f}s") from None
        except FileNotFoundError:
            raise BuildError("ADD of a git repository needs the git command, which is not installed") from None
        if check and proc.returncode != 0:
            detail = _scrub(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "", git_ref.remote)
            raise BuildError(f"git {args[0]} of {git_ref.redacted} failed: {detail}")
        return proc

    try:
        git("init", "-q")
        git("remote", "add", "origin", "--", url)
        wanted = git_ref.ref or "HEAD"
        fetched = git("fetch", "-q", "--depth", "1", "--no-tags", "--", "origin", wanted, check=False)
        if fetched.returncode != 0:
            if not _HEX.match(wanted):
                git("fetch", "-q", "--depth", "1", "--no-tags", "--", "origin", wanted)
            git("fetch", "-q", "--tags", "--", "origin")  # a commit the server does not serve by itself
            git("checkout", "-q", "--detach", wanted, "--")
        else:
            git("checkout", "-q", "--detach", "FETCH_HEAD")
        commit = git("rev-parse", "HEAD").stdout.strip()
        commit_time = float(git("log", "-1", "--format=%ct").stdout.strip() or 0)
        if checksum and not commit.startswith(checksum):
            raise BuildError(f"checksum mismatch for {git_ref.redacted}: expected {checksum}, got {commit}")
        if git_ref.submodules and (root / ".gitmodules").is_file():
            git("submodule", "update", "-q", "--init", "--recursive", "--depth", "1")
        if not keep:
            _remove_git_dirs(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return GitCheckout(root, commit, commit_time, subdir)


def _remove_git_dirs(root: Path) -> None:
    """Remove ``.git`` everywhere (git never tracks an entry named ``.git``; submodules keep a ``.git`` file)."""
    for dirpath, dirnames, filenames in os.walk(root):
        if ".git" in dirnames:
            dirnames.remove(".git")
            shutil.rmtree(Path(dirpath) / ".git")
        if ".git" in filenames:
            os.unlink(Path(dirpath) / ".git")
