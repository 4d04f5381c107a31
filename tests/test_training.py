"""The shared training loop: the divergence guard keeps the last verified atoms, stale effects are
dropped, and the one training configuration refuses bad values by name."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import sparse_core as sc


def fitting_problem(seed=0):
    """delta W should equal a target that uses three of the atoms (loss 0.75 at the start)."""
    torch.manual_seed(seed)
    atoms = sc.build_atoms({"w": torch.randn(16, 12)}, 12, "svd")
    target = 0.5 * atoms["w"].atoms[:3].T @ atoms["w"].readouts[:3]
    return atoms, lambda step: (atoms.delta("w") - target).pow(2).sum()


def recording(atoms, loss_fn, poison=None):
    """``loss_fn`` that records the coefficients it is evaluated on (``states[i]``: the atoms
    after ``i`` updates) and multiplies the loss by ``poison(step)`` when given."""
    states = {}

    def wrapped(step):
        states[step] = atoms["w"].coefficients.detach().clone()
        value = loss_fn(step)
        return value * poison(step) if poison is not None else value

    return wrapped, states


def assert_kept_atoms_are_sound(atoms, loss_fn, result):
    for layer in atoms.layers.values():
        for tensor in (layer.atoms, layer.readouts, layer.coefficients):
            assert bool(torch.isfinite(tensor).all())
    with torch.no_grad():
        kept = float(loss_fn(0))
    assert math.isfinite(kept)
    assert result.final_loss == pytest.approx(kept, rel=1e-6)


@pytest.mark.parametrize("train_atoms", [True, False])
def test_overflowing_learning_rate_keeps_the_starting_atoms_not_the_inf_ones(train_atoms):
    """lr=1e20 makes the coefficients 1e20 after step 1 and the loss inf at step 2: the atoms
    of step 1 produced that inf, so the starting atoms are put back, and no state worked."""
    atoms, loss = fitting_problem()
    result = sc.train_atoms(atoms, loss, steps=5, lr=1e20, train_atoms=train_atoms)
    assert result.stopped.startswith("step 2: the loss became inf")
    assert "no working state was reached: the starting atoms were put back" in result.stopped
    assert result.steps_done == 0 and result.no_working_state
    assert atoms.n_active == 0
    assert_kept_atoms_are_sound(atoms, loss, result)


def test_finite_loss_explosion_stops_and_keeps_the_last_window_that_stayed_near_the_start():
    """Windows of 5 steps: the atoms of step 4 ended a good window and steps 5-7 after them
    stayed near the start, so they are kept when step 9 explodes."""
    atoms, loss = fitting_problem()
    poisoned, states = recording(atoms, loss, lambda step: 1e6 if step >= 8 else 1.0)
    result = sc.train_atoms(atoms, poisoned, steps=30, lr=0.05)
    assert "step 9: the loss exploded" in result.stopped
    assert "kept the atoms of step 4, the last whose losses stayed near the start's (loss " \
        in result.stopped and "over steps 0-7" in result.stopped and result.steps_done == 4
    assert torch.equal(atoms["w"].coefficients, states[4])
    assert result.final_loss == pytest.approx(float(loss(0)), rel=1e-6)
    assert not result.no_working_state


@pytest.mark.parametrize("offset", [0.0, -0.75, -10.0])
def test_a_loss_that_starts_at_or_below_zero_is_still_guarded(offset):
    """The loss starts at 0 or below (a shifted objective); then jumps to 1e30 at step 9."""
    atoms, loss = fitting_problem()
    start = float(loss(0))

    def shifted(step):
        value = loss(step) - start + offset  # exactly `offset` at the start
        return value + 1e30 if step >= 8 else value

    result = sc.train_atoms(atoms, shifted, steps=30, lr=0.05)
    assert result.stopped is not None and "step 9: the loss exploded to 1e+30" in result.stopped
    assert result.steps_done <= 8 and math.isfinite(result.final_loss)


@pytest.mark.parametrize("offset", [0.0, -0.75])
def test_a_loss_at_or_below_zero_that_only_improves_runs_to_the_end(offset):
    atoms, loss = fitting_problem()
    start = float(loss(0))
    result = sc.train_atoms(atoms, lambda step: loss(step) - start + offset, steps=30, lr=0.05)
    assert result.stopped is None and result.steps_done == 30


@pytest.mark.parametrize("lr, how", [(1.0, "in one step by"), (0.3, "x in total (limit")])
def test_runaway_atom_scale_stops_before_the_coefficients_explode(lr, how):
    """Tuning unit-norm atoms with a learning rate too large for them: each step grows their
    length, which renormalising moves into the coefficients, geometrically, while this loss
    (like a network's behind layer norms and softmaxes) never notices. Without the guard the
    coefficients reach 6e6 (lr 0.3, 300 steps) and 7e15 (lr 1, 100 steps)."""
    torch.manual_seed(0)
    atoms = sc.build_atoms({"w": torch.randn(64, 48)}, 8, "svd")
    target = torch.randn(64, 48)

    def scale_blind(step):  # depends on the direction of delta W only
        delta = atoms.delta("w")
        return -(delta * target).sum() / (delta.norm() + 1e-12)

    result = sc.train_atoms(atoms, scale_blind, steps=300, lr=lr)
    assert "grew its coefficient" in result.stopped and how in result.stopped
    assert f"the learning rate {lr:g} is too large for tuning the atoms" in result.stopped
    assert result.steps_done < 100 and result.no_working_state == (result.steps_done == 0)
    assert float(atoms["w"].coefficients.abs().max()) < 1e4
    assert_kept_atoms_are_sound(atoms, scale_blind, result)


def test_divergence_in_the_last_step_is_caught_by_the_final_check():
    atoms, loss = fitting_problem()
    poisoned, states = recording(atoms, loss, lambda step: float("nan") if step == 10 else 1.0)
    result = sc.train_atoms(atoms, poisoned, steps=10, lr=0.05)
    assert result.stopped.startswith("the final check: the loss became nan")
    assert result.steps_done == 9 and torch.equal(atoms["w"].coefficients, states[9])


def test_non_finite_starting_loss_is_reported_as_such():
    atoms, loss = fitting_problem()
    result = sc.train_atoms(atoms, lambda step: loss(step) * float("inf"), steps=5, lr=0.05)
    assert "the loss of the starting atoms is" in result.stopped and "check the data" in result.stopped
    assert result.steps_done == 0 and result.final_loss is None and atoms.n_active == 0


@pytest.mark.parametrize("lr, train_atoms, noisy", [
    (0.05, True, True), (0.2, True, True), (1.0, True, False), (1.0, False, True)])
def test_healthy_runs_are_not_stopped(lr, train_atoms, noisy):
    """Runs that converge keep every step: up to a learning rate of 1 (whose steps grow the
    atoms' length 2.3x, and their coefficients 11x in total), and with batch-like noise that
    spreads the loss over a factor of 30."""
    atoms, loss = fitting_problem()
    noise = torch.Generator().manual_seed(1)

    def noisy_loss(step):
        return loss(step) * math.exp(float(torch.empty(()).uniform_(-2.3, 1.1, generator=noise)))

    result = sc.train_atoms(atoms, noisy_loss if noisy else loss, steps=300, lr=lr,
                            train_atoms=train_atoms)
    assert result.stopped is None and result.steps_done == 300
    if lr < 1.0 or not noisy:  # at lr 1 through this noise, where it lands is a lottery (0.005-0.94)
        assert float(loss(0)) < 0.6 * 0.75  # learned (through the noise, if any)
    assert math.isfinite(result.final_loss)


def test_training_drops_stale_effects_but_a_run_that_changed_nothing_keeps_them():
    atoms, loss = fitting_problem()
    layer = atoms["w"]
    atoms.layers["w"] = dataclasses.replace(layer, effect=torch.linspace(1, 0, layer.n_atoms))
    atoms.info.effects = {"method": "test"}
    assert atoms.importance_kind == "effect"
    untouched = sc.train_atoms(atoms, lambda step: loss(step) * float("nan"), steps=3, lr=0.05)
    assert untouched.steps_done == 0 and atoms.importance_kind == "effect"

    held = atoms["w"]  # a caller's (or a weight wrapper's) reference to the layer
    sc.train_atoms(atoms, loss, steps=3, lr=0.05)
    assert atoms.importance_kind == "weight norm" and atoms["w"].effect is None
    assert atoms.info.effects == {}
    assert atoms["w"] is held  # the same layer object, not a stale copy


@pytest.mark.parametrize("fields, error, match", [
    (dict(steps=0), ValueError, "steps must be >= 1, got 0"),
    (dict(steps=2.5), TypeError, "steps must be an int, got float 2.5"),
    (dict(lr=float("nan")), ValueError, "lr must be > 0 and finite, got nan"),
    (dict(lr=float("inf")), ValueError, "lr must be > 0 and finite, got inf"),
    (dict(lr="0.1"), TypeError, "lr must be a number, got str"),
    (dict(l1=-1.0), ValueError, "l1 must be >= 0 and finite, got -1.0"),
    (dict(l1=float("nan")), ValueError, "l1 must be >= 0 and finite, got nan"),
    (dict(budget=0), ValueError, r"budget must be None \(no budget\) or >= 1 atom, got 0"),
    (dict(budget=2.0), TypeError, "budget must be an int"),
    (dict(train_atoms=1), TypeError, "train_atoms must be True or False"),
    (dict(batch=0), ValueError, "batch must be >= 1, got 0"),
    (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(prior_weight=float("nan")), ValueError, "prior_weight must be >= 0 and finite, got nan"),
    (dict(prior_weight=True), TypeError, "prior_weight must be a number, got bool"),
])
def test_bad_configuration_is_refused_by_name(fields, error, match):
    with pytest.raises(error, match=match):
        sc.TrainConfig(**fields)
    with pytest.raises(error, match=match):  # replace() validates too
        dataclasses.replace(sc.TrainConfig(), **fields)
    atoms, loss = fitting_problem()
    with pytest.raises(error, match=match):  # and so does the loop, before touching the atoms
        sc.train_atoms(atoms, loss, **fields)
    assert atoms.n_active == 0


def test_configuration_accepts_numpy_numbers_and_overrides():
    config = sc.TrainConfig(steps=np.int64(20), lr=np.float32(0.05), budget=np.int32(3))
    assert (config.steps, config.budget) == (20, 3) and type(config.lr) is float
    atoms, loss = fitting_problem()
    result = sc.train_atoms(atoms, loss, config, steps=40)
    assert result.steps_done == 40 and atoms.n_active <= 3


@pytest.mark.parametrize("loss_fn, error, match", [
    (lambda step: 1.0, TypeError, r"loss_fn\(0\) must return a scalar tensor or a dict of named scalar tensors, got float"),
    (lambda step: torch.ones(2, requires_grad=True), TypeError, "scalar tensor"),
    (lambda step: torch.tensor(1.0), ValueError, "without gradient"),
])
def test_bad_loss_functions_are_clear_errors(loss_fn, error, match):
    atoms, _ = fitting_problem()
    with pytest.raises(error, match=match):
        sc.train_atoms(atoms, loss_fn, steps=2, lr=0.1)
    assert not atoms["w"].coefficients.requires_grad


def test_config_must_be_a_train_config():
    atoms, loss = fitting_problem()
    with pytest.raises(TypeError, match="config must be a TrainConfig, got dict"):
        sc.train_atoms(atoms, loss, {"steps": 2})


def _loud_and_quiet_layers():
    """Two layers whose atoms have equal weight norms per unit coefficient, but the 'loud' layer's
    output is scaled down 30x before the loss: its atoms need large coefficients (large weight
    norms) for a small share of the loss, while the 'quiet' layer carries most of it."""
    generator = torch.Generator().manual_seed(0)
    weights = {key: torch.randn(16, 12, generator=generator) for key in ("loud", "quiet")}
    atoms = sc.build_atoms(weights, 6, "svd")
    x = torch.randn(12, 64, generator=generator)
    target = {}
    for key, scale in (("loud", 0.2), ("quiet", 1.0)):
        layer = atoms[key]
        s = scale * torch.tensor([1.0, 0.8, 0.6, 0.0, 0.0, 0.0])
        target[key] = (layer.atoms.T @ (s[:, None] * layer.readouts)) @ x

    def loss(step):
        return ((atoms.delta("loud") @ x / 30 - target["loud"]).pow(2).mean()
                + (atoms.delta("quiet") @ x - target["quiet"]).pow(2).mean())

    return atoms, loss


def test_taylor_budget_keeps_the_atoms_that_matter_for_the_loss():
    final = {}
    for criterion in sc.TrainConfig.__dataclass_fields__["budget_by"].default, "weight norm":
        atoms, loss = _loud_and_quiet_layers()
        result = sc.train_atoms(atoms, loss, steps=300, lr=0.05, budget=3, budget_by=criterion,
                                train_atoms=False)
        assert result.stopped is None and atoms.n_active == 3
        final[criterion] = (float(loss(0)), int((atoms["quiet"].coefficients != 0).sum()))
    assert final["weight norm"][1] == 0  # the weight norm keeps only the loud layer's atoms
    assert final["taylor"][1] >= 1
    assert final["taylor"][0] < 0.7 * final["weight norm"][0], final


def test_budget_by_is_validated():
    with pytest.raises(ValueError, match="budget_by must be one of"):
        sc.TrainConfig(budget=4, budget_by="effect")


def test_a_check_that_rises_stops_training_and_keeps_the_last_state_that_passed():
    """The check is exact (fixed data): steps 0-12 pass it, then its prior part rises 3x for
    good. Checks run every 5 steps (on the atoms of steps 4, 9, 14, ...); 4 failures in a row
    (14-29) stop a 40-step run at step 30, keeping step 9."""
    atoms, loss = fitting_problem()
    steps_seen = []

    def loss_fn(step):
        steps_seen.append(step)
        return loss(step)

    def check_fn():
        broken = steps_seen[-1] > 12
        return {"concept": loss(0).detach(), "prior": torch.tensor(3.0 if broken else 1.0)}

    states, recorded = recording(atoms, loss_fn)
    result = sc.train_atoms(atoms, states, steps=40, lr=0.05, check_fn=check_fn)
    assert "the losses rose far above the start's in 4 checks in a row (every 5 steps)" in result.stopped
    assert "prior loss 3.00x the start's at step 29" in result.stopped
    assert result.stopped.startswith("step 30: ")
    assert "kept the atoms of step 9" in result.stopped and result.steps_done == 9
    assert torch.equal(atoms["w"].coefficients, recorded[9]) and not result.no_working_state


def test_a_kept_state_whose_prior_check_rose_carries_a_warning():
    atoms, loss = fitting_problem()
    prior = iter([1.0] + [1.4] * 100)  # the start, then 1.4x: passes the check, but drifted
    result = sc.train_atoms(atoms, loss, steps=20, lr=0.05,
                            check_fn=lambda: {"concept": loss(0).detach(), "prior 1": torch.tensor(1.0),
                                              "prior 2": torch.tensor(next(prior))})
    assert result.stopped is None and result.steps_done == 20
    assert result.warnings == ["the prior-preservation loss (prior 2) of the kept atoms is 1.40x the "
                               "start's: the prior prompts may have drifted (check their samples; a "
                               "lower learning rate or a larger prior_weight keeps them)"]


def test_a_check_broken_from_the_start_keeps_nothing():
    atoms, loss = fitting_problem()
    calls = iter([1.0] + [5.0] * 100)
    result = sc.train_atoms(atoms, loss, steps=20, lr=0.05,
                            check_fn=lambda: torch.tensor(next(calls)))
    assert result.no_working_state and result.steps_done == 0 and atoms.n_active == 0
    assert "no working state was reached: the starting atoms were put back" in result.stopped


@pytest.mark.parametrize("check_fn, error, match", [
    (lambda: 1.0, TypeError, r"check_fn\(\) must return a scalar tensor or a dict"),
    (lambda: {}, ValueError, r"check_fn\(\) returned an empty dict"),
    ("no", TypeError, "check_fn must be callable"),
])
def test_bad_check_functions_are_clear_errors(check_fn, error, match):
    atoms, loss = fitting_problem()
    with pytest.raises(error, match=match):
        sc.train_atoms(atoms, loss, steps=3, lr=0.05, check_fn=check_fn)
