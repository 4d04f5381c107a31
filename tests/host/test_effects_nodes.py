"""Measured atom effects in ComfyUI: Measure Atom Effects on tiny SD1.5, SDXL, Flux and SD3 models
and on the digits model, trained / loaded / atomized atoms, Train Sparse Concept's own ranking,
cancel and bad inputs (the LoRA-pruning workflow runs through a real server in test_server.py)."""

import math
import os
from dataclasses import replace

import pytest
import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

import sparse_core as sc
import tiny_models
from host_support import node_module, run_node



@pytest.fixture(scope="module")
def ours(node_classes):
    """Our ``nodes.effects`` / ``nodes.explorer`` / ``nodes.patching`` modules as ComfyUI loaded them."""
    return {name: node_module(node_classes, name) for name in ("effects", "explorer", "patching")}


def random_atoms(node_classes, model, n_atoms=4, scale=0.5, seed=0):
    """A dictionary of the model's attention layers with random non-zero coefficients."""
    atoms = run_node(node_classes["SparseAtoms_BuildDictionary"], model=model,
                     preset="self+cross attention", layer_regex="", atoms_per_layer=n_atoms,
                     method="svd", seed=0)[0]
    generator = torch.Generator().manual_seed(seed)
    layers = {key: replace(layer, coefficients=scale * torch.randn(layer.n_atoms, generator=generator))
              for key, layer in atoms.layers.items()}
    return sc.SparseAtoms(layers, atoms.info)


def measure(node_classes, model, atoms, arch, **changes):
    inputs = dict(model=model, sparse_atoms=atoms, positive=tiny_models.conditioning(arch),
                  negative=tiny_models.conditioning(arch, seed=1),
                  latent={"samples": torch.zeros(1, tiny_models.CHANNELS[arch], 16, 16)},
                  calibration_latents=tiny_models.latents(arch, count=2),
                  calibration_images=2, noise_levels=2, batch_size=1, exact_top=2, top_n=1,
                  alone_strength=1.0,
                  seed=0, steps=1, cfg=2.0, sampler_name="euler", scheduler="normal")
    inputs.update(changes)
    return run_node(node_classes["SparseAtoms_MeasureEffects"], **inputs)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_measured_effect_is_the_change_of_the_applied_models_prediction(node_classes, ours, arch):
    """The top atom's effect equals the RMS change of the prediction between the model with all
    atoms applied (Apply's merged patch, not the measurement's weight wrappers) and without it
    (predicted in one batch; the node measured one image per model call)."""
    model = tiny_models.build(arch)
    atoms = random_atoms(node_classes, model)
    output = measure(node_classes, model, atoms, arch)
    measured, grid = output[0], output[1]
    assert measured.importance_kind == "effect" and atoms.importance_kind == "weight norm"
    assert all(torch.equal(measured[k].coefficients, atoms[k].coefficients) for k in atoms)
    assert measured.info.effects["calibration"] == "2 latents x 2 noise levels"
    assert "effects of" in output.ui["text"][0] and "L" in output.ui["text"][0]
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3

    effects, patching = ours["effects"], ours["patching"]
    ranking = measured.ranking()
    key, row = ranking.keys[int(ranking.layer[0])], int(ranking.position[0])
    without = {k: torch.ones(layer.n_atoms, dtype=torch.bool) for k, layer in atoms.layers.items()}
    without[key][row] = False
    calibration = effects.Calibration(tiny_models.latents(arch, count=2)["samples"],
                                      tiny_models.conditioning(arch), noise_levels=2, seed=0)
    with torch.inference_mode():
        full = effects.predictions(patching.apply_to_model(model, atoms, 1.0), calibration)
        removed = effects.predictions(patching.apply_to_model(model, atoms.select(without), 1.0),
                                      calibration)
    expected = float((full - removed).pow(2).mean().sqrt())
    assert expected > 0
    assert math.isclose(float(measured[key].effect[row]), expected, rel_tol=2e-3), (arch, expected)


def test_calibration_output_is_the_models_own_prediction(node_classes, ours):
    """For the digits model (a flow model: x_t = (1 - sigma) x0 + sigma noise, the network
    predicts v = noise - x0), the calibration output is denoised / sigma = x_t / sigma - v, at the
    noise levels 1 - (l + 0.5) / L, with the noise drawn from the calibration's seed, in the
    latents' order (the model is called once per distinct conditioning)."""
    model = run_node(node_classes["SparseAtoms_LoadDigitsModel"])[0]
    latents, conds = run_node(node_classes["SparseAtoms_DigitExamples"], digits="3,7", per_digit=1,
                              seed=0, style="plain", prompt="").args
    latents, conds = {"samples": latents["samples"][[0, 1, 0]]}, [conds[0], conds[1], conds[0]]
    calibration = ours["effects"].Calibration(latents["samples"], conds, noise_levels=2, seed=5)
    got = ours["effects"].predictions(model, calibration)

    x0 = latents["samples"]
    noise = torch.randn((2, *x0.shape), generator=torch.Generator().manual_seed(5))
    context = torch.cat([cond[0] for cond in conds])
    expected = []
    with torch.no_grad():
        for level in range(2):
            sigma = 1 - (level + 0.5) / 2
            x_t = (1 - sigma) * x0 + sigma * noise[level]
            v = model.model.diffusion_model(x_t, torch.full((3,), 1000.0 * sigma), context)
            expected.append(x_t / sigma - v)
    assert torch.allclose(got, torch.cat(expected), atol=1e-5), float((got - torch.cat(expected)).abs().max())


@pytest.mark.parametrize("dtype, checkpointing", [("fp32", False), ("bf16", True)])
def test_trained_atoms_come_ranked_by_effect(node_classes, dtype, checkpointing):
    """Measured as trained: in bf16 with gradient checkpointing when training used them."""
    model = tiny_models.build("sd15")
    atoms = random_atoms(node_classes, model, scale=0.0)
    output = run_node(node_classes["SparseAtoms_TrainConcept"], model=model,
                      latents=tiny_models.latents("sd15"), conditioning=tiny_models.conditioning("sd15"),
                      atom_dict=atoms, steps=6, learning_rate=3e-2, batch_size=2, l1=0.0,
                      atom_budget=10, tune_atoms=True, seed=0, training_dtype=dtype,
                      gradient_checkpointing=checkpointing)
    trained = output[1]
    assert trained.importance_kind == "effect"
    assert all(bool((layer.effect > 0).all()) for layer in trained.layers.values() if layer.n_atoms)
    assert trained.info.effects["calibration"].endswith("noise level")  # a small run: 1 x 1
    assert "effects measured on" in output.ui["text"][0] and "% of the training time" in output.ui["text"][0]


def test_effects_survive_save_and_load_and_measure_again_alike(node_classes, comfy_dirs):
    model = tiny_models.build("sd15")
    measured = measure(node_classes, model, random_atoms(node_classes, model), "sd15", top_n=0)[0]
    run_node(node_classes["SparseAtoms_Save"], sparse_atoms=measured, filename="tests/effects",
             overwrite=True)
    loaded = run_node(node_classes["SparseAtoms_Load"], atoms_name="tests/effects.safetensors")[0]
    assert loaded.importance_kind == "effect"
    assert loaded.info.effects == measured.info.effects
    again = measure(node_classes, model, loaded.without_effects(), "sd15", top_n=0)[0]
    for key in measured:
        assert torch.equal(loaded[key].effect, measured[key].effect)
        assert torch.allclose(again[key].effect, measured[key].effect, rtol=1e-5, atol=1e-9)
    kept = run_node(node_classes["SparseAtoms_MaskEditor"], sparse_atoms=loaded, mask="", density=0.1)[0]
    expected = measured.top_k(math.ceil(0.1 * measured.n_atoms))
    assert {k: kept[k].index.tolist() for k in kept} == {k: expected[k].index.tolist() for k in expected}


def test_works_on_atomized_loras_from_a_file_and_from_the_stock_trainer(node_classes, comfy_dirs):
    from comfy_extras.nodes_train import TrainLoraNode

    model = tiny_models.build("sd15")
    run_node(node_classes["SparseAtoms_ToLoRA"], sparse_atoms=random_atoms(node_classes, model),
             filename="effects_lora", format="lora", dtype="fp32", overwrite=True)
    atomized = run_node(node_classes["SparseAtoms_FromLoRA"], model=model,
                        lora_name="effects_lora.safetensors")[0]
    assert measure(node_classes, model, atomized, "sd15", top_n=0)[0].importance_kind == "effect"

    digits = run_node(node_classes["SparseAtoms_LoadDigitsModel"])[0]
    latents, conds = run_node(node_classes["SparseAtoms_DigitExamples"], digits="3", per_digit=2,
                              seed=0, style="plain", prompt="sks").args
    with torch.inference_mode():
        lora = TrainLoraNode().train(digits, latents, conds, 2, 3, 1, 1e-2, 2, "AdamW", "MSE", 0,
                                     "fp32", "fp32", "LoRA", False, "[None]")[1]
    with pytest.raises(ValueError, match="choose a LoRA file in lora_name, or connect a LoRA"):
        run_node(node_classes["SparseAtoms_FromLoRA"], model=digits, lora_name="[None]")
    atoms = run_node(node_classes["SparseAtoms_FromLoRA"], model=digits, lora_name="[None]", lora=lora)[0]
    prompt = lambda text: run_node(node_classes["SparseAtoms_DigitPrompt"], prompt=text)[0]
    output = run_node(node_classes["SparseAtoms_MeasureEffects"], model=digits, sparse_atoms=atoms,
                      positive=prompt("sks"), negative=prompt(""),
                      latent={"samples": torch.zeros(2, 1, 8, 8)}, calibration_latents=latents,
                      calibration_conditioning=conds, calibration_images=2, noise_levels=2,
                      batch_size=2, exact_top=4, top_n=2, alone_strength=2.0, seed=0, steps=2, cfg=3.0,
                      sampler_name="euler", scheduler="simple")
    assert output[0].importance_kind == "effect" and output[0].n_atoms == atoms.n_atoms
    # the grid: a title bar, then "all atoms | base model" and one row per shown atom
    assert output[1].shape[1] == 22 + 3 * (96 + 8)


def test_explorer_renders_the_top_atoms_removed_and_alone(node_classes, ours):
    model = tiny_models.build("sd15")
    measured = measure(node_classes, model, random_atoms(node_classes, model), "sd15", top_n=0)[0]
    renders = ours["explorer"].variants(measured, 2, 3.0)
    ranking = measured.ranking()
    assert [title for title, _, _ in renders] == ["all atoms", "base model", "without", "alone",
                                                  "without", "alone"]
    assert renders[0][1] is measured and renders[1][1] is None
    for i in range(2):
        key, atom_id = ranking.keys[int(ranking.layer[i])], int(ranking.atom_id[i])
        _, without, strength = renders[2 + 2 * i]
        _, alone, alone_strength = renders[3 + 2 * i]
        assert without.n_atoms == measured.n_atoms - 1 and atom_id not in without[key].index.tolist()
        assert alone.n_atoms == 1 and alone[key].index.tolist() == [atom_id]
        assert (strength, alone_strength) == (1.0, 3.0)

    class DecodesToWhite:  # a VAE's decode: latents (B, C, h, w) -> images (B, 8h, 8w, 3)
        def decode(self, samples):
            return torch.ones(samples.shape[0], 8 * samples.shape[2], 8 * samples.shape[3], 3)

    latents = torch.zeros(2, 4, 16, 16)
    assert torch.equal(ours["explorer"].to_rgb(model, latents, DecodesToWhite()), torch.ones(2, 128, 128, 3))
    preview = ours["explorer"].to_rgb(model, latents)  # SD1.5's latent preview of zero latents
    assert preview.shape == (2, 16, 16, 3) and bool(((preview >= 0) & (preview <= 1)).all())


def test_cancel_stops_within_one_model_call_and_changes_nothing(node_classes):
    model = tiny_models.build("sd15")
    atoms = random_atoms(node_classes, model)
    before = atoms.clone()
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        mm.interrupt_current_processing(True)  # what the Cancel button does

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            measure(node_classes, model, atoms, "sd15", exact_top=16)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert len(seen) == 1
    assert all(torch.equal(atoms[k].coefficients, before[k].coefficients) for k in atoms)
    wrappers = [f for m in model.model.modules() for f in getattr(m, "weight_function", [])]
    assert not wrappers and not model.weight_wrapper_patches


def test_cancel_while_the_trainer_measures_keeps_the_trained_atoms(node_classes, comfy_dirs):
    model = tiny_models.build("sd15")
    atoms = random_atoms(node_classes, model, scale=0.0)
    steps = 3
    folder = os.path.join(folder_paths.get_folder_paths("sparse_atoms")[0], "interrupted")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    totals = []

    def hook(value, total, preview, node_id=None):
        totals.append(total)
        if total != steps:  # the measurement's bar, after the training's
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(node_classes["SparseAtoms_TrainConcept"], model=model,
                     latents=tiny_models.latents("sd15"), conditioning=tiny_models.conditioning("sd15"),
                     atom_dict=atoms, steps=steps,
                     learning_rate=3e-2, batch_size=2, l1=0.0, atom_budget=0, tune_atoms=True,
                     seed=0, training_dtype="fp32", gradient_checkpointing=False)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert totals[:steps] == [steps] * steps and len(totals) == steps + 1  # stopped at once
    new = sorted(set(os.listdir(folder)) - before)
    assert len(new) == 1
    saved = sc.load_atoms(os.path.join(folder, new[0]))
    assert saved.n_active > 0 and saved.n_atoms == saved.n_active  # the kept, trained atoms


def test_bad_inputs_are_clear_errors(node_classes):
    sd15, sdxl = tiny_models.build("sd15"), tiny_models.build("sdxl")
    atoms = random_atoms(node_classes, sd15)
    with pytest.raises(ValueError, match="Measure Atom Effects: cfg must be a finite number, got nan"):
        measure(node_classes, sd15, atoms, "sd15", cfg=float("nan"))
    with pytest.raises(ValueError, match="alone_strength must be a finite number, got inf"):
        measure(node_classes, sd15, atoms, "sd15", alone_strength=float("inf"))
    with pytest.raises(ValueError, match="do not fit this SDXL model"):
        measure(node_classes, sdxl, atoms, "sdxl")
    with pytest.raises(ValueError, match="Measure Atom Effects: negative is empty"):
        measure(node_classes, sd15, atoms, "sd15", negative=[])
    three = tiny_models.conditioning("sd15") * 3
    with pytest.raises(ValueError, match="calibration_conditioning has 3 entries for 2 images in calibration_latents"):
        measure(node_classes, sd15, atoms, "sd15", calibration_conditioning=three)
    with pytest.raises(ValueError, match="latent must be a LATENT with at least one image"):
        measure(node_classes, sd15, atoms, "sd15", latent={"samples": torch.zeros(0, 4, 16, 16)})
    with pytest.raises(ValueError, match="calibration_latents has 16 channels"):
        measure(node_classes, sd15, atoms, "sd15", calibration_latents=tiny_models.latents("flux", 2))
    nan = {"samples": torch.full((2, 4, 16, 16), float("nan"))}
    with pytest.raises(ValueError, match="Measure Atom Effects: calibration_latents contains NaN or inf"):
        measure(node_classes, sd15, atoms, "sd15", calibration_latents=nan)
    huge = {"samples": torch.full((2, 4, 16, 16), 1e30)}  # finite, but the model overflows on it
    with pytest.raises(ValueError, match=r"^Measure Atom Effects: the model's prediction on "
                                         r"calibration_latents is NaN or inf .*largest \|value\| 1e\+30"):
        measure(node_classes, sd15, atoms, "sd15", calibration_latents=huge)
