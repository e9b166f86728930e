"""SupSup's one-shot rule: one forward and one backward through a superposition of all tasks.

Wortsman et al. (NeurIPS 2020, "Supermasks in Superposition") run the network with the
weights ``W ⊙ Σ_i α_i M_i`` at ``α_i = 1/T`` and take the task whose ``α_i`` most decreases
the output entropy: ``argmin_i ∂H/∂α_i``. Moving towards the right task's mask makes the
output more confident, so that coefficient has the most negative gradient.

**Heads of different sizes.** SupSup superposes the output layer too, so there is one
output distribution. Here every task has its own head (2 classes, 43, ...), which cannot be
mixed into one distribution. The objective superposes the *heads' certainties* instead:

    G(α) = Σ_t α_t · H_t(f(α)) / log C_t

with ``f(α)`` the superposed backbone's features and ``H_t / log C_t`` head ``t``'s entropy
normalised to [0, 1] (so a 2-class and a 43-class head weigh alike). This is SupSup's rule
with the last layer's superposition taken at the level of the loss: ``∂G/∂α_i`` is head
``i``'s normalised entropy on the mixed features (how sure task ``i`` already is) plus how
much moving towards mask ``i`` sharpens all heads together (the backbone term, SupSup's
signal). The task with the most negative ``∂G/∂α_i`` wins.

**Where it is expected to fail.**
- Similar domains (Split-CIFAR): masks and heads all fit any CIFAR image; the gradients
  differ little, as for every entropy-based rule.
- Masks that keep almost every weight (the backbone term vanishes) or tasks whose masks
  hardly differ: the direct entropy term decides alone, and the rule is ``entropy`` on the
  superposed (then about the pretrained) features, with ``entropy``'s failure: heads over
  the same features are surest on the pretraining domain's inputs, whichever task those
  belong to. Piggyback at the paper's mask rate for a few epochs is that case (masks start
  at 1, 5e-3 above the threshold: about 50 steps in one direction flip one). Its scores
  match minus the central-difference slope of ``G`` to about 1 % there, so sign and
  weighting are not the cause.
- Tasks with their own BN statistics: BN cannot be superposed with gradient here; the
  superposed network uses the tasks' mean BN state (a constant), which is far from each
  task's own on distant domains.
- ``per="sample"``: one forward and backward per input, unbatched (SupSup infers per
  batch); the gradient of a single input is also noisier.
- Methods whose tasks are not masks over one frozen ``W`` (fine-tuning, PackNet): they
  cannot be superposed, and the strategy refuses.
"""

from __future__ import annotations

import torch

from piggyback.methods import artifact_method
from piggyback.nn import masked_weights, superposed
from piggyback.taskinfer.base import (
    REGISTRY,
    Scores,
    Strategy,
    TaskInferenceError,
    TaskInferenceHost,
    bn_state,
    normalized_entropy,
)
from piggyback.utils.inputs import inputs_device, num_inputs, select_inputs

_CACHE_KEY = "oneshot"


def _mean_bn(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tasks' BN states averaged (integer counters: the first task's)."""
    out = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            out[key] = torch.stack([s[key].to(value) for s in states]).mean(0)
        else:
            out[key] = value
    return out


class OneShot(Strategy):
    """One forward + one backward through the superposition of every task (see module)."""

    name = "oneshot"
    summary = "1 forward + 1 backward through the mask superposition (SupSup)"

    def check(self, host: TaskInferenceHost) -> None:
        for task in host.tasks:
            artifact = host.artifact(task)
            if not artifact_method(artifact).superposable:
                others = sorted(n for n in REGISTRY if n != self.name)
                raise TaskInferenceError(
                    f"task_inference=oneshot superposes the tasks' masks over one frozen "
                    f"backbone; task {task!r} (method {artifact.method}) has its own weights "
                    f"and cannot be superposed. Use task_inference={' | '.join(others)}"
                )

    def cost(self, num_tasks: int, per: str) -> dict[str, float]:
        return {"forwards": 1.0, "backwards": 1.0}

    def superposition(self, host: TaskInferenceHost):
        """``(network, mask stacks, mean BN state)`` of the host's tasks, cached until tasks
        change. The network is the shared backbone, or the one network the tasks' method
        shares between them (WSN); tasks on different networks cannot be superposed."""
        key = tuple(host.tasks)
        cached = host.inference_cache.get(_CACHE_KEY)
        if cached is not None and cached[0] == key:
            return cached[1:]
        pairs = [
            artifact_method(host.artifact(t)).superposition(host, host.artifact(t)) for t in key
        ]
        network = pairs[0][0] if pairs else host.backbone
        apart = [t for t, (net, _) in zip(key, pairs, strict=True) if net is not network]
        if apart:
            raise TaskInferenceError(
                f"task_inference=oneshot superposes the tasks' masks on one network; tasks "
                f"{apart} run on another network than task {key[0]!r} (different methods). Use "
                f"task_inference={' | '.join(sorted(n for n in REGISTRY if n != self.name))}"
            )
        layers = dict(masked_weights(network))
        per_task = [masks or {} for _, masks in pairs]
        stacks = {}
        for name, layer in layers.items():
            device = layer.weight.device
            ones = torch.ones(layer.weight.shape, dtype=torch.int8, device=device)
            stacks[name] = torch.stack(
                [m[name].to(device, torch.int8) if name in m else ones for m in per_task]
            )
        bn = (
            _mean_bn([host.artifact(t).bn_state or dict(host.pretrained_bn) for t in key])
            if host.pretrained_bn
            else {}
        )
        host.inference_cache[_CACHE_KEY] = (key, network, stacks, bn)
        return network, stacks, bn

    def batch_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        backbone, stacks, bn = self.superposition(host)
        tasks = host.tasks
        device = inputs_device(x)
        alphas = torch.full((len(tasks),), 1.0 / len(tasks), device=device, requires_grad=True)
        with torch.enable_grad(), bn_state(backbone, bn), superposed(backbone, stacks, alphas):
            features = backbone(x)
            objective = sum(
                alphas[i] * normalized_entropy(host.heads[t](features)).mean()
                for i, t in enumerate(tasks)
            )
            (grad,) = torch.autograd.grad(objective, alphas)
        return Scores(-grad.detach().unsqueeze(0))

    def sample_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        """The batch rule on each input alone (one forward + backward per input)."""
        rows = [
            self.batch_scores(host, select_inputs(x, slice(i, i + 1))).values
            for i in range(num_inputs(x))
        ]
        return Scores(torch.cat(rows))
