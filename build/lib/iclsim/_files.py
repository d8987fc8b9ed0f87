"""File writes shared by the runner's results and the sweep cache: atomic (temporary file, then
rename: never a half-written file), with the permissions of the user's umask (``mkstemp`` alone
gives 0600), and folders checked for writing before any work is done."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's current umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes):
    """Write to a temporary file in the same folder, then rename: never a half-written file. The file
    gets mode 0666 less the umask, as ``open`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable_dir(path: Path, what: str) -> Path:
    """Create the folder ``path`` if needed and check that a file can be written in it; a ValueError
    naming ``what`` and the path otherwise (an existing file in its place, no permission)."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is an existing file, "
                                 "not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".iclsim-write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} is not writable ({err.strerror or err})") from None
    return path
