"""One rule for every path a user names (files and folders under an allowed root).

The rule: resolve every symlink, then require the real path inside the allowed root. A symlink whose
target stays inside the root is used like the plain file or folder it points to; one that leads
outside is refused with the input to change. It is the same for folder inputs, the files and
sub-folders inside them, and set files. Also here: turning the OS errors of a write into a message
that names the input to change. Plain Python; nothing here imports ComfyUI.
"""

from __future__ import annotations

import errno
import os
import pathlib
from typing import Iterator

from .shield_set import ShieldSetError

DEFAULT_NAME_MAX = 255  # bytes in one path component on ext4, xfs, btrfs, APFS, NTFS (characters)


def check_relative_name(name: str, where: str, examples: str) -> None:
    """Refuse names that cannot be a file name: empty, padded with spaces, NUL."""
    if not name or name.strip() != name or "\x00" in name:
        raise ShieldSetError(
            f"{where}: the name {name!r} is empty, has leading/trailing spaces or a NUL character; use {examples}"
        )


def name_max(folder: pathlib.Path) -> int:
    """The longest file name (bytes) the file system of `folder` (or its nearest existing parent) allows."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf on Windows
        return DEFAULT_NAME_MAX


def check_name_lengths(root: pathlib.Path, name: str, where: str) -> None:
    limit = name_max(root)
    for part in pathlib.PurePath(name).parts:
        size = len(part.encode("utf-8", errors="surrogateescape"))
        if size > limit:
            raise ShieldSetError(
                f"{where}: the name {part[:40]!r}... is {size} bytes long; the file system allows {limit} bytes per "
                f"file or folder name. Shorten it"
            )


def is_inside(root: pathlib.Path, path: pathlib.Path) -> bool:
    return path == root or root in path.parents


def resolved(path: pathlib.Path, where: str) -> pathlib.Path:
    """path with every symlink resolved; a symlink loop (RuntimeError before Python 3.13, ELOOP after)
    becomes an error naming the input."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:
        raise ShieldSetError(
            f"{where}: {path} is part of a symlink loop (a link that leads back to itself) or cannot be resolved "
            f"({error}); remove or fix that link"
        ) from error


def real_path_inside(root: pathlib.Path, name: str, where: str, examples: str, root_label: str) -> pathlib.Path:
    """root/name with every symlink resolved; refused unless the real path is inside the real root.

    `name` may not exist yet (a file about to be written): its existing part is resolved. root_label
    names the root for the user ("ComfyUI's input directory")."""
    check_relative_name(name, where, examples)
    check_name_lengths(pathlib.Path(root), name, where)
    real_root = resolved(pathlib.Path(root), where)
    path = resolved(real_root / name, where)
    if pathlib.PurePath(name).is_absolute() or not is_inside(real_root, path):
        raise ShieldSetError(
            f"{where}: {name!r} points outside {root_label} {real_root} (through '..' or a symlink whose target "
            f"is elsewhere); use {examples}, without '..' or an absolute path, or move the link's target into that folder"
        )
    return path


def require_inside(real_root: pathlib.Path, path: pathlib.Path, where: str, what: str) -> pathlib.Path:
    """The real path of `path` (found while listing real_root), refused if a symlink leads outside."""
    real = resolved(path, where)
    if not is_inside(real_root, real):
        raise ShieldSetError(
            f"{where}: {what} {path.relative_to(real_root)} is a symlink to {real}, outside {real_root}. "
            f"Copy the file into the folder, or remove the link"
        )
    return real


def walk_files(
    folder: pathlib.Path, real_root: pathlib.Path, where: str
) -> Iterator[tuple[pathlib.Path, pathlib.Path]]:
    """(path as listed, real path) of every file under `folder`, sub-folders included, sorted by listed path.

    Symlinked files and sub-folders follow the rule (inside real_root: used; outside: an error); a
    sub-folder reached twice through links (a cycle, or two links to one folder) is walked once."""
    seen_folders: set[pathlib.Path] = set()

    def walk(listed: pathlib.Path, real: pathlib.Path):
        if real in seen_folders:
            return
        seen_folders.add(real)
        for entry in sorted(listed.iterdir()):
            if entry.name.startswith("."):
                continue  # hidden files and folders (.DS_Store, .git) are never protected items
            target = require_inside(real_root, entry, where, "the entry")
            if target.is_dir():
                yield from walk(entry, target)
            elif target.is_file():
                yield entry, target

    yield from walk(folder, resolved(folder, where))


def explain_write_error(error: OSError, where: str, path: pathlib.Path, what_to_change: str) -> str:
    """A message for an OS error while writing `path` that says why, and which input to change."""
    code = error.errno
    if code == errno.ENAMETOOLONG:
        why = f"the name is too long for the file system (at most {name_max(path.parent)} bytes per name)"
        fix = f"shorten {what_to_change}"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"the folder {path.parent} is not writable ({os.strerror(code)})"
        fix = f"choose {what_to_change} in a writable folder, or make that folder writable"
    elif code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        why = f"the disk holding {path.parent} is full"
        fix = "free some space on it"
    elif code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        why = "a part of the name is an existing file, or the name is an existing folder"
        fix = f"change {what_to_change}"
    else:
        why = os.strerror(code) if code else str(error)
        fix = f"check {what_to_change} and the folder"
    return f"{where}: cannot write {path}: {why}. To fix: {fix}. Nothing was written"
