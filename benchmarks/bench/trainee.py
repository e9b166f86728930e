"""A method's training step as the repo configures it, and the synthetic batch it runs on.

The train, compile, memory, loader and faults sections all time or measure the same thing:
a real ``PiggybackModule`` with the optimizer, learning rates and BN mode of
``conf/method/<method>.yaml``, stepped by hand.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bench.timing import sync
from piggyback.models.module import PiggybackModule
from piggyback.training.task import compile_module

REPO = Path(__file__).resolve().parents[2]
METHODS = ("piggyback", "finetune", "classifier_only")


def method_config(method: str) -> dict[str, Any]:
    """The optimizer / lr / bn settings the repo ships in ``conf/method/<method>.yaml``."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{method}.yaml"))
    return {k: cfg[k] for k in ("bn", "optimizer", "lr") if k in cfg}


class Trainee:
    """A PiggybackModule with its configured optimizer, plus a timed training step."""

    def __init__(
        self, method: str, args: argparse.Namespace, *, fused: bool = False, compiled: bool = False
    ) -> None:
        cfg = method_config(method)
        optimizer = dict(cfg["optimizer"])
        if fused:
            optimizer["fused"] = True
        lean = getattr(args, "optimizer", "adam")
        if method == "piggyback" and lean != "adam":
            # method=piggyback_lean's inner optimizer as shipped, or with a factored v
            optimizer = dict(method_config("piggyback_lean")["optimizer"]["optimizer"])
            if lean == "lean_factored":
                optimizer["second_moment"] = "factored"
        if method == "piggyback" and getattr(args, "step_in_backward", False):
            # opt-in: each mask stepped (and its gradient freed) during backward
            optimizer = {
                "_target_": "piggyback.optim.StepInBackward",
                "_partial_": True,
                "optimizer": optimizer,
            }
        torch.manual_seed(0)
        self.module = PiggybackModule(
            backbone={"name": args.arch, "weights": None},
            task="bench",
            num_classes=args.num_classes,
            method=method,
            bn=cfg.get("bn", "frozen"),
            optimizer=optimizer,
            scheduler={},
            lr=cfg.get("lr"),
            channels_last=args.channels_last,
            log_layer_sparsity=False,
            recompute_masked_weights=getattr(args, "recompute", False),
        ).to(args.device)
        self.module.setup("fit")  # channels_last conversion, as Lightning would do it
        self.module.train()
        if compiled:
            # The Lightning way, what model.compile=true does before trainer.fit
            self.module = compile_module(self.module, getattr(args, "compile_options", None))
        self.optimizer = self.module.configure_optimizers()
        self.device = args.device
        self.autocast = (
            torch.autocast(args.device.type, dtype=torch.bfloat16)
            if args.precision == "bf16"
            else nullcontext()
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return F.cross_entropy(self.module(x), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.forward(x, y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def phases(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        """(forward, backward, optimizer) seconds of one step."""
        t0 = time.perf_counter()
        loss = self.forward(x, y)
        sync(self.device)
        t1 = time.perf_counter()
        loss.backward()
        sync(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2


def batch(
    args: argparse.Namespace, size: int | None = None, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of ``n`` images of ``size`` px and their labels, on the device."""
    g = torch.Generator().manual_seed(0)
    n = n or args.batch
    size = size or args.size
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, args.num_classes, (n,), generator=g)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(args.device), y.to(args.device)


def fused_supported(device: torch.device) -> bool:
    """Whether this torch has fused Adam and SGD on ``device``."""
    try:
        p = nn.Parameter(torch.zeros(2, device=device))
        torch.optim.Adam([p], fused=True)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False
