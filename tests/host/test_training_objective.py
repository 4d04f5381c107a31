"""Sparse Training Options on the real model-patcher: the noise levels training draws, the loss
types and min-SNR weighting against their definitions, the optimisation controls reaching the
loop, the defaults unchanged, bad options refused by name."""

import math

import pytest
import torch

import comfy.model_sampling as ms

import tiny_models
from host_support import node_module, run_node
from test_nodes import build, train


@pytest.fixture(scope="module")
def sd15(node_classes):
    model = tiny_models.build("sd15")
    return model, build(node_classes, model, preset="cross-attention k/v")


def options(node_classes, **changes):
    inputs = dict(lr_schedule="constant", warmup_steps=0, weight_decay=0.0, gradient_accumulation=1,
                  gradient_clip=0.0, timestep_sampling="uniform", timestep_shift=1.0, loss_type="MSE",
                  loss_weighting="none", min_snr_gamma=5.0)
    inputs.update(changes)
    return run_node(node_classes["SparseAtoms_TrainingOptions"], **inputs)[0]


def recorded_sigmas(node_classes, monkeypatch):
    """The sigmas of every forward made with gradients (training's, not the guard's checks)."""
    training = node_module(node_classes, "training")
    sigmas, denoise = [], training._denoise

    def recording(model_wrap, cond, x_t, sigma, *rest):
        if torch.is_grad_enabled():
            sigmas.extend(sigma.tolist())
        return denoise(model_wrap, cond, x_t, sigma, *rest)

    monkeypatch.setattr(training, "_denoise", recording)
    return sigmas


def test_the_options_node_at_its_defaults_trains_exactly_as_without_it(node_classes, sd15):
    model, atoms = sd15
    plain = train(node_classes, "sd15", model, atoms, steps=20)[1]
    wired = train(node_classes, "sd15", model, atoms, steps=20, options=options(node_classes))[1]
    assert plain.info.training["losses"] == wired.info.training["losses"]
    for key in plain:
        assert torch.equal(plain.delta(key), wired.delta(key)), key


@pytest.mark.parametrize("sampling, shift, band, expected", [
    ("uniform", 1.0, (0.25, 0.75), 0.5),
    ("logit-normal", 1.0, (0.25, 0.75), 0.727),  # P(|N(0,1)| < logit(0.75) = 1.0986)
    ("uniform", 3.0, (0.5, 1.0), 0.75),  # 3t / (1 + 2t) > 0.5 exactly when t > 0.25
])
def test_training_draws_noise_levels_from_the_chosen_distribution(node_classes, sd15, monkeypatch,
                                                                   sampling, shift, band, expected):
    model, atoms = sd15
    sigmas = recorded_sigmas(node_classes, monkeypatch)
    train(node_classes, "sd15", model, atoms, steps=60, lr=1e-9, batch_size=4,
          options=options(node_classes, timestep_sampling=sampling, timestep_shift=shift))
    sampling_ = model.get_model_object("model_sampling")
    noise = sampling_.timestep(torch.tensor(sigmas)) / 999  # t, the amount of noise in [0, 1]
    share = float(((noise >= band[0]) & (noise <= band[1])).float().mean())
    assert len(sigmas) == 240 and abs(share - expected) < 0.09, share  # sd of a share of 240: 0.03


def test_image_errors_and_min_snr_weights_follow_their_definitions(node_classes):
    objective = node_module(node_classes, "objective")
    generator = torch.Generator().manual_seed(0)
    denoised, x0 = torch.randn(3, 4, 5, 5, generator=generator) * 2, torch.randn(3, 4, 5, 5, generator=generator)
    scale = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    a, b = denoised / scale, x0 / scale
    for loss_type, criterion in (("MSE", torch.nn.MSELoss()), ("L1", torch.nn.L1Loss()),
                                 ("Huber", torch.nn.HuberLoss(delta=1.0))):
        got = objective.image_errors(denoised, x0, scale, loss_type)
        expected = torch.stack([criterion(a[i], b[i]) for i in range(3)])
        torch.testing.assert_close(got, expected)

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class V(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    gamma = 5.0
    for kind, sigma, snr, weight in (
            (Eps, torch.tensor([0.1, 0.3, 1.0, 10.0]), lambda s: 1 / s ** 2,
             lambda snr: snr.clamp_max(gamma) / snr),
            (V, torch.tensor([0.1, 0.3, 1.0, 10.0]), lambda s: 1 / s ** 2,
             lambda snr: snr.clamp_max(gamma) / (snr + 1)),
            (Flow, torch.tensor([0.05, 0.3, 0.6, 0.95]), lambda s: ((1 - s) / s) ** 2,
             lambda snr: None)):
        sampling = kind()
        expected_snr = snr(sigma)
        torch.testing.assert_close(objective.signal_to_noise(sampling, sigma, 4), expected_snr)
        scale = objective.prediction_scale(sampling, sigma, 4)
        got = objective.level_weights(sampling, sigma, scale, "min-SNR", gamma)
        expected = weight(expected_snr)
        if expected is None:  # flow: the x0-space weight min(SNR, gamma) times s(sigma)^2 = sigma^2
            expected = expected_snr.clamp_max(gamma) * sigma ** 2
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert objective.level_weights(sampling, sigma, scale, "none", gamma) is None


def test_loss_types_and_weighting_change_what_each_step_measures(node_classes, sd15):
    """Same seed and no learning (lr 1e-9): every run sees the same images, noise and levels, so
    the per-step losses obey the inequalities between the loss types (mean |e| <= sqrt(mean e^2),
    Huber <= |e| and <= e^2 / 2) and min-SNR (weights <= 1 for an eps model)."""
    model, atoms = sd15

    def losses(**changes):
        trained = train(node_classes, "sd15", model, atoms, steps=30, lr=1e-9,
                        options=options(node_classes, **changes))[1]
        assert trained.info.training["stopped"] is None
        return torch.tensor(trained.info.training["losses"])

    mse, l1, huber, weighted = losses(), losses(loss_type="L1"), losses(loss_type="Huber"), \
        losses(loss_weighting="min-SNR", min_snr_gamma=1.0)
    assert (l1 <= mse.sqrt() * 1.0001).all() and not torch.allclose(l1, mse)
    assert (huber <= l1 * 1.0001).all() and (huber <= mse / 2 * 1.0001).all()
    assert (weighted <= mse * 1.0001).all() and (weighted < 0.99 * mse).any()


def test_optimisation_controls_reach_the_loop(node_classes, sd15, monkeypatch):
    model, atoms = sd15
    sigmas = recorded_sigmas(node_classes, monkeypatch)
    chosen = options(node_classes, lr_schedule="cosine", warmup_steps=3, weight_decay=0.1,
                     gradient_accumulation=2, gradient_clip=1e-4)
    trained = train(node_classes, "sd15", model, atoms, steps=10, options=chosen)[1]
    recorded = trained.info.training
    assert recorded["steps_done"] == 10 and len(sigmas) == 10 * 2 * 2  # 2 batches of 2 per step
    assert (recorded["lr_schedule"], recorded["warmup_steps"], recorded["gradient_accumulation"],
            recorded["gradient_clip"], recorded["weight_decay"]) == ("cosine", 3, 2, 1e-4, 0.1)
    unclipped = train(node_classes, "sd15", model, atoms, steps=10, options=options(
        node_classes, lr_schedule="cosine", warmup_steps=3, weight_decay=0.1,
        gradient_accumulation=2))[1]
    assert unclipped.info.training["gradient_clip"] is None
    assert any(not torch.allclose(unclipped.delta(k), trained.delta(k)) for k in trained)


def test_bad_options_are_refused_by_name(node_classes, sd15):
    model, atoms = sd15
    with pytest.raises(ValueError, match="Sparse Training Options: timestep_shift must be a finite "
                                         "number, got nan"):
        options(node_classes, timestep_shift=math.nan)
    with pytest.raises(ValueError, match="Sparse Training Options: min_snr_gamma must be > 0"):
        options(node_classes, min_snr_gamma=0.0)
    with pytest.raises(ValueError, match=r"warmup_steps \(50\) must be fewer than steps \(20\)"):
        train(node_classes, "sd15", model, atoms, steps=20,
              options=options(node_classes, warmup_steps=50))
    with pytest.raises(ValueError, match="options must come from a Sparse Training Options node"):
        train(node_classes, "sd15", model, atoms, steps=2, options={"learning_rate": 1.0})


def test_a_held_out_validation_loss_is_measured_without_touching_training(node_classes, sd15):
    """Validation images get their loss before training and every 5 steps (fixed noise and
    levels: with no learning it does not move); the trained atoms are the same with or without."""
    model, atoms = sd15
    held_out = dict(validation_latents=tiny_models.latents("sd15", count=3, seed=11),
                    validation_conditioning=tiny_models.conditioning("sd15", seed=12))
    plain = train(node_classes, "sd15", model, atoms, steps=12)[1]
    model_out, validated, curve, _ = train(node_classes, "sd15", model, atoms, steps=12, **held_out)
    losses = validated.info.training["validation_losses"]
    assert [step for step, _ in losses] == [0, 5, 10, 12]
    assert len({v for _, v in losses}) == 4  # learning moves it (tiny random model: either way)
    assert validated.info.training["losses"] == plain.info.training["losses"]
    for key in plain:
        assert torch.equal(plain.delta(key), validated.delta(key)), key
    still = train(node_classes, "sd15", model, atoms, steps=12, lr=1e-9, **held_out)[1]
    values = [v for _, v in still.info.training["validation_losses"]]
    assert max(values) - min(values) < 1e-4 * max(values)  # fixed noise: only learning moves it
    with pytest.raises(ValueError, match="needs both validation_latents and validation_conditioning"):
        train(node_classes, "sd15", model, atoms, steps=2,
              validation_latents=held_out["validation_latents"])
