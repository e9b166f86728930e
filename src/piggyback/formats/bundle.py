"""The bundle file: one backbone (once) and every task of a multi-task model, in one file.

A deployment needs a single file and no download. Built on the same checked container as task
artifacts (safetensors, digest, atomic write); each task is stored as its artifact's tensors
and metadata, so whatever reads artifacts reads a bundle's tasks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from piggyback.formats.artifact import (
    ARTIFACT_FORMAT,
    TaskArtifact,
    artifact_from_parts,
    artifact_meta,
    artifact_tensors,
    artifact_version,
)
from piggyback.formats.checked_file import read_checked_file, write_checked_file

BUNDLE_FORMAT = "piggyback-bundle"
BUNDLE_VERSION = 4
"""v2: parameter-named masks, state fingerprint. v3: tasks with reduced-shape or soft masks.
v4: tasks on a widened backbone (CPG's growth). A bundle is written at the newest version
one of its tasks needs (plain bundles stay v2); v1 to v3 still load."""


def write_bundle(
    path: str | os.PathLike,
    *,
    backbone_name: str,
    backbone_fingerprint: str,
    backbone_state: Mapping[str, torch.Tensor],
    artifacts: Sequence[TaskArtifact],
    overwrite: bool = False,
) -> Path:
    """Write the backbone's (pretrained) state once plus every task, atomically.

    Refuses to replace an existing file unless ``overwrite``.
    """
    tensors = {f"backbone/{k}": v for k, v in backbone_state.items()}
    tasks_meta = []
    for i, artifact in enumerate(artifacts):
        tensors.update({f"task{i}/{k}": v for k, v in artifact_tensors(artifact).items()})
        tasks_meta.append(artifact_meta(artifact))
    meta = {"backbone": backbone_name, "fingerprint": backbone_fingerprint, "tasks": tasks_meta}
    version = max((artifact_version(a) for a in artifacts), default=2)
    return write_checked_file(
        path, tensors, meta, file_format=BUNDLE_FORMAT, version=version, overwrite=overwrite
    )


def read_bundle(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[TaskArtifact]]:
    """``(meta, backbone_state, artifacts)`` of a bundle; any damage raises ArtifactError.

    ``meta`` holds the backbone's name and recorded fingerprint; checking that fingerprint
    against the rebuilt backbone is the reader's job (it needs the backbone).
    """
    meta, tensors = read_checked_file(
        path,
        file_format=BUNDLE_FORMAT,
        version=BUNDLE_VERSION,
        what="multi-task bundle",
        format_hints={ARTIFACT_FORMAT: " (it is a single task artifact: use load_artifact)"},
    )
    state = {k[len("backbone/") :]: v for k, v in tensors.items() if k.startswith("backbone/")}
    artifacts = []
    for i, task_meta in enumerate(meta["tasks"]):
        prefix = f"task{i}/"
        parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        artifacts.append(artifact_from_parts(task_meta, parts))
    return meta, state, artifacts
