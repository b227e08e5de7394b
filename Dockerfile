# The imgci runner image: what the GitHub Action (action.yml) runs, and the image the GitLab CI template uses.
#
#   docker build -t imgci .
#
# Which user builds: the unprivileged user imgci when it can, root only when it must. entrypoint.py decides.
# - User imgci (uid 1001: also the uid of the GitHub-hosted runner's user, so /github/workspace stays writable) has
#   subordinate ids in /etc/subuid and /etc/subgid for newuidmap/newgidmap: `--isolation userns`, no root.
# - But a CI job container usually keeps the runtime's default seccomp (and AppArmor) profile, which refuses
#   unshare(CLONE_NEWUSER) to an unprivileged process. Then RUN steps need `--isolation chroot`, and chroot needs
#   root (CAP_SYS_CHROOT) — root inside an unprivileged container, kaniko's situation.
# - GitHub starts a docker action as the image's user and takes no `docker run` options (no --user) from the
#   action, so the image cannot start as imgci and still fall back to root. It starts as root, and entrypoint.py
#   asks imgci (`imgci doctor --isolation userns` through setpriv) whether user namespaces work for it and whether
#   it may write the workspace: yes → `imgci run` runs as imgci; no → it stays root and prints one line saying why.
#   IMGCI_RUN_AS=root or IMGCI_RUN_AS=imgci in the step's env settles it without asking (the latter: an error when
#   imgci cannot build). `docker run --user imgci` (GitLab: `image: docker: user: imgci`) starts as imgci directly.
FROM python:3.11-slim-bookworm

# uidmap: newuidmap/newgidmap for the rootless user namespace; git: ADD of git URLs; ca-certificates: registries.
# setpriv (entrypoint.py's switch to imgci) comes with util-linux, which every Debian image has.
RUN apt-get update \
    && apt-get install -y --no-install-recommends uidmap ca-certificates git \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Only what the package needs, so an edit to tests or examples does not invalidate this layer. README.md is the
# package's readme (pyproject.toml).
COPY pyproject.toml README.md /opt/imgci/src/
COPY imgci /opt/imgci/src/imgci
RUN pip install --no-cache-dir /opt/imgci/src && rm -rf /opt/imgci/src

RUN groupadd --gid 1001 imgci \
    && useradd --uid 1001 --gid 1001 --create-home --shell /bin/sh imgci \
    && echo "imgci:100000:65536" > /etc/subuid \
    && echo "imgci:100000:65536" > /etc/subgid \
    && mkdir -p /home/imgci/.local/share/imgci \
    && chown -R imgci:imgci /home/imgci

COPY entrypoint.py /opt/imgci/entrypoint.py

# imgci's state directory, whichever user builds (root can use imgci's; the reverse would not hold).
ENV IMGCI_STATE=/home/imgci/.local/share/imgci
# Root only so that entrypoint.py can choose: it runs `imgci run` as imgci whenever imgci can build (see the top).
USER root
# Exec form, python directly: GitHub passes inputs as INPUT_KEEP-GOING-style variables, which a shell would drop.
ENTRYPOINT ["python", "/opt/imgci/entrypoint.py"]
