"""The one way piggyback writes a file: temp file in the same folder, fsync, then into place.

Readers never see half a file, a crash leaves no partial output, ``overwrite=False`` never
clobbers a file created meanwhile (hard link fails if the name exists), and the result gets
the usual ``0666 & ~umask`` mode (``tempfile.mkstemp`` alone gives 0600).

The temporary file sits next to the target, never in ``/tmp``: a move across file systems is
a copy into the final path, and a disk that fills up during that copy leaves a truncated file
where the previous good one was. Any ``OSError`` on the way (a full disk, a read-only mount, a
deleted folder) removes the temporary file, leaves the previous version untouched and is
raised as a one-line :class:`~piggyback.utils.write_errors.WriteError`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from piggyback.utils.write_errors import WriteError, write_failure


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists(path: Path) -> FileExistsError:
    error = FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    error.path = str(path)  # type: ignore[attr-defined]  # for write_errors.exists_for_cli
    return error


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a crash right after must not bring back the old file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the data is synced
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[str], None],
    *,
    overwrite: bool = False,
    what: str = "version",
) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; returns ``path``.

    ``what`` names the file in an error (``the previous checkpoint is intact``). Raises
    ``FileExistsError`` (``overwrite=False`` and ``path`` exists) or ``WriteError``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise _exists(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails atomically if path exists
            except FileExistsError:
                raise _exists(path) from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise _exists(path) from None
                os.replace(tmp, path)
        _fsync_folder(path.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        _remove(tmp)
        raise write_failure(exc, path, what) from None
    finally:
        _remove(tmp)
    return path


def _remove(tmp: str | None) -> None:
    if tmp is not None and os.path.lexists(tmp):
        try:
            os.unlink(tmp)
        except OSError:  # the folder itself is gone or read-only: nothing left to clean
            pass


class _Sink:
    """A binary file that remembers the ``OSError`` its writes hit: ``torch.save`` and
    safetensors turn a full disk into a ``RuntimeError`` that no longer says so."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = exc
            raise


def atomic_write_stream(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    *,
    overwrite: bool = False,
    what: str = "version",
) -> Path:
    """:func:`atomic_write` for a writer that takes an open binary file (``torch.save``).

    The ``OSError`` under a writer's own exception (a full disk seen by ``torch.save``) is
    what gets reported, as :class:`WriteError`.
    """

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            sink = _Sink(handle)
            try:
                write(sink)  # type: ignore[arg-type]
            except OSError:
                raise
            except Exception:
                if sink.error is not None:
                    raise sink.error from None
                raise
            sink.flush()

    return atomic_write(path, to_file, overwrite=overwrite, what=what)


def atomic_write_text(
    path: str | os.PathLike, text: str, *, overwrite: bool = False, what: str = "version"
) -> Path:
    """:func:`atomic_write` for a text file (UTF-8)."""
    return atomic_write(
        path,
        lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
        overwrite=overwrite,
        what=what,
    )


__all__ = ["WriteError", "atomic_write", "atomic_write_stream", "atomic_write_text"]
