"""Check a whole training config before any work starts.

A bad option found after an hour of training wastes the hour; a task name used as a path can
write outside the run folder. Everything here runs in milliseconds on the composed config and
raises ``ConfigError`` with a one-line message that ``train.py`` prints as ``error: ...``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from omegaconf import DictConfig
from torch import nn

from piggyback.backbones.base import torch_load_failure
from piggyback.formats import MASK_ENCODINGS, canonical_encoding
from piggyback.methods import Method, build_method
from piggyback.nn import GRAD_RESCALES, MASK_INITS, THRESHOLD_FNS
from piggyback.training.finite_loss import MODES as NONFINITE_LOSS_MODES  # issue 18
from piggyback.utils.instantiate import to_dict

# Letters (any script), digits, "_", "-" and spaces; no dots, separators or "..".
_TASK_NAME = re.compile(r"^[^\W][\w\- ]*$")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what is allowed."""


def check_task_name(name: object) -> str:
    """Task names become file names and module keys: refuse anything that is not a plain name."""
    if not isinstance(name, str) or not _TASK_NAME.match(name) or name != name.strip():
        raise ConfigError(
            f"invalid task name {name!r}: use letters, digits, '_', '-' and spaces "
            "(no dots, path separators or leading/trailing spaces)"
        )
    return name


def _choice(cfg: DictConfig, key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")


def check_config(cfg: DictConfig, task_cfgs: list[DictConfig]) -> None:
    """Every check that needs only the config; raises ``ConfigError`` on the first problem."""
    encoding = cfg.get("artifact_encoding", "bits")
    try:
        encoding = canonical_encoding(encoding)
    except ValueError:
        _choice(cfg, "artifact_encoding", encoding, MASK_ENCODINGS)
    mask = cfg.get("mask") or {}
    _choice(cfg, "mask.threshold_fn", mask.get("threshold_fn", "binarizer"), THRESHOLD_FNS)
    _choice(cfg, "mask.mask_init", mask.get("mask_init", "1s"), MASK_INITS)
    _choice(cfg, "mask.grad_rescale", mask.get("grad_rescale", "none"), GRAD_RESCALES)
    _choice(cfg, "nonfinite_loss", cfg.get("nonfinite_loss", "stop"), NONFINITE_LOSS_MODES)  # 18
    if encoding == "rice" and mask.get("threshold_fn") == "ternarizer":
        raise ConfigError(
            "artifact_encoding=rice stores binary masks only; use artifact_encoding=bits "
            "with mask.threshold_fn=ternarizer"
        )
    try:  # the method's own checks (prune fractions, bn mode, lr_scale, ...)
        method = build_method(to_dict(cfg.method))
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    _check_step_in_backward(cfg, method)
    _check_compile_options(cfg)
    names = []
    for data_cfg in task_cfgs:
        name = check_task_name(data_cfg.get("task_name"))
        if name in names:
            raise ConfigError(f"task name {name!r} is used twice in data.tasks")
        names.append(name)
    try:  # the method's checks against the task names (CPG's per-task reference accuracy)
        method.check_tasks(names)
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    for data_cfg in task_cfgs:
        for key in ("batch_size", "eval_batch_size"):
            value = data_cfg.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
        num_classes = data_cfg.get("num_classes")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ConfigError(f"data.num_classes must be a positive integer, got {num_classes!r}")
    if not cfg.get("overwrite_artifacts", False):
        check_output_folder(
            Path(cfg.paths.output_dir), names, cfg.get("save_artifacts", True), cfg.get("resume")
        )


def _check_compile_options(cfg: DictConfig) -> None:
    """``model.compile_options`` go to ``torch.compile(options=...)``, which would refuse an
    unknown one only when the first task is built, with a message listing every option."""
    options = (cfg.get("model") or {}).get("compile_options") or {}
    if not isinstance(options, dict | DictConfig):
        raise ConfigError(
            f"model.compile_options must be a mapping of Inductor options, got {options!r}"
        )
    known = inductor_config.get_config_copy()
    for name in options:
        if name not in known:
            raise ConfigError(
                f"model.compile_options.{name} is not an Inductor option (torch._inductor."
                "config; e.g. layout_optimization, max_autotune)"
            )


def _check_step_in_backward(cfg: DictConfig, method: Method) -> None:
    """``piggyback.optim.StepInBackward`` steps each parameter inside backward and drops its
    gradient: nothing is left for clipping, accumulation or a method's gradient hook."""
    target = str((cfg.method.get("optimizer") or {}).get("_target_", ""))
    per_group = {
        name: str((spec or {}).get("_target_", ""))
        for name, spec in (cfg.method.get("optimizers") or {}).items()
    }
    inner = sorted(n for n, t in per_group.items() if t.endswith("StepInBackward"))
    if not target.endswith("StepInBackward") and not inner:
        return
    trainer = cfg.get("trainer") or {}
    if trainer.get("gradient_clip_val"):
        raise ConfigError(
            "trainer.gradient_clip_val cannot clip under StepInBackward (the step happens "
            "inside backward); drop the clipping or use the method's plain optimizer"
        )
    if (trainer.get("accumulate_grad_batches") or 1) > 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches > 1 cannot accumulate under StepInBackward (each "
            "gradient is used and dropped inside backward); set it to 1 or use the plain optimizer"
        )
    if type(method).on_after_backward is not Method.on_after_backward:
        raise ConfigError(
            f"method={method.name} edits gradients after backward, which StepInBackward has "
            "already used and dropped; use the method's own optimizer"
        )
    if inner or method.optimizers:
        raise ConfigError(
            "StepInBackward cannot be one of several optimizers (method.optimizers"
            f"{': ' + ', '.join(inner) if inner else ''}); use it as method.optimizer alone"
        )


def check_output_folder(
    output_dir: Path, tasks: list[str], save_artifacts: bool, resume: str | None
) -> None:
    """An earlier run's results in this folder are never overwritten: its artifacts, and the
    ``last.ckpt`` a stopped run left to resume from (unless this run is that resume)."""
    for name in tasks:
        artifact = output_dir / "artifacts" / f"{name}.safetensors"
        if save_artifacts and artifact.exists():
            raise ConfigError(
                f"{artifact} already exists; pick another output folder "
                "(hydra.run.dir=...) or set overwrite_artifacts=true"
            )
        last = output_dir / "checkpoints" / name / "last.ckpt"
        if last.exists() and (resume is None or Path(resume).resolve() != last.resolve()):
            raise ConfigError(
                f"{last} exists: an earlier run in this folder stopped there; continue it with "
                f"resume={last}, pick another output folder (hydra.run.dir=...) or set "
                "overwrite_artifacts=true"
            )


def check_channels(backbone: object, sample_channels: int, task: str | None = None) -> None:
    """A 3-channel backbone on 1-channel data fails deep inside a conv: say it up front."""
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != sample_channels:
        where = f"task {task!r}: " if task else ""
        raise ConfigError(
            f"{where}the backbone's first conv expects {first.in_channels} input channels but "
            f"the data has {sample_channels}; pick a matching backbone or data transform"
        )


def check_resume(path: str | Path, task: str, method: str, backbone: str) -> None:
    """``resume=`` must be a Lightning checkpoint of this very task, method and backbone."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"resume={path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        raise ConfigError(
            f"resume={path} is a task artifact, not a training checkpoint; "
            "resume from checkpoints/<task>/last.ckpt of the killed run"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # runs no code
    except Exception as exc:  # pickle, zip and tensor errors alike
        reason = torch_load_failure(path, exc)
        raise ConfigError(
            f"resume={path} is not a readable training checkpoint ({reason})"
        ) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"resume={path} is not a piggyback training checkpoint (last.ckpt)")
    method_spec = hp.get("method")
    found = {
        "task": hp.get("task"),
        "method": method_spec.get("name") if isinstance(method_spec, dict) else method_spec,
        "backbone": (hp.get("backbone") or {}).get("name"),
    }
    wanted = {"task": task, "method": method, "backbone": backbone}
    for key, value in wanted.items():
        if found[key] != value:
            raise ConfigError(
                f"resume={path} is a checkpoint of {key} {found[key]!r}, but this run is "
                f"{key} {value!r}; resume with the same data/method/backbone"
            )
