"""Ownership and permission options of COPY/ADD: ``--chown`` resolution and ``--chmod`` parsing.

Contract:
- :func:`resolve_chown` turns ``USER[:GROUP]`` into numeric ids the way BuildKit's file op does: numeric parts are
  used as given; a user alone gives ``gid = uid`` when numeric and the user's primary group when a name; names are
  looked up in ``/etc/passwd`` and ``/etc/group`` *of the destination image* (``dest_fs``, symlinks resolved inside
  it). Unlike BuildKit, which silently falls back to 0 for an unknown name, an unknown name (or a missing file) is a
  :class:`BuildError` — a silent root-owned file is worse than a failed build.
- :func:`parse_chmod` accepts what BuildKit's Dockerfile frontend accepts: an octal mode up to ``07777`` (``755``,
  ``0644``, ``4755`` — special bits are honoured, as fsutil does since v0.13) or a symbolic mode of chmod(1)
  (``u+x``, ``go-w``, ``a=rX``, ``u=rwx,go=u-w``): BSD ``setmode`` semantics, Linux ``X`` (any operator, judged on
  the mode before the clause) and a umask of 022 for clauses without a who, as under dockerd. BuildKit needs
  dockerfile frontend 1.10+ for symbolic modes; they are always accepted here. Anything else raises
  :class:`BuildError` with BuildKit's wording.
- :class:`Chmod` applies to every copied file and directory (never to symlinks), per entry, relative to the
  entry's own source mode for symbolic modes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from imgci.build.fs import SourceFS
from imgci.errors import BuildError

UMASK = 0o022
_MAX_DB = 16 << 20
_SYMBOLIC = re.compile(r"^[ugoa]*(?:[-+=](?:[rwxXst]*|[ugo]))+(?:,[ugoa]*(?:[-+=](?:[rwxXst]*|[ugo]))+)*$")
_WHO = {"u": 0o4700, "g": 0o2070, "o": 0o0007, "a": 0o6777}
_PERM = {"r": 0o444, "w": 0o222, "x": 0o111, "s": 0o6000, "t": 0o1000}


# -- chown -----------------------------------------------------------------------------------------------------
def _read_db(dest_fs: SourceFS | None, path: str, what: str) -> list[list[str]]:
    resolved = dest_fs.resolve(path) if dest_fs is not None else None
    info = dest_fs.lstat(resolved) if dest_fs is not None and resolved is not None else None
    if dest_fs is None or info is None or info.type != "file":
        raise BuildError(f"cannot resolve {what}: /{path} does not exist in the destination image")
    with dest_fs.open(resolved or path) as f:
        data = f.read(_MAX_DB + 1)
    if len(data) > _MAX_DB:
        raise BuildError(f"cannot resolve {what}: /{path} is larger than {_MAX_DB >> 20} MiB")
    rows = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _lookup(rows: list[list[str]], name: str, field: int) -> int | None:
    for row in rows:
        if row[0] == name and len(row) > field and row[field].isdigit():
            return int(row[field])
    return None


def _numeric(part: str) -> int | None:
    return int(part) if part.isdigit() and int(part) < 2**32 else None


def resolve_chown(spec: str, dest_fs: SourceFS | None) -> tuple[int, int]:
    """``(uid, gid)`` for a ``--chown`` value; see the module contract."""
    user, _, group = spec.partition(":")
    if not user:
        raise BuildError(f"invalid --chown value {spec!r}: the user part is empty")
    uid = _numeric(user)
    if uid is not None:
        gid = uid
    else:
        rows = _read_db(dest_fs, "etc/passwd", f"--chown={spec}")
        found_uid, found_gid = _lookup(rows, user, 2), _lookup(rows, user, 3)
        if found_uid is None or found_gid is None:
            raise BuildError(f"unable to find user {user}: no matching entries in passwd file")
        uid, gid = found_uid, found_gid
    if group:
        number = _numeric(group)
        if number is None:
            found = _lookup(_read_db(dest_fs, "etc/group", f"--chown={spec}"), group, 2)
            if found is None:
                raise BuildError(f"unable to find group {group}: no matching entries in group file")
            number = found
        gid = number
    return uid, gid


# -- chmod -----------------------------------------------------------------------------------------------------
Action = Callable[[int, bool], int]


@dataclass(frozen=True)
class Chmod:
    """A parsed ``--chmod``: ``apply(mode, is_dir)`` gives the new permission bits of an entry."""

    text: str
    octal: int | None
    actions: tuple[Action, ...] = ()

    def apply(self, mode: int, is_dir: bool) -> int:
        if self.octal is not None:
            return self.octal
        mode &= 0o7777
        for action in self.actions:
            mode = action(mode, is_dir)
        return mode


def _copy_bits(mode: int, source: str) -> int:
    """The rwx triple of class ``source`` (u/g/o) of ``mode``, as a 3-bit value."""
    return (mode >> {"u": 6, "g": 3, "o": 0}[source]) & 0o7


def _clause_actions(clause: str) -> list[Action]:
    who_chars = ""
    while clause and clause[0] in "ugoa":
        who_chars += clause[0]
        clause = clause[1:]
    who = 0
    for c in who_chars:
        who |= _WHO[c]
    actions: list[Action] = []
    for op, perms in re.findall(r"([-+=])([rwxXstugo]*)", clause):
        actions.append(_action(op, perms, who))
    return actions


def _action(op: str, perms: str, who: int) -> Action:
    # BSD setmode: without a who the umask limits what changes; 's'/'t' mean nothing for "o" alone.
    only_other = bool(who) and not who & ~0o007
    mask = who if who else (0o7777 & ~UMASK)
    if who and "t" in perms and not only_other:
        mask |= 0o1000
    bits = 0
    for c in perms:
        if c in _PERM and not (c in "st" and only_other):
            bits |= _PERM[c]
    copy_from = perms if perms in ("u", "g", "o") else ""
    cond_x = "X" in perms  # Linux chmod: X works with every operator (fsutil#232), BSD only with "+"
    cleared = who if who else 0o6777

    def act(mode: int, is_dir: bool) -> int:
        add = _copy_bits(mode, copy_from) * 0o111 if copy_from else bits
        if cond_x and (is_dir or mode & 0o111):
            add |= 0o111
        change = add & mask
        if op == "+":
            return mode | change
        if op == "-":
            return mode & ~change
        return (mode & ~cleared) | change

    return act


def parse_chmod(spec: str) -> Chmod:
    """A :class:`Chmod` for a ``--chmod`` value; BuildError with BuildKit's message when it is not valid."""
    octal_error = f"invalid chmod parameter: '{spec}'. it should be octal string and between 0 and 07777"
    if spec and spec.isdigit():
        if any(c in "89" for c in spec) or int(spec, 8) > 0o7777:
            raise BuildError(octal_error)
        return Chmod(spec, int(spec, 8))
    if spec[:1].isdigit():
        raise BuildError(octal_error)  # BuildKit: anything that starts like a number is judged as one
    if not spec or not _SYMBOLIC.match(spec):
        raise BuildError(f"invalid chmod parameter: '{spec}': invalid syntax")
    actions: list[Action] = []
    for clause in spec.split(","):
        actions.extend(_clause_actions(clause))
    return Chmod(spec, None, tuple(actions))


def created_dir_mode(chmod: Chmod | None) -> int:
    """The mode of a directory a copy creates (parents, the destination of a directory copy): 0755, with ``--chmod``
    applied on top as BuildKit does since v0.21 (fsutil#228)."""
    return 0o755 if chmod is None else chmod.apply(0o755, True)
