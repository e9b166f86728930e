"""The one place where config nodes become objects."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf


def build(node: DictConfig | dict | None, **overrides: Any) -> Any:
    """``hydra.utils.instantiate`` with ``_convert_="object"`` (plain lists/dicts in objects)."""
    if node is None:
        return None
    return hydra.utils.instantiate(node, _convert_="object", **overrides)


def build_all(group: DictConfig | dict | None, **overrides: Any) -> list[Any]:
    """Instantiate every ``_target_`` entry of a keyed group (loggers, callbacks)."""
    if not group:
        return []
    return [build(node, **overrides) for node in group.values() if node and "_target_" in node]


def to_dict(cfg: DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
