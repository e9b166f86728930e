"""What a failed write says: one line naming the file, the cause and what is still on disk.

A full disk, a read-only mount or a deleted output folder surfaces from deep inside
``torch.save`` or ``safetensors`` as an ``OSError`` with a temporary file's name. The user
needs three things instead: which file could not be written, why, and whether the previous
version of it (the resume point, say) survived. ``piggyback.utils.atomic`` raises
:class:`WriteError` with that line; the entry points print it as ``error: ...``, exit 2.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# errno -> the words of the message; anything else falls back to os.strerror
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "input/output error",
}


class WriteError(Exception):
    """A file could not be written; the message says why and what is intact. ``errno`` is
    the underlying error's number (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, message: str, path: Path, code: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = code


def write_failure(exc: OSError, path: str | os.PathLike, what: str = "version") -> WriteError:
    """The :class:`WriteError` for ``exc`` raised while writing ``path``.

    Call it after the temporary file is gone: it looks at ``path`` to say whether the previous
    ``what`` (``checkpoint``, ``version``, ...) is intact or there was none.
    """
    path = Path(path)
    if exc.errno == errno.ENOENT and not path.parent.is_dir():
        gone = path.parent
        while not gone.parent.is_dir() and gone.parent != gone:
            gone = gone.parent  # name the folder that went, not the first missing leaf
        cause = f"the folder {gone} no longer exists (deleted or unmounted)"
    else:
        cause = _CAUSES.get(exc.errno or -1) or os.strerror(exc.errno or 0).lower()
    if path.is_file():
        state = f"the previous {what} is intact ({path})"
    else:
        state = f"there was no previous {what} there and nothing partial is left"
    return WriteError(f"{cause} while writing {path}; {state}", path, exc.errno)


def exists_for_cli(exc: FileExistsError) -> str:
    """A file that appeared meanwhile (the Python API says ``overwrite=True``), in the words
    of the command line: its options, never a Python argument. Other messages pass as
    they are."""
    if "overwrite=True" not in str(exc):
        return str(exc)
    path = getattr(exc, "path", None) or str(exc).split(" already exists")[0]
    return (
        f"{path} already exists; pick another output folder (hydra.run.dir=...) "
        "or set overwrite_artifacts=true"
    )


__all__ = ["WriteError", "exists_for_cli", "write_failure"]
