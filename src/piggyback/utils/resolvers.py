"""OmegaConf resolvers the Hydra output folders use (``conf/hydra/default.yaml``).

Registered by both entry points before Hydra composes the config.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf


def job_dirname(overrides: str, limit: int = 120) -> str:
    """A multirun job's folder name from its overrides: one path component (no ``/`` from
    path values), short enough for any file system (long ones end in a digest)."""
    name = overrides.replace("/", "_")
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def fresh_subdir(output_dir: str, name: str) -> str:
    """``name`` if ``output_dir/name`` does not exist yet, else ``name_v1``, ``name_v2``...

    Hydra writes ``.hydra/config.yaml`` into the run folder before the job starts, so a rerun
    into an earlier run's folder (even one refused a moment later, e.g. for an existing
    artifact) would overwrite the earlier run's config; it gets its own folder instead.
    """
    candidate, n = name, 0
    while (Path(output_dir) / candidate).exists():
        n += 1
        candidate = f"{name}_v{n}"
    return candidate


def register_resolvers() -> None:
    for name, fn in (("pb_dirname", job_dirname), ("pb_fresh_subdir", fresh_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
