"""LeanAdam: Adam's update with an optional bf16 first moment and an optional factored second
moment. Adam where it should be (fp32, or rank-1 squared gradients), Adam-like steps with a
bf16 first moment, small state where it promises it, and any optimizer's checkpoint round
trip."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from piggyback.optim import LeanAdam, StepInBackward
from piggyback.optim.lean_adam import round_to_bfloat16_stochastically_


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8, 3, 3), (32, 64), (8, 4, 1, 1), (10,), (1, 5)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 1e-2) for s in shapes]


def _run(optimizer, params, steps: int, seed: int = 1, grads=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = grads(step, i, p) if grads else torch.randn(p.shape, generator=g) * 1e-3
        optimizer.step()
        optimizer.zero_grad()


def _steps_in_lr(make, init: torch.Tensor, grads, lr: float = 1e-4):
    """Each step's change of one parameter, in units of ``lr``, and where it ends."""
    p = torch.nn.Parameter(init.clone())
    opt, out = make([p]), []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append((p.detach() - before) / lr)
    return torch.stack(out), p.detach()


def test_defaults_are_adam():
    ours, ref = _params(), _params()
    _run(LeanAdam(ours, lr=1e-3), ours, steps=20)
    _run(torch.optim.Adam(ref, lr=1e-3), ref, steps=20)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_factored_equals_adam_when_squared_gradients_are_rank_one():
    """Adafactor's estimate is exact for ``g**2 = outer(r, c)``: then it is Adam."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(p.shape, generator=gen) for p in _params()]
    scale = torch.rand(30, generator=gen) + 0.5

    def grads(step, i, p):  # g = s_t * outer(a, b): g**2 is rank one at every step
        a = base[i].reshape(p.shape[0], -1)[:, :1]
        b = base[i].reshape(p.shape[0], -1)[:1, :]
        return (scale[step] * a * b).reshape(p.shape) * 1e-3

    ours, ref = _params(), _params()
    _run(LeanAdam(ours, lr=1e-3, second_moment="factored"), ours, steps=30, grads=grads)
    _run(torch.optim.Adam(ref, lr=1e-3), ref, steps=30, grads=grads)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_state_is_small():
    params = _params()
    opt = LeanAdam(params, first_moment_dtype="bfloat16", second_moment="factored")
    _run(opt, params, steps=1)
    conv, linear, pointwise, bias, row = (opt.state[p] for p in params)
    assert conv["exp_avg_sq_row"].shape == (16,) and conv["exp_avg_sq_col"].shape == (72,)
    assert linear["exp_avg_sq_row"].shape == (32,) and linear["exp_avg_sq_col"].shape == (64,)
    assert pointwise["exp_avg_sq_row"].shape == (8,) and pointwise["exp_avg_sq_col"].shape == (4,)
    assert bias["exp_avg_sq"].shape == (10,)  # one dimension: Adam's full second moment
    assert row["exp_avg_sq"].shape == (1, 5)  # a single row: nothing to factor
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    full = LeanAdam(params, first_moment_dtype="bfloat16")
    _run(full, params, steps=1)
    assert all(full.state[p]["exp_avg_sq"].shape == p.shape for p in params)
    half = LeanAdam(params, first_moment_dtype="bfloat16", second_moment_dtype="bfloat16")
    _run(half, params, steps=1)
    assert all(half.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in params)
    no_first = LeanAdam(params, betas=(0.0, 0.999))
    _run(no_first, params, steps=1)
    assert not any("exp_avg" in s for s in no_first.state.values())


def test_bf16_first_moment_steps_like_adam():
    """What the masks rely on: each step is Adam's, within bf16's rounding of the mean."""
    init = torch.full((64, 32), 1e-2)
    noise = torch.randn(20, 64, 32, generator=torch.Generator().manual_seed(0))
    noise *= torch.logspace(-9, -3, 32)  # gradients over six orders of magnitude

    adam, _ = _steps_in_lr(lambda ps: torch.optim.Adam(ps, lr=1e-4), init, noise)
    lean, _ = _steps_in_lr(
        lambda ps: LeanAdam(ps, lr=1e-4, first_moment_dtype="bfloat16"), init, noise
    )
    assert adam.abs().max() < 1.5  # Adam: about lr per step at any gradient size
    assert (lean - adam).abs().max() < 0.02  # in units of lr


def test_stochastic_rounding_to_bfloat16_is_unbiased():
    x = torch.full((100_000,), 1.001)  # nearest bfloat16: 1.0, next one up 1.0078125
    rounded = round_to_bfloat16_stochastically_(x.clone(), seed=3)
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert torch.equal(rounded, rounded.to(torch.bfloat16).float())  # bfloat16 values
    # 8192 independent draws per call (NOISE_PERIOD): std of the mean 0.0078 *
    # sqrt(0.128 * 0.872 / 8192) = 2.9e-5; nearest rounding is 1e-3 off
    assert abs(rounded.mean().item() - 1.001) < 1.5e-4
    again = round_to_bfloat16_stochastically_(x.clone(), seed=3)
    assert torch.equal(rounded, again)  # the seed fixes the noise


def test_stochastic_rounding_is_unbiased_for_every_element_over_steps():
    """Each step (seed) draws one table of noise, tiled over the tensor: every element's
    rounding must still average to its value over steps, whatever its index."""
    x = torch.full((20_000,), 1.001)  # two whole periods of the noise table and a tail
    picked = torch.tensor([0, 1, 777, 8191, 8192, 16_384, 19_999])
    total = torch.zeros(len(picked), dtype=torch.float64)
    for seed in range(2000):
        total += round_to_bfloat16_stochastically_(x.clone(), seed=seed)[picked]
    # per-element std of the mean over 2000 steps: 0.0078 * sqrt(0.128 * 0.872 / 2000)
    assert (total / 2000 - 1.001).abs().max() < 3e-4  # nearest rounding is 1e-3 off
    with pytest.raises(ValueError, match="contiguous float32"):
        round_to_bfloat16_stochastically_(torch.ones(4, 4).t(), seed=0)


def test_bf16_moments_step_like_adam_on_mask_shaped_gradients():
    """method=piggyback_lean's setting: both moments in bfloat16 (the second one
    stochastically rounded: its 0.1 % updates are below bfloat16's resolution), over 300
    steps of g = noise * W (mask gradients are dL/dW_eff * W)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=gen)
    grads = [torch.randn(64, 32, generator=gen) * weight * 1e-6 for _ in range(300)]

    init = torch.full((64, 32), 1e-2)
    torch.manual_seed(0)
    adam, adam_end = _steps_in_lr(lambda ps: torch.optim.Adam(ps, lr=1e-4), init, grads)
    lean, lean_end = _steps_in_lr(
        lambda ps: LeanAdam(
            ps, lr=1e-4, first_moment_dtype="bfloat16", second_moment_dtype="bfloat16"
        ),
        init,
        grads,
    )
    assert (lean - adam).abs().max() < 0.05  # each step, in units of lr
    assert (lean - adam).abs().sum() < 0.02 * adam.abs().sum()
    assert (lean_end - adam_end).abs().max() < 1e-4  # drift after 300 steps: < 1 lr


def test_factored_second_moment_is_not_adam_like_on_mask_shaped_gradients():
    """Why it is not the preset: g = dL/dW_eff * W is far from rank one in g**2, and the
    factored estimate then gives some weights many times Adam's step (docstring)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=gen)
    p = torch.nn.Parameter(torch.full((64, 32), 1e-2))
    opt = LeanAdam([p], lr=1e-4, second_moment="factored")
    biggest = 0.0
    for _ in range(10):
        before = p.detach().clone()
        p.grad = torch.randn(64, 32, generator=gen) * weight * 1e-6
        opt.step()
        biggest = max(biggest, float((p.detach() - before).abs().max() / 1e-4))
    assert biggest > 3.0


@pytest.mark.parametrize("second", [None, "bfloat16"])
def test_checkpoint_round_trip_continues_bit_identically(second):
    params = _params()
    kw = {"lr": 1e-3, "first_moment_dtype": torch.bfloat16, "second_moment_dtype": second}
    opt = LeanAdam(params, **kw)
    _run(opt, params, steps=3)
    saved_params = copy.deepcopy(params)
    resumed = LeanAdam(saved_params, **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, params, steps=3, seed=7)
    _run(resumed, saved_params, steps=3, seed=7)
    for a, b in zip(params, saved_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"first_moment_dtype": "int8"}, "first_moment_dtype"),
        ({"first_moment_dtype": "bfloat17"}, "first_moment_dtype"),
        ({"second_moment": "diagonal"}, "second_moment"),
        ({"second_moment_dtype": "float16"}, "second_moment_dtype"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeanAdam(_params(), **kwargs)


def test_stepped_in_backward_it_learns_the_same_masks():
    """method=piggyback_lean wraps it in StepInBackward: per tensor, so bit-identical."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    twin = copy.deepcopy(net)
    plain = LeanAdam(net.parameters(), lr=1e-2, first_moment_dtype="bfloat16")
    fused = StepInBackward(
        twin.parameters(), partial(LeanAdam, lr=1e-2, first_moment_dtype="bfloat16")
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        for model, opt in ((net, plain), (twin, fused)):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
