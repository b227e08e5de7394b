"""A real unprivileged user for rootless tests, and a way to run imgci as that user.

When the tests run as root, ``RootlessUser.create()`` adds a system user with its own /etc/subuid and
/etc/subgid range (as a CI runner image would have), and runs commands as it through ``setpriv`` with a clean
environment. When the tests already run unprivileged, the current user is used as it is.

The user needs to read the Python interpreter, imgci and its dependencies. If the checkout or virtualenv is not
readable by other users (e.g. under /root), the dependencies are installed with pip into a world-readable
directory and imgci's sources are copied next to them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
USER = "imgci-rootless"
SUBID_START = 600000
SUBID_COUNT = 65536


def _add_subid(path: Path, user: str) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    if not any(line.split(":")[0] == user for line in lines):
        lines.append(f"{user}:{SUBID_START}:{SUBID_COUNT}")
        path.write_text("\n".join(lines) + "\n")


@dataclass
class RootlessUser:
    name: str
    uid: int
    gid: int
    home: Path
    python: str
    pythonpath: str

    @classmethod
    def create(cls, workdir: Path) -> RootlessUser:
        if os.geteuid() != 0:
            pw = pwd.getpwuid(os.geteuid())
            return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), sys.executable, str(REPO))
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", USER],
                check=True,
                capture_output=True,
            )
            pw = pwd.getpwnam(USER)
        _add_subid(Path("/etc/subuid"), USER)
        _add_subid(Path("/etc/subgid"), USER)
        user = cls(USER, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), sys.executable, str(REPO))
        if not user._can_import_imgci():
            user._install_readable_copy(workdir)
        return user

    def _can_import_imgci(self) -> bool:
        probe = self.run([self.python, "-c", "import imgci.cli, requests, isal, zstandard, tenacity"], check=False)
        return probe.returncode == 0

    def _install_readable_copy(self, workdir: Path) -> None:
        site = workdir / "rootless-site"
        site.mkdir(parents=True, exist_ok=True)
        deps = ["pydantic", "requests", "tenacity", "dockerfile-parse", "PyGithub", "cffi", "isal", "zstandard"]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(site), *deps],
            check=True,
            capture_output=True,
        )
        shutil.copytree(REPO / "imgci", site / "imgci", dirs_exist_ok=True)
        for p in [site, *site.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o755 if p.is_dir() else p.stat().st_mode | 0o444)
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        self.python, self.pythonpath = python, str(site)
        if not self._can_import_imgci():
            raise RuntimeError(f"user {self.name} cannot import imgci even from {site}")

    def private_dir(self, parent: Path | None = None) -> Path:
        """A fresh directory the user owns (pytest's tmp dirs are root-only)."""
        d = Path(tempfile.mkdtemp(prefix="imgci-rootless-", dir=parent))
        d.chmod(0o755)
        os.chown(d, self.uid, self.gid) if os.geteuid() == 0 else None
        return d

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": self.pythonpath,
            "LANG": "C.UTF-8",
            "CI": "true",
        }
        env.update(extra or {})
        return env

    def run(
        self, argv: list[str], *, env: dict[str, str] | None = None, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = argv
        if os.geteuid() == 0:
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]
        proc = subprocess.run(
            cmd, env=self.environ(env), capture_output=True, check=False, input=input, timeout=180, cwd="/"
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} as {self.name} exited {proc.returncode}:\n{proc.stdout.decode()}\n"
                f"{proc.stderr.decode()}"
            )
        return proc

    def imgci(self, *args: str, state: Path, check: bool = True, input: bytes | None = None) -> str:
        """Run ``python -m imgci`` as the user on ``state``; returns stdout."""
        env = {"IMGCI_STATE": str(state), "DOCKER_CONFIG": str(state.parent / "docker")}
        proc = self.run([self.python, "-m", "imgci", *args], env=env, check=check, input=input)
        return proc.stdout.decode()
