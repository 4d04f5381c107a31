"""Where a diffusion transformer's own code trips training, on tiny instances of ComfyUI's classes:
plain inference-mode parameters (SD3.5's RMSNorm, Flux's QKNorm), PixArt's smallest size,
v-prediction's loss scale (HunyuanDiT, SD2), and checkpointing a model that works in place (Flux)."""

import math

import pytest
import torch

import comfy.model_sampling as ms
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

import tiny_models
from host_support import node_module
from test_nodes import build, train


@pytest.mark.parametrize("arch, overrides", [("sd3", {"qk_norm": "rms"}), ("flux", {})],
                         ids=["sd3.5", "flux"])
def test_trains_a_model_loaded_in_inference_mode_in_its_own_dtype(node_classes, arch, overrides):
    """As a loader inside a graph gives it: every tensor an inference tensor, stored in the
    training dtype (fp32 here), so ``cast_to`` hands the norm scales through as they are."""
    with torch.inference_mode():
        model = tiny_models.build(arch, **overrides)
    plain = {name: p for name, p in model.model.diffusion_model.named_parameters()
             if name.endswith(("ln_q.weight", "ln_k.weight", "query_norm.scale", "key_norm.scale"))}
    assert plain and all(p.is_inference() for p in plain.values()), sorted(plain)
    before = {name: p.clone() for name, p in plain.items()}
    atoms = build(node_classes, model)
    trained = train(node_classes, arch, model, atoms, steps=12)[1]
    assert trained.info.training["stopped"] is None, trained.info.training["stopped"]
    assert trained.n_active > 0 and trained.info.training["steps_done"] == 12
    after = dict(model.model.diffusion_model.named_parameters())
    for name, parameter in plain.items():  # the model's own tensors are back, unchanged
        assert after[name] is parameter and torch.equal(parameter, before[name]), name


def test_pixart_below_its_smallest_size_is_refused_by_name(node_classes):
    model = tiny_models.build("pixart")
    atoms = build(node_classes, model, preset="cross-attention k/v")
    diffusion = model.model.diffusion_model
    t, context = torch.zeros(1), torch.randn(1, 8, 64)
    with torch.no_grad():  # ComfyUI's own forward: mean side 32 divides by zero, odd sides mismatch
        with pytest.raises(ZeroDivisionError):
            diffusion(torch.randn(1, 4, 32, 32), t, context)
        with pytest.raises(RuntimeError, match="must match the size"):
            diffusion(torch.randn(1, 4, 33, 33), t, context)
        assert diffusion(torch.randn(1, 4, 34, 34), t, context).shape[-2:] == (34, 34)
        assert diffusion(torch.randn(1, 4, 30, 36), t, context).shape[-2:] == (30, 36)
    refused = {32: r"its mean side must be at least 33 latent pixels \(the smallest square it "
                   r"runs is 272x272 px\)",
               33: r"its sides must be multiples of 2 latent pixels \(16 px\)"}
    for size, problem in refused.items():
        with pytest.raises(ValueError, match=rf"Train Sparse Concept: latents is {size}x{size} "
                                             rf"latent pixels \({8 * size}x{8 * size} px\), which "
                                             rf"this PixArtSigma model cannot run: {problem}"):
            train(node_classes, "pixart", model, atoms, steps=2,
                  latents=tiny_models.latents("pixart", size=size))
    trained = train(node_classes, "pixart", model, atoms, steps=2,
                    latents=tiny_models.latents("pixart", size=34))[1]
    assert trained.info.training["steps_done"] == 2


def test_prediction_scale_is_the_slope_of_each_models_denoised_prediction(node_classes):
    scale = node_module(node_classes, "objective").prediction_scale
    sigma = torch.tensor([0.03, 1.0, 14.6])

    class V(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    expected = {Eps: sigma, Flow: sigma, V: sigma / torch.sqrt(1 + sigma ** 2)}
    for kind, slope in expected.items():
        got = scale(kind(), sigma, 4)
        assert got.shape == (3, 1, 1, 1)
        assert torch.allclose(got.flatten(), slope, rtol=1e-6), (kind.__name__, got.flatten(), slope)


def test_a_v_prediction_model_weighs_every_noise_level_alike(node_classes):
    """Divided by sigma alone, a v model's loss shrinks like 1 / (1 + sigma^2): the per-step loss
    then follows the noise levels drawn (a 200x spread on SD's schedule) and the guard stops a
    healthy run. Divided by the slope of its prediction, it stays the size of the v error."""
    base = tiny_models.build("sd15")
    model = ModelSamplingDiscrete().patch(base, "v_prediction", False)[0]
    atoms = build(node_classes, model, preset="cross-attention k/v")
    still = train(node_classes, "sd15", model, atoms, steps=40, lr=1e-9)[1].info.training["losses"]
    assert max(still) < 4 * min(still), (min(still), max(still))  # untrained: level-independent
    trained = train(node_classes, "sd15", model, atoms, steps=40, lr=1e-4)[1]
    assert trained.info.training["stopped"] is None, trained.info.training["stopped"]
    assert all(map(math.isfinite, trained.info.training["losses"]))


def test_gradient_checkpointing_trains_a_model_that_works_in_place(node_classes):
    """Flux updates activations in place, so training keeps copies of what backward needs;
    with gradient checkpointing on, the same run must give the same atoms as without."""
    model = tiny_models.build("flux")
    atoms = build(node_classes, model)
    plain = train(node_classes, "flux", model, atoms, steps=6)[1]
    checkpointed = train(node_classes, "flux", model, atoms, steps=6, gradient_checkpointing=True)[1]
    assert checkpointed.info.training["steps_done"] == 6
    for key in plain:
        assert torch.allclose(plain.delta(key), checkpointed.delta(key), atol=1e-5), key
