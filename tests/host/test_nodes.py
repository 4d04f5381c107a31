"""Every node on tiny random-weight SD1.5, SDXL, Flux and SD3 models built from ComfyUI's classes."""

import os

import pytest
import torch

import comfy.model_management as mm
import folder_paths
import nodes as comfy_nodes

import sparse_core as sc
import tiny_models
from host_support import run_node

PRESET = "self+cross attention"


def patched_weights(patcher, keys):
    """The weights a sampler would use: load the patcher, read them, unload."""
    mm.unload_all_models()
    mm.load_models_gpu([patcher], force_full_load=True)
    state = patcher.model.state_dict()
    weights = {k: state[k].detach().clone() for k in keys}
    mm.unload_all_models()
    return weights


def applied_weights(node_classes, model, trained, strength):
    """(weight keys, the model's weights before, the weights with Apply at ``strength``)."""
    keys = [f"{k}.weight" for k in trained]
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items() if k in keys}
    applied = run_node(node_classes["SparseAtoms_Apply"], model=model, sparse_atoms=trained,
                       strength=strength, density=1.0)[0]
    return keys, base, patched_weights(applied, keys)


def build(node_classes, model, n_atoms=4, preset=PRESET, method="svd"):
    return run_node(node_classes["SparseAtoms_BuildDictionary"], model=model, preset=preset,
                    layer_regex="", atoms_per_layer=n_atoms, method=method, seed=0)[0]


def train(node_classes, arch, model, atoms, steps=40, lr=3e-2, budget=0, **extra):
    inputs = dict(model=model, latents=tiny_models.latents(arch), conditioning=tiny_models.conditioning(arch),
                  atom_dict=atoms, steps=steps, learning_rate=lr, batch_size=2, l1=0.0,
                  atom_budget=budget, tune_atoms=True, seed=0, training_dtype="fp32",
                  gradient_checkpointing=False)
    inputs.update(extra)
    return run_node(node_classes["SparseAtoms_TrainConcept"], **inputs)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_build_train_apply_export_on_real_architectures(node_classes, comfy_dirs, arch):
    model = tiny_models.build(arch)
    atoms = build(node_classes, model)
    assert len(atoms) > 0 and atoms.n_active == 0
    baseline = train(node_classes, arch, model, atoms, lr=1e-9)  # same noise, no learning
    trained_model, trained, curve, samples = train(node_classes, arch, model, atoms)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and samples.shape[0] == 0
    assert trained.n_active > 0 and baseline[1].info.training["steps_done"] == 40

    # Apply equals W + strength * delta W of the kept atoms
    keys, base, got = applied_weights(node_classes, model, trained, 0.7)
    for key in trained:
        delta = trained.delta(key)
        expected = base[f"{key}.weight"] + 0.7 * delta
        # fp32 rounding at delta W's scale: the patch accumulates the product in another order
        assert torch.allclose(got[f"{key}.weight"], expected, rtol=1e-6,
                              atol=1e-6 * float(delta.abs().max())), key
    assert all(torch.equal(model.model.state_dict()[k], base[k]) for k in keys)  # unpatched again

    # LoRA export through the stock loader gives the same weights as Apply
    for fmt in ("lora", "diff"):
        run_node(node_classes["SparseAtoms_ToLoRA"], sparse_atoms=trained, filename=f"{arch}_{fmt}",
                 format=fmt, dtype="fp32", overwrite=True)
        loader = comfy_nodes.LoraLoaderModelOnly()
        with torch.inference_mode():
            lora_model = loader.load_lora_model_only(model, f"{arch}_{fmt}.safetensors", 0.7)[0]
        via_lora = patched_weights(lora_model, keys)
        for key in keys:
            assert torch.allclose(via_lora[key], got[key], rtol=1e-5, atol=1e-6), (fmt, key)

    # save -> load -> apply is identical
    run_node(node_classes["SparseAtoms_Save"], sparse_atoms=trained, filename=f"tests/{arch}", overwrite=True)
    loaded = run_node(node_classes["SparseAtoms_Load"], atoms_name=f"tests/{arch}.safetensors")[0]
    again = patched_weights(run_node(node_classes["SparseAtoms_Apply"], model=model,
                                     sparse_atoms=loaded, strength=0.7, density=1.0)[0], keys)
    assert all(torch.equal(again[k], got[k]) for k in keys)

    # LoRA to Sparse Atoms reproduces the update and ranks atoms for pruning
    atomized = run_node(node_classes["SparseAtoms_FromLoRA"], model=model,
                        lora_name=f"{arch}_lora.safetensors")[0]
    for key in trained:
        assert torch.allclose(atomized.delta(key), trained.delta(key), atol=1e-5)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_training_lowers_the_loss(node_classes, arch):
    """Same seed, same batches, same noise: with a real learning rate the loss falls below the
    loss of the same run with (almost) none."""
    model = tiny_models.build(arch)
    atoms = build(node_classes, model)
    curves = {}
    for lr in (1e-9, 3e-2):
        trained = train(node_classes, arch, model, atoms, lr=lr)[1]
        curves[lr] = trained.info.training["losses"]
    late = slice(20, 40)
    still = sum(curves[1e-9][late]) / 20
    learned = sum(curves[3e-2][late]) / 20
    assert learned < 0.97 * still, (arch, still, learned)


def test_mask_editor_masks_and_reports(node_classes):
    model = tiny_models.build("sd15")
    trained = train(node_classes, "sd15", model, build(node_classes, model), steps=10)[1]
    output = run_node(node_classes["SparseAtoms_MaskEditor"], sparse_atoms=trained, mask="", density=0.5)
    masked, picture = output[0], output[1]
    assert masked.n_atoms == -(-trained.n_atoms // 2)
    assert picture.ndim == 4 and picture.shape[-1] == 3
    table = output.ui["atom_table"][0]
    assert table["fingerprint"] == trained.fingerprint()
    assert sum(sum(row["kept"]) for row in table["layers"]) == masked.n_atoms
    key = next(iter(trained))
    off_id = int(trained[key].index[0])
    import json
    mask = json.dumps({"version": 1, "fingerprint": trained.fingerprint(), "off": {key: [off_id]}})
    kept = run_node(node_classes["SparseAtoms_MaskEditor"], sparse_atoms=trained, mask=mask, density=1.0)[0]
    assert off_id not in kept[key].index.tolist() and kept.n_atoms == trained.n_atoms - 1


def test_budget_keeps_at_most_the_budget(node_classes):
    model = tiny_models.build("sd15")
    trained = train(node_classes, "sd15", model, build(node_classes, model), steps=20, budget=5)[1]
    assert 0 < trained.n_atoms <= 5


def test_cancel_stops_within_one_step_and_keeps_the_atoms(node_classes, comfy_dirs):
    import comfy.utils

    model = tiny_models.build("sd15")
    atoms = build(node_classes, model)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 5:
            mm.interrupt_current_processing(True)  # what the Cancel button does

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(node_classes, "sd15", model, atoms, steps=200)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == [1, 2, 3, 4, 5]
    folder = os.path.join(folder_paths.get_folder_paths("sparse_atoms")[0], "interrupted")
    newest = max((os.path.join(folder, name) for name in os.listdir(folder)), key=os.path.getmtime)
    saved = sc.load_atoms(newest)
    assert saved.keys() == atoms.keys() and saved.n_active > 0


def test_bad_inputs_are_clear_errors_and_nothing_is_written(node_classes, comfy_dirs):
    sd15, sdxl = tiny_models.build("sd15"), tiny_models.build("sdxl")
    atoms_sd15 = build(node_classes, sd15)
    trained = train(node_classes, "sd15", sd15, atoms_sd15, steps=3)[1]
    with pytest.raises(ValueError, match="do not fit this SDXL model"):
        run_node(node_classes["SparseAtoms_Apply"], model=sdxl, sparse_atoms=trained, strength=1.0, density=1.0)
    with pytest.raises(ValueError, match="do not fit this SDXL model"):
        train(node_classes, "sdxl", sdxl, atoms_sd15, steps=2)
    with pytest.raises(ValueError, match="latents must be a LATENT with at least one image, got an empty batch"):
        train(node_classes, "sd15", sd15, atoms_sd15, steps=2, latents={"samples": torch.zeros(0, 4, 16, 16)})
    two = tiny_models.conditioning("sd15") + tiny_models.conditioning("sd15", seed=1)
    with pytest.raises(ValueError, match="3 entries for 4 images"):
        train(node_classes, "sd15", sd15, atoms_sd15, steps=2, conditioning=two + two[:1])
    with pytest.raises(ValueError, match="selects no layer .*detected family 'unet: SD15'"):
        run_node(node_classes["SparseAtoms_BuildDictionary"], model=sd15, preset="custom regex",
                 layer_regex="no_such_layer$", atoms_per_layer=4, method="svd", seed=0)
    folder = folder_paths.get_folder_paths("sparse_atoms")[0]
    before = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in ("../escape", "/abs/path", "a/../../b", ".hidden", ""):
        with pytest.raises(ValueError, match="Save Sparse Atoms"):
            run_node(node_classes["SparseAtoms_Save"], sparse_atoms=trained, filename=name)
    assert (sorted(os.listdir(folder)) if os.path.isdir(folder) else []) == before
    assert not os.path.exists(os.path.join(os.path.dirname(folder), "escape.safetensors"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "corrupt.safetensors"), "wb") as stream:
        stream.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(sc.AtomsFileError, match="corrupt.safetensors"):
        run_node(node_classes["SparseAtoms_Load"], atoms_name="corrupt.safetensors")
    with pytest.raises(ValueError, match="mask was made for other atoms"):
        other = build(node_classes, sdxl)
        import json
        mask = json.dumps({"version": 1, "fingerprint": other.fingerprint(), "off": {}})
        run_node(node_classes["SparseAtoms_MaskEditor"], sparse_atoms=trained, mask=mask, density=1.0)


def test_applied_atoms_stack_with_a_lora(node_classes, comfy_dirs):
    model = tiny_models.build("sd15")
    trained = train(node_classes, "sd15", model, build(node_classes, model), steps=5)[1]
    run_node(node_classes["SparseAtoms_ToLoRA"], sparse_atoms=trained, filename="stack", format="lora",
             dtype="fp32", overwrite=True)
    with torch.inference_mode():
        with_lora = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "stack.safetensors", 1.0)[0]
    both = run_node(node_classes["SparseAtoms_Apply"], model=with_lora, sparse_atoms=trained,
                    strength=0.5, density=1.0)[0]
    keys = [f"{k}.weight" for k in trained]
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items() if k in keys}
    got = patched_weights(both, keys)
    for key in trained:
        expected = base[f"{key}.weight"] + 1.5 * trained.delta(key)
        assert torch.allclose(got[f"{key}.weight"], expected, rtol=1e-5, atol=1e-6)


def test_training_is_deterministic_for_a_fixed_seed(node_classes):
    model = tiny_models.build("sd15")
    atoms = build(node_classes, model)
    first = train(node_classes, "sd15", model, atoms, steps=8)[1]
    second = train(node_classes, "sd15", model, atoms, steps=8)[1]
    other = train(node_classes, "sd15", model, atoms, steps=8, seed=1)[1]
    for key in first:
        assert torch.equal(first[key].coefficients, second[key].coefficients)
        assert torch.equal(first[key].atoms, second[key].atoms)
    assert any(not torch.equal(first[k].coefficients, other[k].coefficients) for k in first)


def test_the_dictionary_comes_from_the_models_own_weights(node_classes):
    """Clones of a model share its modules, and the clone a sampler ran last keeps its patches
    merged into them until another loads: Build Atom Dictionary must read the model's own
    weights all the same (else a second graph in one server trains on another dictionary), and
    the weights of the MODEL it is given (the base plus that MODEL's own patches)."""
    model = tiny_models.build("sd15")
    atoms = build(node_classes, model)
    trained = train(node_classes, "sd15", model, atoms, steps=10)[1]
    applied = run_node(node_classes["SparseAtoms_Apply"], model=model, sparse_atoms=trained,
                       strength=1.0, density=1.0)[0]
    key = next(iter(trained))
    before = model.model.state_dict()[f"{key}.weight"].clone()
    mm.load_models_gpu([applied], force_full_load=True)  # as KSampler leaves it
    assert not torch.equal(model.model.state_dict()[f"{key}.weight"], before)  # merged in place
    again = build(node_classes, model)
    for name in atoms:
        assert torch.equal(again[name].atoms, atoms[name].atoms), name
        assert torch.equal(again[name].readouts, atoms[name].readouts), name
    patched = build(node_classes, applied)  # W + delta W: the trained layers' dictionaries change
    assert all(not torch.equal(patched[name].atoms, atoms[name].atoms) for name in trained)
    assert all(torch.equal(patched[name].atoms, atoms[name].atoms) for name in atoms if name not in trained)
