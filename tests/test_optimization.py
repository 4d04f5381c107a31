"""Optimisation controls of the shared training loop: learning-rate schedules with warmup (the l1
threshold follows the rate), AdamW weight decay on delta W, gradient accumulation and clipping,
each against a reference computed from stock torch parts; the defaults stay plain Adam."""

import math

import pytest
import torch

import sparse_core as sc
from test_training import fitting_problem


def still_problem(value=1.0):
    """Atoms whose loss has a zero gradient everywhere: only l1 and weight decay move ``s``."""
    torch.manual_seed(0)
    atoms = sc.build_atoms({"w": torch.randn(16, 12)}, 6, "svd")
    atoms["w"].coefficients.fill_(value)
    return atoms, lambda step: 0.0 * atoms.delta("w").sum() + 1.0  # zero gradients, not None


def reference_run(atoms, loss_fn, steps, lr, *, clip=None, l1=0.0):
    """Adam (and clip_grad_norm_) then sparse_step_, step by step, as the loop should do it."""
    params = sc.trainable_parameters(atoms)
    optimizer = torch.optim.Adam(params, lr=lr)
    norms = []
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        optimizer.step()
        sc.sparse_step_(atoms, l1_threshold=lr * l1)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return norms


@pytest.mark.parametrize("schedule", sc.LR_SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedules_follow_their_formulas_and_every_update_moves(schedule, warmup):
    steps, lr = 20, 0.1
    rates = [sc.learning_rate_at(step, steps, lr, schedule, warmup) for step in range(steps)]
    for step in range(warmup):
        assert rates[step] == pytest.approx(lr * (step + 1) / warmup)
    for step in range(warmup, steps):
        progress = (step - warmup) / (steps - warmup)
        expected = {"constant": lr, "linear": lr * (1 - progress),
                    "cosine": lr * (1 + math.cos(math.pi * progress)) / 2}[schedule]
        assert rates[step] == pytest.approx(expected)
    assert min(rates) > 0 and max(rates) == pytest.approx(lr)
    atoms, loss = fitting_problem()
    result = sc.train_atoms(atoms, loss, steps=steps, lr=lr, lr_schedule=schedule,
                            warmup_steps=warmup)
    assert result.learning_rates == pytest.approx(rates)


@pytest.mark.parametrize("schedule, warmup", [("constant", 0), ("cosine", 4), ("linear", 0)])
def test_the_l1_threshold_follows_the_learning_rate(schedule, warmup):
    atoms, loss = still_problem()
    l1, steps = 0.5, 12
    result = sc.train_atoms(atoms, loss, steps=steps, lr=0.05, l1=l1, lr_schedule=schedule,
                            warmup_steps=warmup, train_atoms=False)
    assert result.steps_done == steps
    shrunk = 1.0 - l1 * sum(result.learning_rates)  # soft-thresholding by lr_t * l1 each step
    torch.testing.assert_close(atoms["w"].coefficients, torch.full((6,), shrunk))


def test_weight_decay_shrinks_delta_w_and_leaves_the_atoms_alone():
    atoms, loss = still_problem()
    start = atoms.clone()
    lr, decay, steps = 0.05, 0.4, 10
    sc.train_atoms(atoms, loss, steps=steps, lr=lr, weight_decay=decay)
    torch.testing.assert_close(atoms["w"].coefficients, torch.full((6,), (1 - lr * decay) ** steps))
    torch.testing.assert_close(atoms["w"].atoms, start["w"].atoms)
    torch.testing.assert_close(atoms.delta("w"), (1 - lr * decay) ** steps * start.delta("w"))


@pytest.mark.parametrize("l1", [0.0, 0.3])
def test_the_defaults_are_plain_adam_bit_for_bit(l1):
    atoms, loss = fitting_problem()
    reference, reference_loss = fitting_problem()
    result = sc.train_atoms(atoms, loss, steps=15, lr=0.05, l1=l1)
    reference_run(reference, reference_loss, 15, 0.05, l1=l1)
    assert result.steps_done == 15 and result.gradient_norms == []
    for field in ("coefficients", "atoms", "readouts"):
        assert torch.equal(getattr(atoms["w"], field), getattr(reference["w"], field))


def test_gradient_clipping_is_clip_grad_norm_before_adam():
    clip = 0.05
    atoms, loss = fitting_problem()
    reference, reference_loss = fitting_problem()
    result = sc.train_atoms(atoms, loss, steps=15, lr=0.05, gradient_clip=clip)
    norms = reference_run(reference, reference_loss, 15, 0.05, clip=clip)
    torch.testing.assert_close(atoms.delta("w"), reference.delta("w"))
    assert result.gradient_norms == pytest.approx(norms) and max(norms) > clip  # it did clip
    unclipped, unclipped_loss = fitting_problem()
    sc.train_atoms(unclipped, unclipped_loss, steps=15, lr=0.05)
    assert not torch.allclose(unclipped.delta("w"), atoms.delta("w"), atol=1e-4)


def test_gradient_accumulation_averages_the_micro_batches():
    """Two half-problems accumulated equal one step on their mean, and differ from either half."""
    torch.manual_seed(0)
    weights = {"w": torch.randn(16, 12)}
    targets = [torch.randn(16, 12) * 0.1, torch.randn(16, 12) * 0.1]

    def problem():
        atoms = sc.build_atoms(weights, 12, "svd")
        calls = []

        def half(step):  # alternates between the two halves, call by call
            calls.append(step)
            return (atoms.delta("w") - targets[len(calls) % 2]).pow(2).sum()

        def mean(step):
            return sum((atoms.delta("w") - t).pow(2).sum() for t in targets) / 2

        return atoms, half, mean, calls

    accumulated, half, _, calls = problem()
    result = sc.train_atoms(accumulated, half, steps=10, lr=0.05, gradient_accumulation=2)
    whole, _, mean, _ = problem()
    expected = sc.train_atoms(whole, mean, steps=10, lr=0.05)
    torch.testing.assert_close(accumulated.delta("w"), whole.delta("w"))
    assert result.losses == pytest.approx(expected.losses)
    assert calls.count(3) == 2  # each update called the loss twice
    single, half_only, _, _ = problem()
    sc.train_atoms(single, half_only, steps=10, lr=0.05)
    assert not torch.allclose(single.delta("w"), whole.delta("w"), atol=1e-4)


@pytest.mark.parametrize("fields, error, match", [
    (dict(lr_schedule="exponential"), ValueError, "lr_schedule must be one of"),
    (dict(steps=10, warmup_steps=10), ValueError, r"warmup_steps \(10\) must be fewer than steps \(10\)"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0 and finite"),
    (dict(gradient_accumulation=0), ValueError, "gradient_accumulation must be >= 1"),
    (dict(gradient_accumulation=1.5), TypeError, "gradient_accumulation must be an int"),
    (dict(gradient_clip=0.0), ValueError, "gradient_clip must be > 0 and finite"),
    (dict(gradient_clip=float("nan")), ValueError, "gradient_clip must be > 0 and finite"),
])
def test_bad_optimisation_controls_are_refused_by_name(fields, error, match):
    with pytest.raises(error, match=match):
        sc.TrainConfig(**fields)
    atoms, loss = fitting_problem()
    with pytest.raises(error, match=match):
        sc.train_atoms(atoms, loss, **fields)
    assert atoms.n_active == 0
