"""Weights stored in fp16, bf16 and fp8 (e4m3fn), as UNETLoader's weight_dtype and fp8 checkpoints
give them: training, Apply and the LoRA export work on the real model-patcher for each."""

import pytest
import torch

import comfy.model_management as mm
import comfy.model_patcher
import nodes as comfy_nodes

import tiny_models
from host_support import node_module, run_node
from test_nodes import applied_weights, build, patched_weights, train

# (stored weight dtype, compute dtype ComfyUI casts to; None = compute in the weight's dtype)
DTYPES = {
    "fp16": (torch.float16, torch.float32),
    "bf16": (torch.bfloat16, None),
    "fp8_e4m3fn": (torch.float8_e4m3fn, torch.float32),
}
# Relative spacing of representable numbers: what rounding the patched weight can cost.
RESOLUTION = {"fp16": 2**-10, "bf16": 2**-7, "fp8_e4m3fn": 2**-3}


def tiny_sd15(weight_dtype, compute_dtype):
    """Tiny SD1.5 with the random weights of ``tiny_models.build("sd15")``, stored in
    ``weight_dtype`` (as UNETLoader's weight_dtype or an fp8 checkpoint would give them)."""
    reference = tiny_models.build("sd15").model.state_dict()
    config_class, unet_config = tiny_models.CONFIGS["sd15"]
    config = config_class(dict(unet_config))
    config.unet_config.update(num_heads=2, num_head_channels=-1)
    config.set_inference_dtype(weight_dtype, compute_dtype)
    model = config.get_model({})
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(reference[name].to(parameter.dtype))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@pytest.mark.parametrize("name", list(DTYPES))
def test_train_apply_export_with_low_precision_weights(node_classes, comfy_dirs, name):
    weight_dtype, compute_dtype = DTYPES[name]
    model = tiny_sd15(weight_dtype, compute_dtype)
    keys_dtype = {p.dtype for p in model.model.diffusion_model.parameters() if p.ndim >= 2}
    assert keys_dtype == {weight_dtype}

    atoms = build(node_classes, model, preset="cross-attention k/v")
    baseline = train(node_classes, "sd15", model, atoms, steps=30, lr=1e-9)[1]
    trained_model, trained, _, _ = train(node_classes, "sd15", model, atoms, steps=30, lr=3e-2)
    assert trained.info.training["stopped"] is None, trained.info.training["stopped"]
    assert trained.n_active > 0
    losses, base_losses = trained.info.training["losses"], baseline.info.training["losses"]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.9 * sum(base_losses[-10:]), (name, losses[-10:], base_losses[-10:])
    for layer in trained.layers.values():  # the atoms themselves stay fp32 whatever the weights
        assert layer.coefficients.dtype == torch.float32 and bool(torch.isfinite(layer.atoms).all())

    keys, base, got = applied_weights(node_classes, model, trained, 1.0)
    for key in trained:
        weight = got[f"{key}.weight"]
        assert weight.dtype == weight_dtype, (key, weight.dtype)
        expected = base[f"{key}.weight"].float() + trained.delta(key)
        error = (weight.float() - expected).abs()
        # each element is the exact sum rounded to the stored dtype (fp8: stochastic rounding,
        # subnormals below the smallest normal number are spaced evenly)
        tiny = torch.finfo(weight_dtype).smallest_normal
        bound = 2 * RESOLUTION[name] * (expected.abs() + tiny)
        assert bool((error <= bound).all()), (name, key, float((error - bound).max()))
        change = (weight.float() - base[f"{key}.weight"].float()).norm()
        assert change > 0.5 * trained.delta(key).norm(), (name, key)  # the patch is really there

    run_node(node_classes["SparseAtoms_ToLoRA"], sparse_atoms=trained, filename=f"dtype_{name}",
             format="lora", dtype="fp32", overwrite=True)
    with torch.inference_mode():
        via_lora = patched_weights(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
            model, f"dtype_{name}.safetensors", 1.0)[0], keys)
    for key in keys:
        differ = (via_lora[key].float() != got[key].float()).float().mean()
        assert differ < 0.02, (name, key, float(differ))  # the same rounding of the same sum



@pytest.mark.parametrize("target", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_weight_wrapper_follows_its_module_to_a_device(node_classes, target):
    """ComfyUI moves weight functions with their module (``move_to``): the atoms go along, as the
    same tensor objects (an optimizer holding them keeps working), and report their bytes."""
    import sparse_core as sc

    patching = node_module(node_classes, "patching")
    layer = sc.build_layer(torch.randn(6, 5), 3, "svd")
    layer.coefficients.requires_grad_(True)
    wrapper = patching.AtomsWeightWrapper(layer)
    coefficients = layer.coefficients
    held = wrapper.move_to(device=torch.device(target))
    assert layer.coefficients is coefficients and coefficients.requires_grad
    assert {t.device.type for t in (layer.atoms, layer.readouts, layer.coefficients, layer.index)} == {target}
    assert held == sum(t.numel() * t.element_size() for t in
                       (layer.atoms, layer.readouts, layer.coefficients, layer.index))
    weight = torch.zeros(6, 5, device=target)
    assert torch.allclose(wrapper(weight), layer.delta(target))
