"""What dlgraph may write, and where: the one rule of every command that writes a file.

- A file is written whole or not at all: to a temporary name in its folder, flushed to disk,
  then renamed over the target (:func:`atomic_write`). A crash or a full disk leaves the old
  file or the whole new one.
- An output file (``-o``, ``--output``) may be created where nothing is. A file already there
  is replaced only when dlgraph wrote it and nobody changed it since, or when the user says
  so (``--force``). dlgraph knows its own files by a per-user record of what it wrote (the
  path with the file's device, inode, size and modification time) in
  ``$DLGRAPH_STATE_DIR`` (default ``$XDG_STATE_HOME/dlgraph``, ``~/.local/state/dlgraph``);
  a file that is not in the record, or changed since, is the user's.
- The disk's refusals (full, read-only, no permission, a folder that vanished, a file where
  a folder should be) are one :class:`OutputError` naming the file and what to do.

Run directories follow the same rule one level up (engine/train/rundir.py): a run writes
into a new folder, or one that dlgraph marked as its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path

from dlgraph.engine.errors import OutputError, Source

#: the record keeps the newest this many files written
RECORD_SIZE = 5000

# errno -> (what happened, what to do)
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device",
                   "free some space on that disk (or write somewhere else)"),
    errno.EDQUOT: ("the disk quota is used up", "free some space (or write somewhere else)"),
    errno.EROFS: ("the file system is read-only", "write to a folder on a writable disk"),
    errno.EACCES: ("no permission to write there",
                   "write to a folder you own, or change its permissions"),
    errno.EPERM: ("no permission to write there",
                  "write to a folder you own, or change its permissions"),
    errno.ENOENT: ("its folder does not exist (was it removed while dlgraph wrote it?)",
                   "keep the folder in place while the command runs"),
    errno.ENOTDIR: ("a part of its path is a file, not a folder",
                    "choose a path whose folders are folders"),
    errno.EISDIR: ("it is a folder", "name a file, not a folder"),
    errno.EEXIST: ("a part of its path is a file, not a folder",
                   "choose a path whose folders are folders"),
}


def disk_error(path: str | Path, e: OSError, doing: str = "write it") -> OutputError:
    """The OutputError of an OSError met while writing ``path``: what happened in words and
    what to do, located at the file. Its ``fix`` is what to do before trying again (the
    training loop adds how to go on: ``--resume``)."""
    what, todo = _DISK_ERRORS.get(e.errno, (e.strerror or str(e), "check the disk and the "
                                            "folder's permissions"))
    err = OutputError(f"cannot {doing}: {what}", source=Source(str(path)),
                      help=f"{todo}, then run the command again")
    err.fix = todo
    return err


def atomic_write(path: str | Path, data: bytes, *, parents: bool = True) -> None:
    """Write bytes to ``path`` so that readers see the old file or the whole new one; the
    folders on the way are made when ``parents``. An OSError is an :class:`OutputError`."""
    path = Path(path)
    try:
        if parents:
            _make_folders(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise disk_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_folders(folder: Path) -> None:
    """``folder`` and its parents; a file on the way is an ENOTDIR OSError (not the
    FileExistsError mkdir gives, which reads as if the folder were there)."""
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(p))
            break
    folder.mkdir(parents=True, exist_ok=True)


def check_output(path: str | Path, *, force: bool = False) -> Path:
    """``path`` if dlgraph may write it (see the module docstring); else an OutputError that
    says why and what to do. Called before the work that makes the file, and again by
    :func:`write_output`, so a refusal costs nothing and loses nothing."""
    path = Path(path)
    for p in path.parents:
        if (p.exists() or p.is_symlink()) and not p.is_dir():
            raise OutputError(f"cannot write it: {p} is a file, not a folder",
                              source=Source(str(path)),
                              help="choose a path whose folders are folders")
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(folder, os.W_OK):
        what, todo = _DISK_ERRORS[errno.EROFS if _read_only(folder) else errno.EACCES]
        raise OutputError(f"cannot write it: {what} ({folder})", source=Source(str(path)),
                          help=todo)
    if path.is_dir():
        raise OutputError("cannot write it: it is a folder", source=Source(str(path)),
                          help="name a file, not a folder")
    if path.is_symlink() and not force:
        raise OutputError("cannot write it: it is a symbolic link, which dlgraph does not "
                          "follow to write", source=Source(str(path)),
                          help="name the file itself, or pass --force to replace the link")
    if path.exists() and not force and not dlgraph_wrote(path):
        raise OutputError("the file is already there and dlgraph did not write it",
                          source=Source(str(path)),
                          help="name a new file, or pass --force to replace it")
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def write_output(path: str | Path, data: bytes, *, force: bool = False) -> Path:
    """Write an output file by the rule: checked (:func:`check_output`), written atomically,
    recorded as dlgraph's own; returns the path."""
    path = check_output(path, force=force)
    if force and path.is_symlink():
        path.unlink()
    atomic_write(path, data)
    remember(path)
    return path


# ----------------------------------------------------------- the record of dlgraph's files


def _record_dir() -> Path:
    root = os.environ.get("DLGRAPH_STATE_DIR")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "dlgraph"


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


@contextlib.contextmanager
def _record():
    """The record (path -> stamp), read and, on leaving, written back under a lock; an
    unusable record is an empty one (then dlgraph's files are treated as the user's: the
    safe side)."""
    folder = _record_dir()
    entries: dict[str, list[int]] = {}
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(folder / "written.lock", "a")  # noqa: SIM115 (closed below)
    except OSError:
        yield entries
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = json.loads((folder / "written.json").read_text())
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}
        before = dict(entries)
        yield entries
        if entries != before:
            keep = dict(list(entries.items())[-RECORD_SIZE:])
            with contextlib.suppress(OutputError):
                atomic_write(folder / "written.json", json.dumps(keep).encode(), parents=False)


def remember(path: str | Path) -> None:
    """Record ``path`` as written by dlgraph, as it is now."""
    path = Path(path).absolute()
    stamp = _stamp(path)
    if stamp is not None:
        with _record() as entries:
            entries.pop(str(path), None)          # re-inserted last: the newest
            entries[str(path)] = stamp


def dlgraph_wrote(path: str | Path) -> bool:
    """Whether dlgraph wrote the file at ``path`` and nobody changed it since."""
    path = Path(path).absolute()
    stamp = _stamp(path)
    if stamp is None:
        return False
    with _record() as entries:
        return entries.get(str(path)) == stamp


__all__ = ["atomic_write", "check_output", "disk_error", "dlgraph_wrote", "remember",
           "write_output"]
