"""Performance figures of issue 6, one line each, every line a ratio against its target.

    python benchmarks/run.py                 # CPU: ResNet-18 training at 96 px, ResNet-50 switch
    python benchmarks/run.py --quick         # smoke run, well under a minute on 2 cores
    python benchmarks/run.py --device cuda   # ResNet-50 at 224 px, bf16 autocast, channels_last

Every time is the median over interleaved rounds (variant A, B, C, A, B, C, ...) so that load
drifting on a shared machine hits all variants alike; every ratio is the median of the
per-round ratios. On CPU the default is one intra-op thread: with two threads on a loaded
two-core box, OpenMP barriers wait on descheduled threads and times triple and scatter. See
benchmarks/README.md for what each line measures.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # loader_throughput.write_dataset

SWITCH_BUDGET_S = 0.100
# Dense bf16 tensor-core peaks (FLOP/s) for the "fraction of peak" line; --peak-tflops wins.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
METHODS = ("piggyback", "finetune", "classifier_only")


# ------------------------------------------------------------------------------ helpers
def emit(name: str, value: float, target: str, detail: str) -> None:
    """The one output format: ``name = value  (target ...)  [details]``."""
    print(f"{name} = {value:.3f}  ({target})  [{detail}]", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every ``fns`` entry, measured in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median of per-round ratios: robust to slow drifts of machine load."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def med_ms(times: dict[str, list[float]], key: str) -> float:
    return 1e3 * statistics.median(times[key])


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def method_config(method: str) -> dict[str, Any]:
    """The optimizer / lr / bn settings the repo ships in ``conf/method/<method>.yaml``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{method}.yaml"))
    return {k: cfg[k] for k in ("bn", "optimizer", "lr") if k in cfg}


def realistic_masks(
    shapes: list[tuple[int, ...]], zeros: float, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Trained-looking binary masks: zero rate grows with depth, zeros cluster by filter.

    Per-layer rates grow 1 -> 10 (relative) with depth and are scaled so the weighted mean
    is ``zeros``; inside a layer each output filter draws its own rate from a Beta around
    the layer rate, which is how trained Piggyback masks look (see PAPER.md / codec.py).
    """
    base = np.linspace(1.0, 10.0, len(shapes))
    sizes = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    rates = np.clip(base * zeros * sizes.sum() / (base * sizes).sum(), 1e-4, 0.5)
    out = []
    for shape, rate in zip(shapes, rates, strict=True):
        per_filter = rng.beta(rate * 4.0, (1.0 - rate) * 4.0, size=shape[0])
        p = per_filter.reshape((-1,) + (1,) * (len(shape) - 1))
        out.append(torch.from_numpy(rng.random(shape) >= p).float())
    return out


def set_realistic_masks(backbone: nn.Module, zeros: float, seed: int) -> float:
    """Load realistic masks into every masked layer; returns the actual zero fraction."""
    from piggyback.nn.convert import masked_weights

    layers = [layer for _, layer in masked_weights(backbone)]
    masks = realistic_masks(
        [tuple(layer.weight.shape) for layer in layers], zeros, np.random.default_rng(seed)
    )
    for layer, mask in zip(layers, masks, strict=True):
        layer.set_mask(mask)
    total = sum(m.numel() for m in masks)
    return 1.0 - sum(float(m.sum()) for m in masks) / total


# ------------------------------------------------------------------------ training step
class Trainee:
    """A PiggybackModule with its configured optimizer, plus a timed training step."""

    def __init__(
        self, method: str, args: argparse.Namespace, *, fused: bool = False, compiled: bool = False
    ) -> None:
        from piggyback.models.module import PiggybackModule

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
            from piggyback.training.task import compile_module

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


def mask_passes(trainee: Trainee, rounds: int) -> list[float]:
    """Seconds of the elementwise work a Piggyback step adds, alone, per round.

    Over every masked weight: the forward's ``W * M`` (``WeightMask.effective_weight``, the
    call the masked layers make, here without autograd) and the backward's ``dL/dW_eff * W``
    (into a preallocated buffer, the traffic of the in-place product the Function does).
    Memory-bound passes: their time is the part of the step ratio that no reordering of the
    same arithmetic removes.
    """
    from piggyback.nn.convert import masked_weights

    layers = [m for _, m in masked_weights(trainee.module.backbone)]
    grads = [torch.randn_like(m.weight) for m in layers]
    outs = [torch.empty_like(m.weight) for m in layers]

    def run() -> None:
        with torch.no_grad():
            for m, g, out in zip(layers, grads, outs, strict=True):
                m.effective_weight()
                torch.mul(g, m.weight, out=out)

    return interleaved({"passes": run}, rounds, 1, trainee.device)["passes"]


def batch(args: argparse.Namespace, size: int | None = None, n: int | None = None):
    g = torch.Generator().manual_seed(0)
    n = n or args.batch
    size = size or args.size
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, args.num_classes, (n,), generator=g)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(args.device), y.to(args.device)


def fused_supported(device: torch.device) -> bool:
    try:
        p = nn.Parameter(torch.zeros(2, device=device))
        torch.optim.Adam([p], fused=True)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def bench_training(args: argparse.Namespace) -> None:
    x, y = batch(args)
    shape = f"{args.arch}, batch {args.batch} at {args.size} px, {args.precision}"
    trainees = {m: Trainee(m, args) for m in METHODS}
    fused = fused_supported(args.device)
    if fused:
        trainees["piggyback[fused]"] = Trainee("piggyback", args, fused=True)
        trainees["finetune[fused]"] = Trainee("finetune", args, fused=True)
    lean = parse_args([*args.child_argv, *LEAN_ARGV])
    trainees["piggyback_lean"] = Trainee("piggyback", lean)
    fns = {k: (lambda t=t: t.step(x, y)) for k, t in trainees.items()}
    times = interleaved(fns, args.rounds, args.warmup, args.device)
    opt = {m: type(t.optimizer).__name__ for m, t in trainees.items()}
    emit(
        "piggyback_step / finetune_step",
        ratio(times, "piggyback", "finetune"),
        "target <= 1.10",
        f"{med_ms(times, 'piggyback'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms; "
        f"{shape}; optimizers as in conf/method: {opt['piggyback']} on masks+head vs "
        f"{opt['finetune']} on all weights",
    )
    emit(
        "classifier_only_step / finetune_step",
        ratio(times, "classifier_only", "finetune"),
        "info: lower bound, no backward through the backbone",
        f"{med_ms(times, 'classifier_only'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
    )
    if fused:
        emit(
            "piggyback_step[fused] / finetune_step[fused]",
            ratio(times, "piggyback[fused]", "finetune[fused]"),
            "target <= 1.10; both optimizers with fused=True",
            f"{med_ms(times, 'piggyback[fused]'):.1f} ms vs "
            f"{med_ms(times, 'finetune[fused]'):.1f} ms",
        )
        emit(
            "piggyback_step[fused Adam] / finetune_step",
            ratio(times, "piggyback[fused]", "finetune"),
            "info: only piggyback's Adam fused, finetune as configured",
            f"{med_ms(times, 'piggyback[fused]'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
        )
    emit(
        "piggyback_lean_step / finetune_step",
        ratio(times, "piggyback_lean", "finetune"),
        "info: method=piggyback_lean + model.recompute_masked_weights=true (memory, not speed)",
        f"{med_ms(times, 'piggyback_lean'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
    )
    # Where the difference goes: forward / backward / optimizer, medians of a few steps.
    split: dict[str, np.ndarray] = {}
    for key in ("piggyback", "finetune"):
        split[key] = np.median(
            [trainees[key].phases(x, y) for _ in range(max(3, args.rounds // 3))], axis=0
        )
    for i, phase in enumerate(("forward", "backward", "optimizer")):
        pb, ft = 1e3 * split["piggyback"][i], 1e3 * split["finetune"][i]
        emit(
            f"piggyback_{phase} / finetune_{phase}",
            pb / ft,
            "info: where the step time goes",
            f"{pb:.1f} ms vs {ft:.1f} ms",
        )
    # The floor: what Piggyback adds to a fine-tuning step if it cost exactly its arithmetic,
    # i.e. the W * M pass, the dL/dW_eff * W pass and Adam's extra optimizer work.
    passes = statistics.median(mask_passes(trainees["piggyback"], max(3, args.rounds // 3)))
    optimizer_extra = split["piggyback"][2] - split["finetune"][2]
    finetune_s = statistics.median(times["finetune"])
    emit(
        "piggyback_step_floor",
        (finetune_s + passes + optimizer_extra) / finetune_s,
        "info: finetune_step + the mask's elementwise passes + Adam's extra, over finetune_step",
        f"mask passes {1e3 * passes:.1f} ms, optimizer extra {1e3 * optimizer_extra:.1f} ms, "
        f"finetune step {1e3 * finetune_s:.1f} ms",
    )
    images_per_s = args.batch / statistics.median(times["piggyback"])
    emit(
        "piggyback_train_images_per_s / finetune_train_images_per_s",
        ratio(times, "finetune", "piggyback"),
        "info",
        f"{images_per_s:.1f} img/s vs "
        f"{args.batch / statistics.median(times['finetune']):.1f} img/s",
    )
    if args.device.type == "cuda":
        bench_peak_fraction(args, trainees["piggyback"], x, y, images_per_s)


def bench_peak_fraction(
    args: argparse.Namespace, trainee: Trainee, x: torch.Tensor, y: torch.Tensor, img_s: float
) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainee.forward(x, y).backward()
    trainee.optimizer.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops() / args.batch
    name = torch.cuda.get_device_name(args.device)
    peak = 1e12 * args.peak_tflops if args.peak_tflops else None
    peak = peak or next((v for k, v in BF16_PEAK.items() if k in name), None)
    achieved = flops_per_image * img_s
    if peak is None:
        note(f"{name}: unknown bf16 peak, pass --peak-tflops; achieved {achieved / 1e12:.1f} TF/s")
        return
    emit(
        "piggyback_train_flops / bf16_peak",
        achieved / peak,
        "info: model FLOP utilisation",
        f"{img_s:.0f} img/s x {flops_per_image / 1e9:.1f} GFLOP/img = "
        f"{achieved / 1e12:.0f} TFLOP/s vs {peak / 1e12:.0f} TFLOP/s ({name})",
    )


# --------------------------------------------------------------------------- inference
def bench_inference(args: argparse.Namespace) -> None:
    import torchvision

    from piggyback.nn.convert import mask_model, materialize

    torch.manual_seed(0)
    plain = torchvision.models.get_model(args.arch, weights=None, num_classes=args.num_classes)
    masked = mask_model(copy.deepcopy(plain), exclude=["fc", "classifier*"])
    zeros = set_realistic_masks(masked, args.zeros, seed=1)
    task = materialize(masked)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {
        "plain": plain,
        "materialized": task,
        "masked": masked,
    }
    for model in models.values():
        model.to(args.device, memory_format=memory_format).eval()
    x, _ = batch(args, n=args.infer_batch)
    autocast = (
        torch.autocast(args.device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else nullcontext()
    )
    with torch.inference_mode(), autocast:
        same = torch.equal(task(x), masked(x))
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        times = interleaved(fns, args.rounds * 2, args.warmup, args.device)
    emit(
        "materialized_inference / plain_inference",
        ratio(times, "materialized", "plain"),
        "target <= 1.03",
        f"{med_ms(times, 'materialized'):.2f} ms vs {med_ms(times, 'plain'):.2f} ms; "
        f"{args.arch}, batch {args.infer_batch} at {args.size} px, {100 * zeros:.1f}% zeros; "
        f"outputs equal to the masked model: {same}",
    )
    emit(
        "masked_inference / plain_inference",
        ratio(times, "masked", "plain"),
        "info: W*M recomputed every call, why to materialize",
        f"{med_ms(times, 'masked'):.2f} ms vs {med_ms(times, 'plain'):.2f} ms",
    )


# -------------------------------------------------------------- task switch + artifacts
def bench_switch_and_artifacts(args: argparse.Namespace) -> None:
    from piggyback.formats import load_artifact, save_artifact
    from piggyback.methods import apply_artifact
    from piggyback.models.module import PiggybackModule
    from piggyback.nn.convert import get_masks

    device = torch.device("cpu") if args.switch_device == "cpu" else args.device
    torch.manual_seed(0)
    module = PiggybackModule(
        backbone={"name": "resnet50", "weights": None},
        task="a",
        num_classes=200,
        scheduler={},
        log_layer_sparsity=False,
    ).eval()
    zeros = set_realistic_masks(module.backbone, args.zeros, seed=1)
    module.add_task("b", 196)
    set_realistic_masks(module.backbone, args.zeros, seed=2)
    module.commit_task()
    module.to(device)
    n_weights = sum(m.numel() for m in get_masks(module.backbone).values())

    artifacts = {enc: module.export_task("a", encoding=enc) for enc in ("bits", "rice")}
    expected = {k: v.cpu() for k, v in get_masks(module.backbone).items()}
    order = iter(("b", "a") * (args.switches + 2))
    times = interleaved(
        {"set_task": lambda: module.set_task(next(order))}, args.switches, 1, device
    )
    # apply_artifact bypasses the module's task bookkeeping: time it after set_task.
    applies = {
        f"apply_artifact[{enc}]": lambda art=art: apply_artifact(
            module.backbone,
            art,
            backbone_fingerprint=module.backbone_fingerprint,
            pretrained_bn=module.pretrained_bn,
        )
        for enc, art in artifacts.items()
    }
    times.update(interleaved(applies, args.switches, 1, device))
    for key, detail in (
        ("set_task", "PiggybackModule.set_task: re-packs the outgoing task, unpacks the new one"),
        ("apply_artifact[bits]", "unpack 1-bit masks + load, precomputed fingerprint"),
        (
            "apply_artifact[rice]",
            "rice masks decoded on their first use, then read as 1-bit packing + load",
        ),
    ):
        emit(
            f"resnet50_switch[{key}] / 100ms",
            statistics.median(times[key]) / SWITCH_BUDGET_S,
            "target <= 1.00",
            f"{med_ms(times, key):.1f} ms on {device.type}; {n_weights / 1e6:.1f}M masked "
            f"weights; {detail}",
        )

    # The first switch to a rice task decodes it (a fresh artifact each round, not cached).
    first = []
    for _ in range(max(1, args.switches // 2)):
        fresh = module.export_task("a", encoding="rice")
        start = time.perf_counter()
        apply_artifact(
            module.backbone,
            fresh,
            backbone_fingerprint=module.backbone_fingerprint,
            pretrained_bn=module.pretrained_bn,
        )
        first.append(time.perf_counter() - start)
    emit(
        "resnet50_first_switch[apply_artifact[rice]] / 100ms",
        statistics.median(first) / SWITCH_BUDGET_S,
        "target: once per task and process",
        f"{1e3 * statistics.median(first):.1f} ms on {device.type}; decodes the rice masks",
    )

    # Artifact size: ResNet-50 task "a", realistic mask, raw 1-bit vs rice, files on disk.
    with tempfile.TemporaryDirectory() as tmp:
        sizes, lossless = {}, True
        for enc, art in artifacts.items():
            path = save_artifact(art, Path(tmp) / f"a_{enc}.safetensors")
            sizes[enc] = os.path.getsize(path)
            decoded = load_artifact(path).unpacked_masks()
            lossless &= all(torch.equal(decoded[n], expected[n]) for n in expected)
    raw, rice = artifacts["bits"], artifacts["rice"]
    emit(
        "raw_mask_bits / masked_weight",
        raw.bits_per_masked_weight(),
        "target <= 1.00",
        f"{mib(raw.mask_bytes())} masks for {n_weights / 1e6:.1f}M weights, "
        f"{100 * zeros:.1f}% zeros clustered by layer and filter; file {mib(sizes['bits'])}",
    )
    emit(
        "rice_mask_bits / masked_weight",
        rice.bits_per_masked_weight(),
        "target <= 0.50 at >= 90% ones",
        f"{mib(rice.mask_bytes())} masks; file {mib(sizes['rice'])} vs {mib(sizes['bits'])} raw "
        f"(head included); lossless after save/load: {lossless}",
    )


# ------------------------------------------------------------------------------ memory
def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return hwm, rss


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process so that one method's freed pages cannot hide another's."""
    trainee = Trainee(args.memory_child, args)
    x, y = batch(args)
    module = trainee.module
    static = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if args.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.memory_steps):
            trainee.step(x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        how = "torch.cuda.max_memory_allocated over the steps (params, state, activations)"
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: RSS = live memory
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        _, base = _rss_kib()
        for _ in range(args.memory_steps):
            trainee.step(x, y)
        hwm, _ = _rss_kib()
        peak = static + 1024 * (hwm - base)
        how = "param+buffer bytes + peak RSS growth over the steps"
    print(json.dumps({"peak": peak, "static": static, "how": how}))


LEAN_ARGV = ("--optimizer", "lean", "--recompute", "--step-in-backward")
"""method=piggyback_lean (LeanAdam stepped in backward) + model.recompute_masked_weights"""
MEMORY_VARIANTS = {
    "piggyback": ("piggyback", ()),
    # method=piggyback_lean with model.recompute_masked_weights=true
    "piggyback_lean": ("piggyback", LEAN_ARGV),
    "piggyback_lean[factored]": ("piggyback", (*LEAN_ARGV, "--optimizer", "lean_factored")),
    "finetune": ("finetune", ()),
}


MEMORY_LINES = {
    "piggyback": (
        "info: the paper's Adam",
        "mask, its gradient and 2 Adam moments are weight-sized",
    ),
    "piggyback_lean": (
        "<= 1.10 at 224 px, <= 1.15 at 96 px",
        "method=piggyback_lean (LeanAdam, bf16 moments, stepped in backward) "
        "+ model.recompute_masked_weights=true",
    ),
    "piggyback_lean[factored]": (
        "info: not Adam-like on masks",
        "piggyback_lean + method.optimizer.optimizer.second_moment=factored",
    ),
}
"""Each memory variant but finetune: its line's target and what it runs."""


MMAP_THRESHOLD = 1 << 20


def bench_memory(args: argparse.Namespace) -> None:
    """Peak training memory of the paper's Piggyback and of its lean setting, over
    fine-tuning's, each measured in a fresh process."""
    if args.device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        note("peak memory: needs Linux /proc/self/clear_refs on CPU; skipped")
        return
    # A fixed mmap threshold turns off glibc's dynamic one, which after the first freed
    # weight-sized tensor serves later ones from the heap, whose freed holes stay resident:
    # every tensor above 1 MiB is then its own mapping, unmapped when freed, so the peak RSS
    # follows live tensors instead of the heap's fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    result = {}
    for variant, (method, extra) in MEMORY_VARIANTS.items():
        cmd = [sys.executable, __file__, "--memory-child", method, *args.child_argv, *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            note(f"peak memory child for {variant} failed: {out.stderr.strip()[-500:]}")
            return
        result[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    ft = result["finetune"]
    where = f"{args.memory_steps} steps, {args.arch}, batch {args.batch} at {args.size} px"
    for variant, (target, what) in MEMORY_LINES.items():
        peak = result[variant]["peak"]
        emit(
            f"{variant}_peak_memory / finetune_peak_memory",
            peak / ft["peak"],
            target,
            f"{mib(peak)} vs {mib(ft['peak'])}; {what}; {result[variant]['how']}; {where}",
        )


# ------------------------------------------------------------------------- torch.compile
COMPILED = ("piggyback", "finetune")


def count_saved_bools_as_float() -> None:
    """Diagnostic only (``--bool-saves-as-float``): AOTAutograd's min-cut partitioner weighs a
    saved bool tensor at 4 bytes per element instead of 1.

    The partitioner prefers saving a ReLU's bool mask ``y <= 0`` (1 byte) to saving ``y``
    (4 bytes). Inductor's CPU code stores bool vectors through a generic conversion: the
    stem's 2.4 M-value mask adds about 25 ms to a kernel that takes under 1 ms without it
    (``benchmarks/inductor_bool_store.py``; ResNet-18's stem at batch 16, 96 px: a 45 ms
    kernel that is 14 ms without the bool), so on CPU the cheaper-to-keep mask costs time.
    This patches a private torch function in the benchmark's child process only; the
    package never does.
    """
    import torch._functorch.partitioners as partitioners

    nbytes = getattr(partitioners, "_tensor_nbytes", None)
    if nbytes is None:
        sys.exit(
            "--bool-saves-as-float: torch._functorch.partitioners._tensor_nbytes is gone in "
            f"torch {torch.__version__}; the diagnostic needs updating"
        )

    def as_float(numel: int, dtype: torch.dtype) -> int:
        return nbytes(numel, torch.float32 if dtype == torch.bool else dtype)

    partitioners._tensor_nbytes = as_float


def compile_child(args: argparse.Namespace) -> None:
    """Eager and compiled training steps of both methods, in one fresh process whose
    Inductor cache is empty (set by :func:`bench_compile`), so compile times are real."""
    from piggyback.nn import threshold

    if args.bool_saves_as_float:
        count_saved_bools_as_float()
    if args.compile_mask == "function":  # what the compiler would see without the STE ops
        threshold.traceable_masked_weight = lambda w, m, t, k, r: threshold._MaskedWeight.apply(
            w, m, t, k, r, False
        )
    x, y = batch(args)
    trainees, compile_s, losses = {}, {}, {}
    for method in COMPILED:
        trainees[method] = Trainee(method, args)
        trainees[f"compiled {method}"] = Trainee(method, args, compiled=True)
        losses[method] = float(trainees[method].forward(x, y))
        start = time.perf_counter()
        losses[f"compiled {method}"] = float(trainees[f"compiled {method}"].step(x, y))
        compile_s[method] = time.perf_counter() - start  # the first call compiles fwd + bwd
    fns = {k: (lambda t=t: t.step(x, y)) for k, t in trainees.items()}
    times = interleaved(fns, args.rounds, args.warmup, args.device)
    print(json.dumps({"times": times, "compile_s": compile_s, "losses": losses}))


def bench_compile(args: argparse.Namespace) -> None:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # no graph from an earlier run is reused
        cmd = [sys.executable, __file__, "--compile-child", *args.child_argv]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        note(f"compile child failed: {out.stderr.strip()[-1500:]}")
        return
    result = json.loads(out.stdout.strip().splitlines()[-1])
    times, compile_s, losses = result["times"], result["compile_s"], result["losses"]
    shape = f"{args.arch}, batch {args.batch} at {args.size} px, {args.precision}"
    equal = all(
        abs(losses[f"compiled {m}"] - losses[m]) <= 1e-4 * max(1.0, abs(losses[m]))
        for m in COMPILED
    )
    emit(
        "compiled_piggyback_step / compiled_finetune_step",
        ratio(times, "compiled piggyback", "compiled finetune"),
        "target <= 1.05",
        f"{med_ms(times, 'compiled piggyback'):.1f} ms vs "
        f"{med_ms(times, 'compiled finetune'):.1f} ms; {shape}; torch.compile of the "
        f"LightningModule (model.compile=true), optimizer eager; first-step losses equal to "
        f"eager: {equal}; mask op: {args.compile_mask}; options: {args.compile_options or {}}"
        + ("; saved bools weighed as float (diagnostic)" if args.bool_saves_as_float else ""),
    )
    ft_compile = compile_s["finetune"] - statistics.median(times["compiled finetune"])
    pb_compile = compile_s["piggyback"] - statistics.median(times["compiled piggyback"])
    emit(
        "piggyback_compile_time / finetune_compile_time",
        pb_compile / ft_compile,
        "target <= 1.50",
        f"{pb_compile:.1f} s vs {ft_compile:.1f} s: first compiled step less a compiled step, "
        "empty Inductor cache",
    )
    for method in COMPILED:
        emit(
            f"compiled_{method}_step / {method}_step",
            ratio(times, f"compiled {method}", method),
            "info: what compiling buys on this device",
            f"{med_ms(times, f'compiled {method}'):.1f} ms vs {med_ms(times, method):.1f} ms",
        )
    emit(
        "piggyback_step / finetune_step (eager, same run)",
        ratio(times, "piggyback", "finetune"),
        "info: the eager ratio measured alongside",
        f"{med_ms(times, 'piggyback'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
    )


# ------------------------------------------------------------------------------ loader
def bench_loader(args: argparse.Namespace) -> None:
    from loader_throughput import write_dataset

    from piggyback.data import FineGrainedDataModule

    classes = 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        write_dataset(root, args.loader_images, classes)
        dm = FineGrainedDataModule(
            "bench",
            classes,
            root.parent,
            root.name,
            val_fraction=0.0,
            batch_size=args.loader_batch,
            num_workers=args.loader_workers,
            pin_memory=args.device.type == "cuda",
            persistent_workers=args.loader_workers > 0,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        rates = []
        for _ in range(2):  # the first pass includes worker start-up
            start, n = time.perf_counter(), 0
            for xb, _ in loader:
                n += xb.shape[0]
            rates.append(n / (time.perf_counter() - start))
        loader_rate = rates[-1]
        del loader, dm
    model_args = copy.copy(args)
    model_args.batch = args.loader_model_batch
    trainee = Trainee("piggyback", model_args)
    x, y = batch(model_args, size=224)
    times = interleaved(
        {"step": lambda: trainee.step(x, y)}, args.loader_model_rounds, 1, args.device
    )
    model_rate = model_args.batch / statistics.median(times["step"])
    emit(
        "loader_images_per_s / model_images_per_s",
        loader_rate / model_rate,
        "target >= 1.0: the loader keeps the model busy",
        f"{loader_rate:.1f} img/s vs {model_rate:.1f} img/s; loader: {args.loader_workers} "
        f"workers, JPEG ~500x375 -> resize 256, random-resized crop 224, flip; model: "
        f"piggyback {args.arch} train step at 224 px, batch {model_args.batch}, {args.precision}",
    )


# -------------------------------------------------------------------------------- main
def bench_faults(args: argparse.Namespace) -> None:
    """Issue 18's costs: the per-step finiteness check, and the atomic checkpoint writer
    (temp file in the checkpoint's folder + fsync + rename) against Lightning's own."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from piggyback.training.finite_loss import FiniteLossCheck
    from piggyback.utils.checkpoint_io import AtomicCheckpointIO

    x, y = batch(args)
    trainee = Trainee("piggyback", args)
    stub = SimpleNamespace(current_epoch=0, optimizers=[trainee.optimizer])
    check = FiniteLossCheck("bench")

    def checked() -> None:
        check.on_train_batch_end(stub, None, {"loss": trainee.step(x, y)}, None, 0)

    times = interleaved(
        {"plain": lambda: trainee.step(x, y), "checked": checked},
        args.rounds,
        args.warmup,
        args.device,
    )
    emit(
        "step_with_finite_loss_check / step",
        ratio(times, "checked", "plain"),
        "target: within noise (~1.00)",
        f"{med_ms(times, 'checked'):.1f} ms vs {med_ms(times, 'plain'):.1f} ms; piggyback, "
        f"{args.arch}, batch {args.batch} at {args.size} px",
    )
    step_ms = med_ms(times, "plain")
    checkpoint = {
        "state_dict": trainee.module.state_dict(),
        "optimizer_states": [trainee.optimizer.state_dict()],
        "epoch": 0,
    }
    with tempfile.TemporaryDirectory(dir=args.ckpt_dir) as d:
        folder = Path(d)
        writers = {"lightning": TorchCheckpointIO(), "atomic": AtomicCheckpointIO(folder)}
        saves = {
            k: (lambda w=w, k=k: w.save_checkpoint(checkpoint, folder / f"{k}.ckpt"))
            for k, w in writers.items()
        }
        times = interleaved(saves, max(3, args.rounds // 3), 1, args.device)
        size = (folder / "atomic.ckpt").stat().st_size
    emit(
        "atomic_checkpoint_save / lightning_checkpoint_save",
        ratio(times, "atomic", "lightning"),
        "info: once per epoch; fsync makes it durable",
        f"{med_ms(times, 'atomic'):.1f} ms vs {med_ms(times, 'lightning'):.1f} ms for "
        f"{mib(size)} in {folder.parent}; the difference is "
        f"{(med_ms(times, 'atomic') - med_ms(times, 'lightning')) / step_ms:.2f} training "
        "steps per epoch",
    )


def _compile_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value where it parses (false, 3, "x"), else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        sys.exit(f"--compile-option {text!r}: expected KEY=VALUE, e.g. layout_optimization=false")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="short smoke run (< 1 min on CPU)")
    p.add_argument("--arch", help="default: resnet18 on cpu, resnet50 on cuda")
    p.add_argument("--batch", type=int, help="training batch; default 16 cpu / 64 cuda")
    p.add_argument("--size", type=int, help="input px; default 96 cpu / 224 cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default fp32 cpu / bf16 cuda")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, help="intra-op threads; default 1 on cpu")
    p.add_argument("--rounds", type=int, help="timed rounds per variant")
    p.add_argument("--zeros", type=float, default=0.07, help="mask zero fraction")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak of the GPU, if not known")
    p.add_argument(
        "--only",
        nargs="+",
        choices=("train", "compile", "inference", "switch", "memory", "loader", "faults"),
        help="run only these sections",
    )
    p.add_argument("--ckpt-dir", help="where the faults section writes checkpoints (a temp dir)")
    p.add_argument(
        "--compile-mask",
        choices=("ste", "function"),
        default="ste",
        help="what torch.compile traces for W*M: the plain-op straight-through form "
        "(default, what the package does) or the eager autograd Function (for comparison)",
    )
    p.add_argument(
        "--compile-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor option for the compiled variants, as model.compile_options "
        "(e.g. layout_optimization=false); repeatable",
    )
    p.add_argument(
        "--bool-saves-as-float",
        action="store_true",
        help="diagnostic for the compile section: the partitioner weighs saved bool tensors "
        "as float, so it keeps ReLU outputs instead of their bool masks (whose stores are "
        "slow in Inductor's CPU code); patches a private torch function in the child only",
    )
    p.add_argument(
        "--step-in-backward",
        action="store_true",
        help="piggyback's optimizer wrapped in piggyback.optim.StepInBackward",
    )
    p.add_argument(
        "--optimizer",
        choices=("adam", "lean", "lean_factored"),
        default="adam",
        help="piggyback's optimizer: the paper's Adam, method=piggyback_lean's LeanAdam (bf16 "
        "moments), or that LeanAdam with a factored second moment",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="model.recompute_masked_weights=true: W*M rebuilt in backward, not saved",
    )
    p.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--memory-child" in child_argv:
        i = child_argv.index("--memory-child")
        del child_argv[i : i + 2]
    if "--compile-child" in child_argv:
        child_argv.remove("--compile-child")
    args.child_argv = child_argv
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(
            "--device cuda: torch.cuda.is_available() is False on this machine (no GPU or no "
            "CUDA build of torch); run with --device cpu"
        )
    args.device = torch.device(args.device)
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.batch = args.batch or (64 if cuda else (8 if args.quick else 16))
    args.size = args.size or (224 if cuda else (64 if args.quick else 96))
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.rounds = args.rounds or (3 if args.quick else (15 if not cuda else 30))
    args.compile_options = dict(_compile_option(o) for o in args.compile_option) or None
    args.warmup = 1 if args.quick else 3
    args.num_classes = 200
    args.infer_batch = args.batch
    args.switches = 4 if args.quick else 10
    args.switch_device = "cpu"
    args.memory_steps = 2 if args.quick else 3
    args.loader_images = 48 if args.quick else 256
    args.loader_batch = 16
    args.loader_workers = min(2 if not cuda else 8, os.cpu_count() or 1)
    args.loader_model_batch = (2 if args.quick else 8) if not cuda else args.batch
    args.loader_model_rounds = 2 if args.quick else 4
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    return args


@contextmanager
def section(name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    note(f"{name}: {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    if args.compile_child:
        compile_child(args)
        return
    device = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    note(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} intra-op "
        f"thread(s), {'quick' if args.quick else 'full'} run, {args.arch} {args.precision} "
        f"channels_last={args.channels_last}"
    )
    start = time.perf_counter()
    sections = {
        "train": bench_training,
        "compile": bench_compile,
        "inference": bench_inference,
        "switch": bench_switch_and_artifacts,
        "memory": bench_memory,
        "loader": bench_loader,
        "faults": bench_faults,
    }
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        with section(name):
            fn(args)
    note(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
