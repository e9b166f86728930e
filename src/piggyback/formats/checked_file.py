"""The one container of piggyback files (task artifacts and bundles).

safetensors (never executes code on load) with a format tag, a version, JSON metadata and a
SHA-256 digest over metadata and tensors, which catches tampering and truncation. Written to a
temporary file and linked into place, so a crash never leaves half a file. Knows nothing of
what the tensors mean: artifacts and bundles give it their own tensors and metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from piggyback.utils.atomic import atomic_write_stream


class ArtifactError(ValueError):
    """An artifact cannot be read or does not fit the model it is applied to."""


def _digest(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def write_checked_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    file_format: str,
    version: int,
    overwrite: bool = False,
) -> Path:
    """The one writer of piggyback files (artifacts and bundles): safetensors with a format
    tag, a version, JSON metadata and a digest; written to a temp file and then linked into
    place, so a crash never leaves half a file and an existing file is never clobbered."""
    path = Path(path)
    if path.exists() and not overwrite:
        error = FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        error.path = str(path)  # type: ignore[attr-defined]  # for write_errors.exists_for_cli
        raise error
    meta_json = json.dumps(meta, default=str)  # insertion order = network order
    metadata = {
        "format": file_format,
        "version": str(version),
        "meta": meta_json,
        "digest": _digest(meta_json, tensors),
    }
    # serialized in memory, written by atomic_write_stream: a full disk then reads as one
    # (safetensors' own writer turns it into an opaque SafetensorError)
    data = save(dict(tensors), metadata=metadata)
    atomic_write_stream(path, lambda handle: handle.write(data), overwrite=overwrite)
    return path


def read_checked_file(
    path: str | os.PathLike,
    *,
    file_format: str,
    version: int,
    what: str,
    format_hints: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a file written by :func:`write_checked_file`; any damage raises ArtifactError.

    ``what`` names the file kind in messages; ``format_hints`` maps another piggyback format
    to a hint (e.g. "use load_artifact") for files opened with the wrong loader.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types and OSError
        raise ArtifactError(
            f"{path} is not a readable piggyback {what} (truncated or corrupt?): {exc}"
        ) from None
    found = metadata.get("format")
    if found != file_format:
        hint = (format_hints or {}).get(found, "")
        raise ArtifactError(f"{path} is a safetensors file but not a piggyback {what}{hint}")
    try:
        found_version = int(metadata.get("version", "0"))
    except ValueError:
        raise ArtifactError(
            f"{path} has a damaged header: version {metadata.get('version')!r} is not a number"
        ) from None
    if found_version > version:
        raise ArtifactError(
            f"{path} uses {what} format v{metadata['version']}; this piggyback reads up to "
            f"v{version}. Upgrade piggyback."
        )
    meta_json = metadata.get("meta", "")
    if _digest(meta_json, tensors) != metadata.get("digest"):
        raise ArtifactError(f"{path} failed its integrity check: the file was modified or damaged")
    return json.loads(meta_json), tensors
