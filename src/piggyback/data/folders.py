"""Say exactly what is wrong with a data folder: a file, a dangling link, no permission.

"dataset folder ... not found" for a ``data.root`` that exists (as a file), that is a
symbolic link to nothing, or that this user may not read sends the user looking in the wrong
place. :func:`check_data_folder` names the actual problem; a folder that is simply missing is
left to the caller, whose message knows the expected layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from piggyback.data.base import DataError


def folder_problem(path: str | os.PathLike, readable: bool = True) -> str | None:
    """Why ``path`` cannot be read as a folder (``"is a file, not a folder"``, ...), or None
    when it is a readable folder or does not exist at all. ``readable=False`` skips the
    listing check (a parent folder may be traversable without being listable)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return None
    if not path.is_dir():
        return "is a file, not a folder"
    if not readable:
        return None
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except PermissionError:
        return "is not readable by this user (permission denied)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def check_data_folder(path: str | os.PathLike, label: str, hint: str = "") -> None:
    """Raise ``DataError("<label> <path> <problem>; <hint>")`` when ``path`` exists (or is a
    link) but is not a readable folder; a parent that is a file or a dangling link too."""
    path = Path(path)
    for folder in [*reversed(path.parents), path]:
        problem = folder_problem(folder, readable=folder == path)
        if problem is not None:
            where = f"{label} {path}" if folder == path else f"{label} {path}: {folder}"
            raise DataError(f"{where} {problem}{'; ' + hint if hint else ''}")


__all__ = ["check_data_folder", "folder_problem"]
