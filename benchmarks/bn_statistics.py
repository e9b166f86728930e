"""What re-estimating BatchNorm's statistics on a new domain does to a pretrained network.

Methods that train task-specific BN (``bn: train``: piggyback_bn, fine-tuning, PackNet, CPG,
WSN, HAT) normalise with the new domain's batch statistics while training and their running
average at test. This script isolates that one change from any learning: for each task of a
composed experiment it takes the *untrained* backbone's pooled features under five sets of BN
statistics and fits the same linear probe on each (full-batch Adam on the un-augmented training
images, tested on the test split):

- ``pretrained``: the network as shipped (``bn: frozen``);
- ``adapted``: means and variances re-estimated on the task's training images (AdaBN);
- ``means_only`` / ``variances_only``: one of the two re-estimated, the other pretrained;
- ``variances_floored``: re-estimated, each variance at least its pretrained value.

It also prints the share of BN channels whose variance on the domain is under a quarter of
the pretrained one (re-normalising amplifies them at least 2x). docs/results.md reads the
numbers this printed for piggyback_bn's gap.

    python benchmarks/bn_statistics.py --tasks sign_digits cifar10_small -- \\
        experiment=family paths.data_dir=../shared/data
    python benchmarks/bn_statistics.py --tasks sign_digits -- experiment=family \\
        paths.data_dir=../shared/data data.image_size=112 data.resize_size=128
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, Dataset

from piggyback.backbones import build_backbone
from piggyback.training.sequence import task_configs
from piggyback.utils.instantiate import build, to_dict

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("pretrained", "adapted", "means_only", "variances_only", "variances_floored")
BN = nn.modules.batchnorm._BatchNorm


def batchnorms(net: nn.Module) -> list[tuple[str, BN]]:
    return [(name, m) for name, m in net.named_modules() if isinstance(m, BN)]


@torch.no_grad()
def features(
    net: nn.Module, data: Iterable, *, train_mode: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled features and labels of every batch; ``train_mode`` normalises with batch
    statistics (and, with ``momentum=None``, accumulates their exact average)."""
    net.train(train_mode)
    pairs = [(net(x), y) for x, y in data]
    net.eval()
    return torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])


@torch.no_grad()
def domain_statistics(
    net: nn.Module, data: Iterable
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every BN layer's (mean, variance) over ``data``, as AdaBN estimates them: one pass in
    train mode with a cumulative average; ``net`` is left as it came."""
    adapted = copy.deepcopy(net)
    for _, bn in batchnorms(adapted):
        bn.reset_running_stats()
        bn.momentum = None  # the exact average over the pass, not an exponential one
    features(adapted, data, train_mode=True)
    return {
        name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in batchnorms(adapted)
    }


@torch.no_grad()
def with_statistics(
    net: nn.Module, domain: dict[str, tuple[torch.Tensor, torch.Tensor]], variant: str
) -> nn.Module:
    """A copy of ``net`` whose BN layers normalise with ``variant``'s statistics."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    out = copy.deepcopy(net)
    for name, bn in batchnorms(out):
        mean, var = domain[name]
        if variant in ("adapted", "means_only", "variances_floored"):
            bn.running_mean.copy_(mean)
        if variant in ("adapted", "variances_only"):
            bn.running_var.copy_(var)
        elif variant == "variances_floored":
            bn.running_var.copy_(torch.maximum(var, bn.running_var))
    return out.eval()


def probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    steps: int = 300,
    seed: int = 0,
) -> float:
    """Test accuracy (%) of a linear probe on standardised features (full-batch Adam 1e-3,
    weight decay 1e-4: the same probe for every variant, so only the features differ)."""
    (x, y), (xt, yt) = train, test
    mean, std = x.mean(0), x.std(0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], int(torch.cat([y, yt]).max()) + 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head((x - mean) / std), y).backward()
            opt.step()
    with torch.no_grad():
        return (head((xt - mean) / std).argmax(1) == yt).float().mean().item() * 100


def shrunk_share(
    net: nn.Module, domain: dict[str, tuple[torch.Tensor, torch.Tensor]], ratio: float = 0.25
) -> float:
    """Share (%) of BN channels whose domain variance is under ``ratio`` x the pretrained one."""
    shrunk = total = 0
    for name, bn in batchnorms(net):
        pre = bn.running_var
        alive = pre > bn.eps  # channels dead on ImageNet stay dead either way
        shrunk += int(((domain[name][1] < ratio * pre) & alive).sum())
        total += int(alive.sum())
    return 100 * shrunk / max(total, 1)


def compare(
    net: nn.Module,
    train_plain: Dataset,
    train_augmented: Dataset,
    test: Dataset,
    batch_size: int = 64,
) -> dict[str, float]:
    """Probe accuracy per variant, statistics estimated on the *augmented* training stream (as
    ``bn: train`` sees it), plus ``shrunk_channels_%``."""

    def loader(ds: Dataset) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=False)

    domain = domain_statistics(net, loader(train_augmented))
    out = {}
    for variant in VARIANTS:
        model = with_statistics(net, domain, variant)
        out[variant] = probe_accuracy(
            features(model, loader(train_plain)), features(model, loader(test))
        )
    out["shrunk_channels_%"] = shrunk_share(net, domain)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", help="task names of the experiment (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=family")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=list(args.overrides))
    tasks = task_configs(cfg.data)
    unknown = sorted(set(args.tasks or ()) - {t.task_name for t in tasks})
    if unknown:
        known = ", ".join(t.task_name for t in tasks)
        parser.exit(
            2, f"error: no task {', '.join(unknown)} in this experiment; its tasks: {known}\n"
        )
    backbone = build_backbone(**to_dict(cfg.backbone))
    print(f"| task | {' | '.join(VARIANTS)} | channels with variance < 1/4 pretrained |")
    print("|---" * (len(VARIANTS) + 2) + "|")
    for task_cfg in tasks:
        if args.tasks and task_cfg.task_name not in args.tasks:
            continue
        dm = build(task_cfg, num_workers=0)
        dm.prepare_data()
        dm.adopt_backbone_config(backbone.data_config)
        dm.setup("fit")
        dm.setup("test")
        plain = copy.copy(dm.train_set)
        plain.transform = dm.test_set.transform  # the probe fits un-augmented images
        res = compare(backbone.model, plain, dm.train_set, dm.test_set)
        cells = " | ".join(f"{res[v]:.1f}" for v in VARIANTS)
        print(f"| {task_cfg.task_name} | {cells} | {res['shrunk_channels_%']:.1f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
