"""Apply's patch at model load (``SparseAtomsAdapter.calculate_weight`` through ComfyUI's
``comfy.lora.calculate_weight``): exact for every kind of weight and patch function, and with no
weight-sized temporary where ComfyUI patches its fp32 working copy (what made Apply's patch slower
than a stock LoRA's on a full-size model)."""


import pytest
import torch

import comfy.lora

import sparse_core as sc
from host_support import node_module


@pytest.fixture(scope="module")
def patching(node_classes):
    return node_module(node_classes, "patching")


def layer_for(shape, n_atoms=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=generator)
    layer = sc.build_layer(weight, n_atoms, "svd")
    layer.coefficients = torch.randn(n_atoms, generator=generator)
    return weight, layer


def patch(patching, layer, weight, strength, function=None):
    """ComfyUI's own patch loop over one Apply patch; ``function=None`` as Apply registers it."""
    entry = (strength, patching.SparseAtomsAdapter(layer), 1.0, None, function)
    return comfy.lora.calculate_weight([entry], weight, "diffusion_model.layer.weight")


def test_patching_at_load_allocates_nothing_weight_sized(patching):
    weight, layer = layer_for((64, 48))
    expected = weight + 0.7 * layer.delta()
    working = weight.clone()  # ComfyUI's fp32 working copy
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profile:
        got = patch(patching, layer, working, 0.7)
    largest = max(event.cpu_memory_usage for event in profile.events())
    assert largest < working.numel() * working.element_size() // 4, largest
    assert got is working
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


CASES = {  # name: (weight shape, stored dtype, patch function, its effect on strength * delta W)
    "linear fp32": ((24, 16), torch.float32, None, 1.0),
    "conv 3x3 fp32": ((12, 8, 3, 3), torch.float32, None, 1.0),
    "a patch function": ((24, 16), torch.float32, lambda a: 2 * a, 2.0),
    "bf16 weight": ((24, 16), torch.bfloat16, None, 1.0),
    "fp16 conv": ((12, 8, 3, 3), torch.float16, None, 1.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_patch_is_w_plus_strength_delta_w(patching, name):
    shape, dtype, function, factor = CASES[name]
    weight, layer = layer_for(shape)
    stored = weight.to(dtype)
    expected = stored.float() + factor * 0.7 * layer.delta()
    got = patch(patching, layer, stored.clone(), 0.7, function)
    assert got.dtype == dtype and got.shape == weight.shape
    # rounding to the stored dtype: of the update and of the sum
    bound = 2 * torch.finfo(dtype).eps * (stored.float().abs() + (expected - stored.float()).abs()) + 1e-6
    assert bool(((got.float() - expected).abs() <= bound).all()), name


def test_a_non_contiguous_weight_is_patched_in_place(patching):
    weight, layer = layer_for((16, 24))
    stored = weight.T.contiguous().T  # (16, 24) with column-major strides
    expected = stored + 0.5 * layer.delta()
    got = patch(patching, layer, stored, 0.5)
    assert got is stored and torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
