"""Safe writes. Every file dfkd writes goes to a temporary file in the same folder, is flushed to
disk, then renamed over its destination, so a crash or kill during the write leaves the previous
file whole and a reader never sees half a file. A destination that is a symbolic link or not a
regular file (a device, a folder) is never replaced: a run folder received from someone else cannot
make dfkd write outside it, and an output path cannot turn a device node into a file. Files appended
to (``metrics.jsonl``, the run lock) are opened without following a link either."""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch

from dfkd_base.errors import DfkdError


def check_replaceable(path: str | os.PathLike) -> None:
    """A one-line error unless ``path`` is absent or a regular file (not a link to one)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise DfkdError(f"{path} is a symbolic link; dfkd does not write through links (remove it, or write elsewhere)")
    if not stat.S_ISREG(mode):
        raise DfkdError(f"{path} is not a regular file; dfkd replaces only files it writes")


def open_append(path: str | os.PathLike, mode: str = "a") -> IO:
    """``open(path, mode)`` for appending (``a`` or ``a+``), refusing a symbolic link or a
    non-regular file at ``path`` (O_NOFOLLOW: the check and the open are one step)."""
    check_replaceable(path)
    flags = os.O_CREAT | os.O_APPEND | (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        raise DfkdError(f"cannot open {path} to append to it ({error.strerror})") from None
    return os.fdopen(fd, mode, buffering=1)


def check_output_folder(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """A one-line error unless files can be written in ``folder`` (or it can be made): its nearest
    existing ancestor is a writable folder with at least ``need_bytes`` free. Called before work
    starts, so a read-only or full destination is known before hours of training, not after."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise DfkdError(f"{folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DfkdError(f"{folder}: {existing} is not writable")
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise DfkdError(f"{folder}: {free / 2**20:.1f} MiB free on its disk, {need_bytes / 2**20:.1f} MiB needed")


def describe_os_error(error: OSError) -> str:
    """An operating-system error (disk full, permission denied, read-only disk) as one line."""
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name (ONNX, PIL): once the
    block ends without error, whatever was written there is synced and renamed to ``path``; on
    an error it is removed and ``path`` is untouched. A link or a non-regular file at ``path`` is
    refused before anything is written."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """``write(file)`` into a temporary binary file beside ``path``, then renamed over it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
    return Path(path)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` written atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
