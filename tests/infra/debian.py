"""A Debian base image for tests: a cached tar of a ``debootstrap --variant=minbase`` root filesystem.

Contract:

* :func:`debian_rootfs_tar` returns the path of an uncompressed tar of a Debian root filesystem (default
  bookworm, minbase, the host's architecture) made with the Debian mirror the host's apt uses. The tar is
  built once and cached in ``cache_dir`` (default :func:`default_cache_dir`) under a name that holds suite,
  variant, architecture and :data:`RECIPE` (bumped whenever the post-processing changes). Parallel processes
  wait on a file lock and build it once; the build happens in a temp dir next to the result, which appears
  only by rename, so a killed build never leaves a half tar under the final name.
* The tar is an image rootfs, not a chroot: numeric owners kept (names left empty, like ``tar
  --numeric-owner``), hard links kept, no device nodes (``/dev`` is an empty directory), ``/proc`` and
  ``/sys`` empty, no ``/etc/resolv.conf``, ``/etc/hostname`` or ``/etc/hosts`` (the builder provides them),
  no downloaded ``.deb`` files and no apt lists (a Dockerfile must ``apt-get update``); the apt ``partial``
  directories are kept as apt leaves them (``_apt:root``, 0700). ``/etc/apt/sources.list`` names the same
  mirror for ``SUITE``, ``SUITE-updates`` and ``SUITE-security``. Docs, man pages and locales are trimmed
  and the apt/dpkg settings of Debian's docker images (``docker-clean``, excludes for docs, …) are
  installed. Entries are sorted depth-first by name; mtimes are whatever debootstrap left.
* debootstrap needs root. As root it runs directly. Otherwise it runs in a user namespace with the user's
  /etc/subuid range (``unshare --map-root-user --map-auto``) and the tar is written inside it, so the
  owners in the tar are the in-image ids either way.

Missing debootstrap, a failed download or a missing subuid range raise :class:`DebianRootfsError` with
what to do about it. ``python -m tests.infra.debian [CACHE_DIR]`` builds (or finds) the tar and prints it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RECIPE = "v1"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 1800
REPO = Path(__file__).resolve().parents[2]
APT_PARTIAL_DIRS = ("var/lib/apt/lists/partial", "var/cache/apt/archives/partial")
APT_UID = 42  # _apt in Debian's base-passwd

# What debuerreotype (the tool behind Debian's official images) installs, slim variant included.
APT_CONF = {
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb'
        ' /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb'
        ' /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
}
TRIMMED = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info")
DPKG_CONF = {
    "docker-apt-speedup": "force-unsafe-io\n",
    "docker": "".join(f"path-exclude /{d}/*\n" for d in TRIMMED) + "path-include /usr/share/doc/*/copyright\n",
}


class DebianRootfsError(RuntimeError):
    """The Debian rootfs tar could not be made; the message says why and what to install or fix."""


def default_cache_dir() -> Path:
    """``$IMGCI_TEST_CACHE``, else ``/var/cache/imgci-tests`` for root, else ``$XDG_CACHE_HOME/imgci-tests``."""
    if os.environ.get("IMGCI_TEST_CACHE"):
        return Path(os.environ["IMGCI_TEST_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/imgci-tests")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgci-tests"


def host_arch() -> str:
    """The host's Debian architecture name (``amd64``, ``arm64``, …)."""
    dpkg = shutil.which("dpkg")
    if dpkg:
        return subprocess.run([dpkg, "--print-architecture"], check=True, capture_output=True, text=True).stdout.strip()
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "i686": "i386"}.get(machine, machine)


def _apt_source_uris() -> list[str]:
    """Every ``deb`` URI in the host's apt sources, in file order (one-line and deb822 formats)."""
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    uris: list[str] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            one_line = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            deb822 = re.match(r"^URIs:\s*(.+)$", line, re.I)
            if one_line:
                uris.append(one_line.group(1))
            elif deb822:
                uris += deb822.group(1).split()
    return uris


def host_mirrors() -> tuple[str, str]:
    """(archive, security) mirror URLs: ``$IMGCI_TEST_DEBIAN_MIRROR`` / ``…_SECURITY_MIRROR``, else the first
    ``…/debian`` and ``…/debian-security`` URIs the host's apt uses, else deb.debian.org."""
    uris = [u.rstrip("/") for u in _apt_source_uris() if u.startswith(("http://", "https://"))]
    archive = next((u for u in uris if u.endswith("/debian")), DEFAULT_MIRROR)
    security = next((u for u in uris if u.endswith("/debian-security")), DEFAULT_SECURITY_MIRROR)
    return (
        os.environ.get("IMGCI_TEST_DEBIAN_MIRROR") or archive,
        os.environ.get("IMGCI_TEST_DEBIAN_SECURITY_MIRROR") or security,
    )


def find_debootstrap(search_path: str | None = None) -> str:
    """The debootstrap executable, looked up in ``search_path`` (default: the sbin dirs, where it lives and which
    are often not on a user's PATH, then ``$PATH``)."""
    if search_path is None:
        search_path = SBIN_PATH + os.pathsep + os.environ.get("PATH", "")
    found = shutil.which("debootstrap", path=search_path)
    if found is None:
        raise DebianRootfsError(
            "debootstrap is not installed; the Debian test base image needs it: "
            "run `apt-get install debootstrap` (scripts/bootstrap installs it)"
        )
    return found


def debian_rootfs_tar(
    cache_dir: Path | None = None, *, suite: str = "bookworm", variant: str = "minbase", arch: str | None = None
) -> Path:
    """The cached rootfs tar for ``suite``/``variant``/``arch``, built first if it is not there (see module doc)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    arch = arch or host_arch()
    target = cache / f"debian-{suite}-{variant}-{arch}.{RECIPE}.tar"
    if target.is_file():
        return target
    debootstrap = find_debootstrap()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{target.name}.lock"):
        if target.is_file():  # another process built it while we waited
            return target
        for stale in cache.glob(f".build-{target.name}-*"):  # left by a killed build; we hold the lock
            _remove_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=cache))
        try:
            out = build / "rootfs.tar"
            _build(debootstrap, build / "rootfs", out, suite=suite, variant=variant, arch=arch)
            out.chmod(0o644)
            with open(out, "rb") as f:
                os.fsync(f.fileno())
            os.replace(out, target)
        finally:
            _remove_tree(build)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _userns_prefix() -> list[str]:
    """Become root of a new user namespace that maps our /etc/subuid range (so chown to _apt works)."""
    unshare = shutil.which("unshare", path=SBIN_PATH)
    if unshare is None:
        raise DebianRootfsError(
            "unshare (util-linux) is missing: install util-linux, or build the Debian rootfs as root"
        )
    return [unshare, "--user", "--map-root-user", "--map-auto", "--mount"]


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    if os.geteuid() == 0:
        shutil.rmtree(path)
    else:  # files owned by subordinate ids can only be removed from inside the namespace
        subprocess.run([*_userns_prefix(), "rm", "-rf", "--", str(path)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def _build(debootstrap: str, rootfs: Path, out: Path, *, suite: str, variant: str, arch: str) -> None:
    mirror, security = host_mirrors()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update(PATH=SBIN_PATH, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    strap = [debootstrap, f"--variant={variant}", f"--arch={arch}", suite, str(rootfs), mirror]
    finish = [sys.executable, "-m", "tests.infra.debian", "--finish", str(rootfs), str(out), suite, mirror, security]
    if os.geteuid() == 0:
        _run(strap, env, rootfs.parent / "debootstrap.log", suite=suite, mirror=mirror)
        finish_rootfs(rootfs, out, suite=suite, mirror=mirror, security_mirror=security)
        return
    # Unprivileged: debootstrap and the tar writer run as root of a user namespace. container=lxc makes
    # debootstrap bind-mount /dev nodes instead of mknod (refused in a user namespace).
    env.update(container="lxc", PYTHONPATH=str(REPO))
    line = f"{shlex.join(strap)} && {shlex.join(finish)}"
    _run([*_userns_prefix(), "sh", "-c", line], env, rootfs.parent / "debootstrap.log", suite=suite, mirror=mirror)


def _run(argv: list[str], env: dict[str, str], log: Path, *, suite: str, mirror: str) -> None:
    started = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        hint = ""
        if os.geteuid() != 0:
            hint = " (unprivileged: this needs a /etc/subuid and /etc/subgid range for your user; or run as root)"
        raise DebianRootfsError(
            f"debootstrap of Debian {suite} from {mirror} failed with exit {proc.returncode} after "
            f"{time.monotonic() - started:.0f}s{hint}:\n{tail}"
        )


def finish_rootfs(rootfs: Path, out: Path, *, suite: str, mirror: str, security_mirror: str) -> None:
    """Turn a fresh debootstrap tree into an image rootfs (see module doc) and write it to ``out`` as a tar."""
    _empty_dir(rootfs / "dev")
    for d in ("proc", "sys", "tmp", "var/tmp", "var/lib/apt/lists", "var/cache/apt/archives"):
        _empty_dir(rootfs / d)
    for name in ("etc/resolv.conf", "etc/hostname", "etc/hosts", "var/log/bootstrap.log"):
        (rootfs / name).unlink(missing_ok=True)
    for name in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"):
        (rootfs / name).unlink(missing_ok=True)
    for old in [*rootfs.glob("var/lib/dpkg/*-old"), *rootfs.glob("var/cache/debconf/*-old")]:
        old.unlink()
    for d in APT_PARTIAL_DIRS:  # as apt itself leaves them after its first run
        (rootfs / d).mkdir(parents=True, exist_ok=True)
        os.chown(rootfs / d, APT_UID, 0)
        (rootfs / d).chmod(0o700)
    for d in TRIMMED:
        _trim(rootfs / d, keep=re.compile(r"^[^/]+/copyright$") if d == "usr/share/doc" else None)
    sources = [f"{mirror} {suite}", f"{mirror} {suite}-updates", f"{security_mirror} {suite}-security"]
    (rootfs / "etc/apt/sources.list").write_text("".join(f"deb {s} main\n" for s in sources))
    for name, text in APT_CONF.items():
        (rootfs / "etc/apt/apt.conf.d" / name).write_text(text)
    (rootfs / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    for name, text in DPKG_CONF.items():
        (rootfs / "etc/dpkg/dpkg.cfg.d" / name).write_text(text)
    write_tree_tar(rootfs, out)


def _empty_dir(path: Path) -> None:
    if path.is_symlink() or not path.exists():
        path.unlink(missing_ok=True)
        path.mkdir()
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _trim(path: Path, keep: re.Pattern[str] | None) -> None:
    """Delete everything under ``path`` except files whose relative path matches ``keep`` (and their dirs)."""
    if not path.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            rel = (here / name).relative_to(path).as_posix()
            if keep is None or not keep.match(rel):
                (here / name).unlink()
        for name in dirnames:
            sub = here / name
            if sub.is_symlink():
                sub.unlink()
            elif not any(sub.iterdir()):
                sub.rmdir()


def write_tree_tar(root: Path, out: Path) -> None:
    """Write the tree under ``root`` to ``out``: PAX, depth-first sorted by name, numeric owners, hard links
    kept, sockets and device nodes skipped, no entry for ``root`` itself."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, arcname in _walk(root, ""):
            info = tar.gettarinfo(str(path), arcname)
            if info is None or info.ischr() or info.isblk():
                continue
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def _walk(directory: Path, prefix: str) -> Iterator[tuple[Path, str]]:
    for name in sorted(os.listdir(directory)):
        path = directory / name
        arcname = f"{prefix}{name}"
        yield path, arcname
        if path.is_dir() and not path.is_symlink():
            yield from _walk(path, arcname + "/")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--finish"]:  # internal: the unprivileged build calls this inside its user namespace
        rootfs, out, suite, mirror, security = argv[1:6]
        finish_rootfs(Path(rootfs), Path(out), suite=suite, mirror=mirror, security_mirror=security)
        return 0
    started = time.monotonic()
    try:
        path = debian_rootfs_tar(Path(argv[0]) if argv else None)
    except DebianRootfsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
