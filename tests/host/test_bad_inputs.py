"""Bad inputs and faults on the nodes (DESIGN.md §5): NaN/inf numbers refused by name, no
silent overwrite, no read or write outside the model folders through a link, LoRAs that fit only
partly, and latents made for another model. Every case calls the real nodes on tiny models."""

import logging
import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management as mm
import folder_paths
import nodes as comfy_nodes

import sparse_core as sc
import tiny_models
from sparse_core._atomic_write import temp_name
from host_support import run_node
from test_nodes import build, train

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def sd15(node_classes):
    """A tiny SD1.5 model and atoms trained on it for 3 steps (non-zero coefficients)."""
    model = tiny_models.build("sd15")
    atoms = build(node_classes, model)
    return model, atoms, train(node_classes, "sd15", model, atoms, steps=3)[1]


def atoms_folder(*parts):
    return os.path.join(folder_paths.get_folder_paths("sparse_atoms")[0], *parts)


def loras_folder(*parts):
    return os.path.join(folder_paths.get_folder_paths("loras")[0], *parts)


def text_of(output):
    return output.ui["text"][0]


# -- numbers ---------------------------------------------------------------------------------

NUMBER_CASES = [
    ("SparseAtoms_Apply", "Apply Sparse Atoms", "strength", NAN),
    ("SparseAtoms_Apply", "Apply Sparse Atoms", "strength", INF),
    ("SparseAtoms_Apply", "Apply Sparse Atoms", "density", NAN),
    ("SparseAtoms_MaskEditor", "Atom Mask Editor", "density", NAN),
    ("SparseAtoms_TrainConcept", "Train Sparse Concept", "learning_rate", NAN),
    ("SparseAtoms_TrainConcept", "Train Sparse Concept", "learning_rate", INF),
    ("SparseAtoms_TrainConcept", "Train Sparse Concept", "l1", NAN),
    ("SparseAtoms_TrainConcept", "Train Sparse Concept", "prior_weight", NAN),
]


@pytest.mark.parametrize("node_id, display, name, value", NUMBER_CASES)
def test_nan_and_inf_numbers_are_refused_by_name(node_classes, sd15, node_id, display, name, value):
    model, atoms, trained = sd15
    inputs = {
        "SparseAtoms_Apply": dict(model=model, sparse_atoms=trained, strength=1.0, density=1.0),
        "SparseAtoms_MaskEditor": dict(sparse_atoms=trained, mask="", density=1.0),
        "SparseAtoms_TrainConcept": dict(
            model=model, latents=tiny_models.latents("sd15"), conditioning=tiny_models.conditioning("sd15"),
            atom_dict=atoms, steps=2, learning_rate=1e-3, batch_size=1, l1=0.0, atom_budget=0,
            tune_atoms=True, seed=0, training_dtype="fp32", gradient_checkpointing=False, prior_weight=1.0),
    }[node_id]
    inputs[name] = value
    with pytest.raises(ValueError, match=rf"^{display}: {name} must be a finite number, got {value!r}$"):
        run_node(node_classes[node_id], **inputs)


# -- no silent overwrite ---------------------------------------------------------------------

def test_save_writes_a_new_numbered_file_and_overwrites_only_when_asked(node_classes, sd15):
    _, atoms, trained = sd15
    os.makedirs(atoms_folder("numbered"), exist_ok=True)
    mine = atoms_folder("numbered", "mine.safetensors")
    sc.save_atoms(atoms, mine)  # the user's own file of that name
    before = open(mine, "rb").read()
    save = node_classes["SparseAtoms_Save"]
    first = run_node(save, sparse_atoms=trained, filename="numbered/mine")
    second = run_node(save, sparse_atoms=trained, filename="numbered/mine.safetensors")
    assert open(mine, "rb").read() == before
    assert sorted(os.listdir(atoms_folder("numbered"))) == [
        "mine.safetensors", "mine_00001.safetensors", "mine_00002.safetensors"]
    assert "numbered/mine_00001.safetensors" in text_of(first)
    assert "numbered/mine_00002.safetensors" in text_of(second)
    loaded = run_node(node_classes["SparseAtoms_Load"], atoms_name="numbered/mine_00002.safetensors")[0]
    assert loaded.fingerprint() == trained.fingerprint() and loaded.n_atoms == trained.n_atoms

    replaced = run_node(save, sparse_atoms=trained, filename="numbered/mine", overwrite=True)
    assert "numbered/mine.safetensors" in text_of(replaced)
    assert sc.load_atoms(mine).n_atoms == trained.n_atoms  # replaced, as asked
    assert len(os.listdir(atoms_folder("numbered"))) == 3


def test_lora_export_never_replaces_a_users_lora(node_classes, sd15):
    _, _, trained = sd15
    os.makedirs(loras_folder("numbered"), exist_ok=True)
    users = loras_folder("numbered", "style.safetensors")
    save_file({"a.lora_up.weight": torch.ones(2, 1), "a.lora_down.weight": torch.ones(1, 2)}, users)
    before = open(users, "rb").read()
    to_lora = node_classes["SparseAtoms_ToLoRA"]
    output = run_node(to_lora, sparse_atoms=trained, filename="numbered/style", format="lora", dtype="fp32")
    assert open(users, "rb").read() == before
    assert "numbered/style_00001.safetensors" in text_of(output)
    assert os.path.isfile(loras_folder("numbered", "style_00001.safetensors"))
    run_node(to_lora, sparse_atoms=trained, filename="numbered/style", format="diff", dtype="fp32",
             overwrite=True)
    assert open(users, "rb").read() != before and sorted(os.listdir(loras_folder("numbered"))) == [
        "style.safetensors", "style_00001.safetensors"]


def test_savers_remove_temp_files_left_by_killed_writers(node_classes, sd15):
    _, _, trained = sd15
    dead = subprocess.Popen(["true"])
    dead.wait()  # a writer that was killed mid-write: its pid is gone
    leftovers = [atoms_folder(temp_name(dead.pid)), atoms_folder("temp", temp_name(dead.pid)),
                 loras_folder(temp_name(dead.pid))]
    for path in leftovers:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as stream:
            stream.write(b"half a file")
    run_node(node_classes["SparseAtoms_Save"], sparse_atoms=trained, filename="temp/x")
    assert not os.path.exists(leftovers[0]) and not os.path.exists(leftovers[1])
    assert os.path.exists(leftovers[2])
    run_node(node_classes["SparseAtoms_ToLoRA"], sparse_atoms=trained, filename="temp_x", format="lora", dtype="fp32")
    assert not os.path.exists(leftovers[2])


def test_a_name_taken_while_saving_is_skipped_not_replaced(node_classes, sd15, monkeypatch):
    """Another saver creates the numbered name between our choice and our write: we take the next."""
    _, _, trained = sd15
    real_save = sc.save_atoms
    taken = []

    def racing_save(atoms, path, *, overwrite=False):
        if not taken:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "xb") as stream:
                stream.write(b"another saver's file")
            taken.append(path)
        return real_save(atoms, path, overwrite=overwrite)

    monkeypatch.setattr(sc, "save_atoms", racing_save)
    output = run_node(node_classes["SparseAtoms_Save"], sparse_atoms=trained, filename="race/concept")
    assert taken == [atoms_folder("race", "concept_00001.safetensors")]
    assert open(taken[0], "rb").read() == b"another saver's file"
    assert "race/concept_00002.safetensors" in text_of(output)
    assert sc.load_atoms(atoms_folder("race", "concept_00002.safetensors")).n_atoms == trained.n_atoms


def test_long_names_save_or_are_refused_before_writing(node_classes, sd15):
    _, _, trained = sd15
    save = node_classes["SparseAtoms_Save"]
    run_node(save, sparse_atoms=trained, filename="long/" + "a" * 230)  # 248-byte file name
    assert os.listdir(atoms_folder("long")) == ["a" * 230 + "_00001.safetensors"]
    with pytest.raises(ValueError, match=r"Save Sparse Atoms: file name .* is too long: .* at most 255"):
        run_node(save, sparse_atoms=trained, filename="long/" + "b" * 240)
    assert os.listdir(atoms_folder("long")) == ["a" * 230 + "_00001.safetensors"]


@pytest.mark.parametrize("filename, problem", [
    ("bad\x00name", r"control character '\\x00'"),
    ("two\nlines", r"control character '\\n'"),
    ("tab\tname", r"control character '\\t'"),
    ("cr\rname", r"control character '\\r'"),
    ("raw\udcffbyte", "not valid Unicode"),
    ("sub/ /name", "begins or ends with a space"),
    ("sub /name", "begins or ends with a space"),
])
def test_names_a_file_system_would_mangle_are_refused_before_writing(node_classes, sd15, filename, problem):
    _, _, trained = sd15
    before = sorted(os.listdir(atoms_folder())) if os.path.isdir(atoms_folder()) else []
    for node, what in (("SparseAtoms_Save", "Save Sparse Atoms"), ("SparseAtoms_ToLoRA", "Sparse Atoms to LoRA")):
        extra = {"format": "lora", "dtype": "fp32"} if node == "SparseAtoms_ToLoRA" else {}
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=f"{what}: file name .*{problem}"):
                run_node(node_classes[node], sparse_atoms=trained, filename=filename,
                         overwrite=overwrite, **extra)
    assert (sorted(os.listdir(atoms_folder())) if os.path.isdir(atoms_folder()) else []) == before


def test_saving_onto_a_folder_or_under_a_file_names_the_target(node_classes, sd15):
    _, _, trained = sd15
    save = node_classes["SparseAtoms_Save"]
    os.makedirs(atoms_folder("isdir.safetensors"), exist_ok=True)
    with pytest.raises(IsADirectoryError, match="Save Sparse Atoms: a folder has this name") as caught:
        run_node(save, sparse_atoms=trained, filename="isdir", overwrite=True)
    assert caught.value.filename == atoms_folder("isdir.safetensors")
    assert ".tmp" not in str(caught.value)
    with open(atoms_folder("plainfile"), "wb") as stream:
        stream.write(b"a user's file")
    for overwrite in (False, True):
        with pytest.raises(NotADirectoryError, match=r"Save Sparse Atoms: cannot create the folder "
                                                     r".*plainfile is a file, not a folder"):
            run_node(save, sparse_atoms=trained, filename="plainfile/concept", overwrite=overwrite)
    assert open(atoms_folder("plainfile"), "rb").read() == b"a user's file"
    assert os.listdir(atoms_folder("isdir.safetensors")) == []


def test_two_cancels_in_one_second_keep_both_runs(node_classes, sd15, monkeypatch):
    """Both runs' atoms stay, each in its own file (the clock is frozen to force the same second)."""
    import comfy.utils

    model, atoms, _ = sd15
    monkeypatch.setattr("time.strftime", lambda *args: "20250101-000000")
    partial = []
    for seed in (0, 1):
        def hook(value, total, preview, node_id=None):
            if value == 2:
                mm.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            with pytest.raises(mm.InterruptProcessingException) as raised:
                train(node_classes, "sd15", model, atoms, steps=50, seed=seed)
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
            mm.interrupt_current_processing(False)
        partial.append(raised.value.atoms)
    folder = atoms_folder("interrupted")
    names = sorted(n for n in os.listdir(folder) if n.startswith("20250101-000000"))
    assert names == ["20250101-000000-node1_00001.safetensors", "20250101-000000-node1_00002.safetensors"]
    for name, expected in zip(names, partial):
        saved = sc.load_atoms(os.path.join(folder, name))
        assert all(torch.equal(saved[k].coefficients, expected[k].coefficients.cpu()) for k in saved)


# -- links out of the folders ----------------------------------------------------------------

def test_no_save_or_load_through_a_link_out_of_the_folder(node_classes, sd15, tmp_path):
    model, _, trained = sd15
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(atoms_folder(), exist_ok=True)
    os.symlink(outside, atoms_folder("escape"))
    os.symlink(outside, loras_folder("escape"))
    with pytest.raises(ValueError, match="Save Sparse Atoms: .* leads outside .* symbolic link"):
        run_node(node_classes["SparseAtoms_Save"], sparse_atoms=trained, filename="escape/x")
    with pytest.raises(ValueError, match="Sparse Atoms to LoRA: .* leads outside .* symbolic link"):
        run_node(node_classes["SparseAtoms_ToLoRA"], sparse_atoms=trained, filename="escape/x",
                 format="lora", dtype="fp32")
    assert list(outside.iterdir()) == []

    # valid files outside, linked in by name: never read
    sc.save_atoms(trained, outside / "atoms.safetensors")
    save_file(sc.to_lora(trained), str(outside / "lora.safetensors"))
    os.symlink(outside / "atoms.safetensors", atoms_folder("linked.safetensors"))
    os.symlink(outside / "lora.safetensors", loras_folder("linked.safetensors"))
    with pytest.raises(ValueError, match="Load Sparse Atoms: 'linked.safetensors' is a link to a file "
                                         "outside the sparse_atoms folders"):
        run_node(node_classes["SparseAtoms_Load"], atoms_name="linked.safetensors")
    with pytest.raises(ValueError, match="LoRA to Sparse Atoms: 'linked.safetensors' is a link to a "
                                         "file outside the loras folders"):
        run_node(node_classes["SparseAtoms_FromLoRA"], model=model, lora_name="linked.safetensors")

    # a link that stays inside the folder is fine
    sc.save_atoms(trained, atoms_folder("inside.safetensors"))
    os.symlink(atoms_folder("inside.safetensors"), atoms_folder("alias.safetensors"))
    loaded = run_node(node_classes["SparseAtoms_Load"], atoms_name="alias.safetensors")[0]
    assert loaded.n_atoms == trained.n_atoms


def test_an_unreadable_lora_is_named_without_its_bytes(node_classes, sd15):
    model = sd15[0]
    secret = b"SECRET-PASSWORD-hunter2-0123456789abcdef\n"
    for name in ("junk.pt", "junk.safetensors"):
        with open(loras_folder(name), "wb") as stream:
            stream.write(secret)
        with pytest.raises(ValueError, match=rf"^LoRA to Sparse Atoms: '{name}' could not be read as a "
                                             "LoRA file") as raised:
            run_node(node_classes["SparseAtoms_FromLoRA"], model=model, lora_name=name)
        message = str(raised.value)
        assert "SECRET" not in message and "operand" not in message and "weights_only" not in message


# -- LoRA to Sparse Atoms --------------------------------------------------------------------

def write_lora(name, state):
    save_file({k: v.contiguous() for k, v in state.items()}, loras_folder(name))
    return name


def test_a_lora_that_fits_partly_says_what_was_dropped(node_classes, sd15, caplog):
    model, _, trained = sd15
    state = sc.to_lora(trained)
    state.update({"diffusion_model.no_such_block.proj.lora_up.weight": torch.ones(8, 2),
                  "diffusion_model.no_such_block.proj.lora_down.weight": torch.ones(2, 8),
                  "diffusion_model.no_such_block.proj.alpha": torch.tensor(2.0)})
    name = write_lora("partly.safetensors", state)
    with caplog.at_level(logging.WARNING, logger="sparse_atoms"):
        output = run_node(node_classes["SparseAtoms_FromLoRA"], model=model, lora_name=name)
    atoms = output[0]
    assert set(atoms.keys()) == set(trained.keys())
    text = text_of(output)
    assert "Dropped 1 module(s) that do not fit this SD15 model" in text
    assert "diffusion_model.no_such_block.proj (not in this model)" in text
    assert any("no_such_block.proj" in r.getMessage() and "partly.safetensors" in r.getMessage()
               for r in caplog.records)


def test_a_lora_that_fits_nothing_is_refused_naming_file_and_model(node_classes, sd15):
    model, _, trained = sd15
    key = next(iter(trained))
    out, inner = trained[key].weight_shape[0], math.prod(trained[key].weight_shape[1:])
    wrong_shape = write_lora("other_model.safetensors", {
        f"{key}.lora_up.weight": torch.ones(out + 3, 2), f"{key}.lora_down.weight": torch.ones(2, inner + 5)})
    unknown = write_lora("unknown.safetensors", {
        "diffusion_model.nowhere.lora_up.weight": torch.ones(4, 1),
        "diffusion_model.nowhere.lora_down.weight": torch.ones(1, 4)})
    for name, why in ((wrong_shape, rf"{key} \(its update does not match the layer's shape"),
                      (unknown, r"diffusion_model.nowhere \(not in this model\)")):
        with pytest.raises(ValueError, match=rf"LoRA to Sparse Atoms: LoRA '{name}' fits none of this "
                                             rf"SD15 model's layers .*{why}"):
            run_node(node_classes["SparseAtoms_FromLoRA"], model=model, lora_name=name)


@pytest.mark.parametrize("case", ["nan_up", "nan_alpha", "rank_0", "alpha_0", "huge"])
def test_nan_and_rank_0_loras_are_clear_errors(node_classes, sd15, case):
    model, _, trained = sd15
    key = next(iter(trained))
    state = sc.to_lora(trained)
    rank = state[f"{key}.lora_down.weight"].shape[0]
    if case == "nan_up":
        state[f"{key}.lora_up.weight"][0, 0] = NAN
    elif case == "nan_alpha":
        state[f"{key}.alpha"] = torch.tensor(NAN)
    elif case == "alpha_0":
        state[f"{key}.alpha"] = torch.tensor(0.0)
    elif case == "huge":  # finite factors (1e20) whose product overflows float32
        state[f"{key}.lora_up.weight"] = torch.full_like(state[f"{key}.lora_up.weight"], 1e20)
        state[f"{key}.lora_down.weight"] = torch.full_like(state[f"{key}.lora_down.weight"], 1e20)
    else:
        state[f"{key}.lora_up.weight"] = state[f"{key}.lora_up.weight"][:, :0]
        state[f"{key}.lora_down.weight"] = state[f"{key}.lora_down.weight"][:0]
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    name = write_lora(f"{case}.safetensors", state)
    expected = {"rank_0": "has rank 0", "alpha_0": "alpha is 0, so its update is zero",
                "huge": None}.get(case, "contains NaN or inf")
    where = rf"^LoRA to Sparse Atoms: LoRA '{name}', module '{key}': {expected}" if expected else \
        rf"^LoRA to Sparse Atoms: LoRA '{name}': delta for '{key}' is too large for float32 atoms"
    with pytest.raises(ValueError, match=where):
        run_node(node_classes["SparseAtoms_FromLoRA"], model=model, lora_name=name)


# -- latents and conditioning made for another model -----------------------------------------

def test_latents_with_the_wrong_channels_say_what_the_model_takes(node_classes, sd15):
    model, atoms, _ = sd15
    wrong = tiny_models.latents("flux")  # 16 channels
    with pytest.raises(ValueError, match=r"Train Sparse Concept: latents has 16 channels \(shape "
                                         r"\(4, 16, 16, 16\)\), but this SD15 model takes 4-channel latents"):
        train(node_classes, "sd15", model, atoms, steps=2, latents=wrong)
    with pytest.raises(ValueError, match=r"Train Sparse Concept: prior_latents has 16 channels .* "
                                         r"takes 4-channel latents"):
        train(node_classes, "sd15", model, atoms, steps=2, prior_latents=wrong,
              prior_conditioning=tiny_models.conditioning("sd15"))


@pytest.fixture(scope="module")
def digits(node_classes):
    model = run_node(node_classes["SparseAtoms_LoadDigitsModel"])[0]
    positive = run_node(node_classes["SparseAtoms_DigitPrompt"], prompt="7")[0]
    negative = run_node(node_classes["SparseAtoms_DigitPrompt"], prompt="")[0]
    return model, positive, negative


def sample(model, positive, negative, latent):
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, 0, 1, 1.0, "euler", "simple", positive, negative, latent)


def test_the_digits_model_names_what_it_takes(node_classes, digits):
    model, positive, negative = digits
    # an encoded image of a 4-channel model (not all zeros: KSampler reshapes an empty latent)
    sd_latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    with pytest.raises(ValueError, match=r"the digits model takes latents of shape \(B, 1, 8, 8\); this "
                                         r"latent has 4 channels"):
        sample(model, positive, negative, sd_latent)
    with pytest.raises(ValueError, match=r"the digits model takes latents of shape \(B, 1, 8, 8\); this "
                                         r"latent has 1 channels, shape \(1, 1, 16, 16\)"):
        sample(model, positive, negative, {"samples": torch.ones(1, 1, 16, 16)})
    clip_like = [[torch.zeros(1, 77, 768), {}]]  # conditioning of another text encoder
    with pytest.raises(ValueError, match=r"the digits model takes conditioning of shape \(B, tokens, 64\); "
                                         r"got shape \(1, 77, 768\)"):
        sample(model, clip_like, negative, {"samples": torch.zeros(1, 1, 8, 8)})
    assert sample(model, positive, negative, {"samples": torch.zeros(1, 1, 8, 8)})[0]["samples"].shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"Digits to Image: the latent has 4 channels \(shape \(1, 4, 8, 8\)\); "
                                         r"digits latents have 1 channel"):
        run_node(node_classes["SparseAtoms_DigitsToImage"], latent=sd_latent, scale=1)
    dictionary = run_node(node_classes["SparseAtoms_BuildDictionary"], model=model, preset="cross-attention k/v",
                          layer_regex="", atoms_per_layer=2, method="svd", seed=0)[0]
    with pytest.raises(ValueError, match=r"Train Sparse Concept: latents has 4 channels .* this digits-dit "
                                         r"model takes 1-channel latents"):
        run_node(node_classes["SparseAtoms_TrainConcept"], model=model, latents=sd_latent,
                 conditioning=positive, atom_dict=dictionary, steps=1, learning_rate=1e-3, batch_size=1,
                 l1=0.0, atom_budget=0, tune_atoms=True, seed=0, training_dtype="fp32",
                 gradient_checkpointing=False)
