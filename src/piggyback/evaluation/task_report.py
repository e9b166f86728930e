"""Task inference in the reports: how often each strategy finds the task, and what it costs.

``evaluate task_inference=<strategy or list>`` and a task sequence in ``train`` measure,
for every strategy of ``piggyback.taskinfer``, on the tasks' test splits:

- **per batch**: each test batch comes from one task; the task is inferred for the batch
  (SupSup's setting);
- **per sample**: the test inputs of all tasks shuffled together (fixed seed) into one mixed
  stream, batched, the task inferred for each input.

Per task: *task-inference accuracy* (the inferred task is right), *task-agnostic accuracy*
(the task is right **and** the class under it is right) next to the *task-aware accuracy*
(the class, given the true task). Cost: backbone forwards and backwards per input for task
and class together, and the wall-clock milliseconds per batch on the run's device.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from piggyback.backbones import build_backbone
from piggyback.methods import method_class
from piggyback.models.multitask import MultiTaskModel
from piggyback.taskinfer import (
    REGISTRY,
    Strategy,
    TaskInferenceError,
    build_strategy,
    predict,
)
from piggyback.utils.atomic import atomic_write_text
from piggyback.utils.inputs import Inputs, concat_inputs, move_inputs, select_inputs
from piggyback.utils.instantiate import to_dict

__all__ = [
    "check_task_inference",
    "format_task_inference",
    "group_task_inference",
    "report_task_inference",
    "sequence_task_inference",
    "strategy_list",
    "task_inference_block",
    "wants_all",
]

Batches = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


def strategy_list(spec: Any) -> list[str]:
    """``task_inference=`` as a list of registered names (``all`` = every one); [] = off."""
    if spec is None or spec is False:
        return []
    if isinstance(spec, ListConfig | DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    names = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    if names == ["all"]:
        return sorted(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise TaskInferenceError(
            f"task_inference={unknown[0]} is not a strategy; choose from {sorted(REGISTRY)} "
            "or all (a list works: task_inference=[entropy,prototype])"
        )
    return names


def wants_all(spec: Any) -> bool:
    """``task_inference=all``: strategies the tasks cannot use are skipped, not errors."""
    return isinstance(spec, str) and spec == "all"


def check_task_inference(cfg: DictConfig) -> list[str]:
    """Before training: the strategies exist and the method can serve them (oneshot needs
    masks over one frozen backbone)."""
    names = strategy_list(cfg.get("task_inference"))
    method = method_class(str(cfg.method.get("name", "piggyback")))
    if "oneshot" in names and not method.superposable and not wants_all(cfg.task_inference):
        others = [n for n in sorted(REGISTRY) if n != "oneshot"]
        raise TaskInferenceError(
            f"task_inference=oneshot superposes masks over one frozen backbone; method "
            f"{method.name} changes the weights per task. Use task_inference={others}"
        )
    return names


def collect(loaders: Mapping[str, Iterable[Any]], limit: int | None = None) -> Batches:
    """Every task's test batches ``(x, y)`` on the CPU (the first ``limit`` per task)."""
    out: Batches = {}
    for task, loader in loaders.items():
        out[task] = []
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            out[task].append((move_inputs(batch[0], "cpu"), batch[1].cpu()))
    return out


def _tally(
    rows: dict[str, dict[str, int]], preds: Sequence[Any], tasks: Sequence[str], y: torch.Tensor
) -> None:
    for pred, task, label in zip(preds, tasks, y.tolist(), strict=True):
        row = rows.setdefault(task, {"n": 0, "task_ok": 0, "both_ok": 0})
        row["n"] += 1
        row["task_ok"] += pred.task == task
        row["both_ok"] += pred.task == task and pred.label == label


def _timed(model: MultiTaskModel, rule: Strategy, x: Inputs, per: str, device):
    x = move_inputs(x, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    preds = predict(model, x, rule, per)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return preds, 1000 * (time.perf_counter() - start)


def _mode(rows: dict[str, dict[str, int]], ms: list[float], cost: dict[str, float], size: int):
    n = sum(r["n"] for r in rows.values())
    return {
        "tasks": {
            t: {
                "n": r["n"],
                "task_inference_pct": 100 * r["task_ok"] / r["n"],
                "task_agnostic_pct": 100 * r["both_ok"] / r["n"],
            }
            for t, r in rows.items()
        },
        "task_inference_pct": 100 * sum(r["task_ok"] for r in rows.values()) / n,
        "task_agnostic_pct": 100 * sum(r["both_ok"] for r in rows.values()) / n,
        "forwards_per_input": cost["forwards"],
        "backwards_per_input": cost["backwards"],
        "ms_per_batch": sum(ms) / len(ms),
        "batch_size": size,
    }


def _cost(rule: Strategy, num_tasks: int, per: str) -> dict[str, float]:
    cost = dict(rule.cost(num_tasks, per))
    if not rule.gives_logits:
        cost["forwards"] += 1  # the class: one forward of the inferred task's network
    return cost


@torch.no_grad()
def _task_aware(model: MultiTaskModel, batches: Batches, device) -> dict[str, float]:
    out = {}
    for task, items in batches.items():
        right = sum(
            int((model(move_inputs(x, device), task=task).argmax(1).cpu() == y).sum())
            for x, y in items
        )
        out[task] = 100 * right / sum(len(y) for _, y in items)
    return out


def task_inference_block(
    model: MultiTaskModel,
    batches: Batches,
    strategies: Sequence[str],
    device: torch.device,
    seed: int = 0,
    skip_unusable: bool = False,
) -> dict[str, Any]:
    """Per strategy, per batch and per sample: per-task and overall accuracies and cost.

    A strategy the tasks cannot use raises :class:`TaskInferenceError`, or with
    ``skip_unusable`` (``task_inference=all``) is listed under ``skipped`` with the reason.
    """
    tasks = list(batches)
    rules = {name: build_strategy(name) for name in strategies}
    skipped = {}
    for name, rule in list(rules.items()):
        try:
            rule.check(model)  # refuse before measuring anything
        except TaskInferenceError as exc:
            if not skip_unusable:
                raise
            skipped[name] = str(exc)
            del rules[name]
    xs = concat_inputs([x for t in tasks for x, _ in batches[t]])  # text: padded alike
    ys = torch.cat([y for t in tasks for _, y in batches[t]])
    owner = [t for t in tasks for _, y in batches[t] for _ in range(len(y))]
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(seed)).tolist()
    size = max(len(y) for t in tasks for _, y in batches[t])
    block: dict[str, Any] = {
        "task_aware_pct": _task_aware(model, batches, device),
        "mixed_stream": {"inputs": len(ys), "batch_size": size, "seed": seed},
        "strategies": {},
        "skipped": skipped,
    }
    for name, rule in rules.items():
        rows: dict[str, dict[str, int]] = {}
        ms = []
        for task in tasks:
            for x, y in batches[task]:
                preds, took = _timed(model, rule, x, "batch", device)
                _tally(rows, preds, [task] * len(y), y)
                ms.append(took)
        per_batch = _mode(rows, ms, _cost(rule, len(tasks), "batch"), size)
        rows, ms = {}, []
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            preds, took = _timed(model, rule, select_inputs(xs, idx), "sample", device)
            _tally(rows, preds, [owner[i] for i in idx], ys[idx])
            ms.append(took)
        per_sample = _mode(rows, ms, _cost(rule, len(tasks), "sample"), size)
        block["strategies"][name] = {
            "summary": rule.summary,
            "per_batch": per_batch,
            "per_sample": per_sample,
        }
    return block


def group_task_inference(
    cfg: DictConfig, model: MultiTaskModel, loaders: Mapping[str, Any], device: torch.device
) -> dict[str, Any] | None:
    """Evaluate's block for one method group (None: off, or fewer than two tasks with data)."""
    names = strategy_list(cfg.get("task_inference"))
    if not names or len(loaders) < 2:
        return None
    return task_inference_block(
        model,
        collect(loaders, cfg.get("limit_test_batches")),
        names,
        device,
        cfg.get("seed", 0),
        skip_unusable=wants_all(cfg.get("task_inference")),
    )


def sequence_task_inference(
    cfg: DictConfig, learned: Sequence[tuple[str, Any, Any]]
) -> dict[str, Any] | None:
    """The ``cl`` block's task inference after a sequence: every learned task exported into
    one multi-task model on a fresh pretrained backbone, tested on the tasks' test splits."""
    names = strategy_list(cfg.get("task_inference"))
    if not names or len(learned) < 2:
        return None
    artifacts = [module.export_task(task) for task, module, _ in learned]
    device = next(iter(learned[0][1].parameters())).device
    built = build_backbone(**to_dict(cfg.backbone))
    model = MultiTaskModel(built.model, built.name).to(device)
    for artifact in artifacts:
        model.add_task(artifact)
    loaders = {}
    for task, _, datamodule in learned:
        datamodule.setup("test")
        loaders[task] = datamodule.test_dataloader()
    limit = cfg.trainer.get("limit_test_batches")  # an int limits task inference alike
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
    return task_inference_block(
        model,
        collect(loaders, limit),
        names,
        device,
        cfg.get("seed", 0),
        skip_unusable=wants_all(cfg.get("task_inference")),
    )


def format_task_inference(blocks: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per method label and strategy, both settings, accuracies and cost."""
    lines = []
    for label, block in blocks.items():
        aware = block["task_aware_pct"]
        lines += [
            f"### Task inference: {label}",
            "",
            f"task-aware accuracy (true task given): {sum(aware.values()) / len(aware):.1f} % "
            f"(mean over {len(aware)} tasks); mixed stream: {block['mixed_stream']['inputs']} "
            f"inputs in batches of {block['mixed_stream']['batch_size']}",
            "",
            "| strategy | setting | task-inference acc | task-agnostic acc | forwards / input "
            "| backwards / input | ms / batch |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, result in block["strategies"].items():
            for mode in ("per_batch", "per_sample"):
                r = result[mode]
                lines.append(
                    f"| {name} | {mode.replace('_', ' ')} | {r['task_inference_pct']:.1f} % "
                    f"| {r['task_agnostic_pct']:.1f} % | {r['forwards_per_input']:g} "
                    f"| {r['backwards_per_input']:g} | {r['ms_per_batch']:.1f} |"
                )
        lines += [
            "",
            "| task | task-aware | "
            + " | ".join(
                f"{n} {m} (task / agnostic)"
                for n in block["strategies"]
                for m in ("batch", "sample")
            )
            + " |",
        ]
        lines.append("|---|---|" + "---|" * 2 * len(block["strategies"]))
        for task, acc in aware.items():
            cells = [
                f"{r['tasks'][task]['task_inference_pct']:.1f} / "
                f"{r['tasks'][task]['task_agnostic_pct']:.1f}"
                for result in block["strategies"].values()
                for r in (result["per_batch"], result["per_sample"])
            ]
            lines.append(f"| {task} | {acc:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def report_task_inference(result: Mapping[str, Any], output_dir: Path, echo: bool) -> None:
    """Write ``task_inference.md`` for evaluate's result (when it measured any) and print it."""
    blocks = {
        label: s["task_inference"]
        for label, s in result["summary"].items()
        if s.get("task_inference")
    }
    if not blocks:
        return
    text = format_task_inference(blocks)
    atomic_write_text(output_dir / "task_inference.md", text + "\n", overwrite=True)
    if echo:
        print(text, flush=True)
