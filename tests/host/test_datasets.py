"""Training data as lists (current ComfyUI's dataset nodes), images of several sizes (one bucket
per size), sets drawn by weight, and Load Training Images with per-image captions."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import folder_paths

import tiny_models
from host_support import run_node, saved_digits
from test_nodes import build, train


def forwards(model, record):
    """Record ``record(x, kwargs)`` for every training forward (with gradients) of ``model``."""
    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            record(args[0], kwargs)
    return model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_list_of_sizes_trains_one_bucket_per_size(node_classes):
    """Each size runs as its own batch, its prompts encoded for its size (SDXL's size
    conditioning differs); a list of same-size LATENTs trains exactly as their joined batch."""
    model = tiny_models.build("sdxl")
    atoms = build(node_classes, model, preset="cross-attention k/v")
    small, large = tiny_models.latents("sdxl", 2), tiny_models.latents("sdxl", 2, seed=1, size=24)
    context, extra = tiny_models.conditioning("sdxl")[0]
    cond = [[context, {"pooled_output": extra["pooled_output"]}]]  # no size: CLIPTextEncode's
    seen = []
    handle = forwards(model, lambda x, kwargs: seen.append((tuple(x.shape[-2:]), kwargs["y"])))
    try:
        _, trained, _, _ = train(node_classes, "sdxl", model, atoms, steps=6, batch_size=4,
                                 latents=[small, large], conditioning=[cond])
    finally:
        handle.remove()
    sizes = {size for size, _ in seen}
    assert sizes == {(16, 16), (24, 24)}, sizes
    y_small = next(y for size, y in seen if size == (16, 16))
    y_large = next(y for size, y in seen if size == (24, 24))
    assert not torch.equal(y_small[:1], y_large[:1])  # encoded for 128 px and for 192 px
    assert trained.info.training["images"] == 4
    first = train(node_classes, "sdxl", model, atoms, steps=4,
                  latents=[small, tiny_models.latents("sdxl", 2, seed=2)], conditioning=[cond, cond])
    joined = {"samples": torch.cat([small["samples"], tiny_models.latents("sdxl", 2, seed=2)["samples"]])}
    second = train(node_classes, "sdxl", model, atoms, steps=4, latents=joined, conditioning=cond)
    assert first[1].info.training["losses"] == second[1].info.training["losses"]


def test_join_weights_draw_each_set_in_proportion(node_classes):
    model = tiny_models.build("sd15")
    atoms = build(node_classes, model, preset="cross-attention k/v")
    one, two = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2)
    join = node_classes["SparseAtoms_JoinTrainingData"]
    shares = {}
    for weight in (1.0, 9.0):
        latent, conds = run_node(join, latents_1=tiny_models.latents("sd15", 2), conditioning_1=one,
                                 latents_2=tiny_models.latents("sd15", 2, seed=1),
                                 conditioning_2=two, weight_2=weight)
        assert ("training_weight" in latent) == (weight != 1.0)
        drawn = []
        handle = forwards(model, lambda x, kwargs: drawn.append(
            torch.equal(kwargs["context"][0], two[0][0][0].to(kwargs["context"]))))
        try:
            train(node_classes, "sd15", model, atoms, steps=120, lr=1e-6, batch_size=1,
                  latents=latent, conditioning=conds)
        finally:
            handle.remove()
        shares[weight] = sum(drawn) / len(drawn)
    assert 0.38 < shares[1.0] < 0.62 and 0.82 < shares[9.0] < 0.97, shares
    with pytest.raises(ValueError, match="Join Training Data: weight_2 must be a finite number"):
        run_node(join, latents_1=tiny_models.latents("sd15", 2), conditioning_1=one,
                 latents_2=tiny_models.latents("sd15", 2), conditioning_2=two, weight_2=float("nan"))


def test_list_inputs_take_one_value_per_widget(node_classes):
    model = tiny_models.build("sd15")
    atoms = build(node_classes, model, preset="cross-attention k/v")
    with pytest.raises(ValueError, match="Train Sparse Concept: steps got a list of 2 different "
                                         "values; it takes one"):
        train(node_classes, "sd15", model, atoms, steps=[2, 3])
    with pytest.raises(ValueError, match=r"Train Sparse Concept: latents \(item 2 of the list\) "
                                         r"has 16 channels"):
        train(node_classes, "sd15", model, atoms, steps=2,
              latents=[tiny_models.latents("sd15", 2), tiny_models.latents("flux", 2)])
    with pytest.raises(ValueError, match=r"conditioning has 3 entries for 4 images in latents"):
        train(node_classes, "sd15", model, atoms, steps=2,
              latents=[tiny_models.latents("sd15", 2), tiny_models.latents("sd15", 2)],
              conditioning=[tiny_models.conditioning("sd15") * 3])


def picture(width, height, seed=0):
    colours = np.random.default_rng(seed).uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    return Image.fromarray(colours).resize((width, height), Image.BICUBIC)


def test_load_training_images_keeps_sizes_and_captions(node_classes, comfy_dirs):
    folder = os.path.join(folder_paths.get_input_directory(), "concept_a")
    os.makedirs(folder)
    picture(200, 130).save(os.path.join(folder, "b.png"))
    picture(64, 64, 1).save(os.path.join(folder, "a.jpg"))
    with open(os.path.join(folder, "b.txt"), "w", encoding="utf-8") as file:
        file.write("  a photo of sks, grass \n")
    loader = node_classes["SparseAtoms_LoadTrainingImages"]
    images, captions = run_node(loader, folder="concept_a", default_caption="sks", max_size=0).args
    assert [tuple(i.shape) for i in images] == [(1, 64, 64, 3), (1, 128, 192, 3)]
    assert captions == ["sks", "a photo of sks, grass"]
    images, _ = run_node(loader, folder="concept_a", default_caption="", max_size=128).args
    assert [tuple(i.shape) for i in images] == [(1, 64, 64, 3), (1, 64, 128, 3)]
    open(os.path.join(folder, "c.png"), "wb").write(b"not a png")
    with pytest.raises(ValueError, match="Load Training Images: cannot read c.png in"):
        run_node(loader, folder="concept_a", default_caption="", max_size=0)
    os.makedirs(os.path.join(folder_paths.get_input_directory(), "empty"))
    with pytest.raises(ValueError, match="Load Training Images: no images"):
        run_node(loader, folder="empty", default_caption="", max_size=0)
    with pytest.raises(ValueError, match="is not a folder in the input directory"):
        run_node(loader, folder="../..", default_caption="", max_size=0)


def test_a_folder_with_captions_teaches_the_digits_model_through_the_server(server):
    """Load Training Images -> Image to Digits Latent and Digit Prompt (mapped over the lists by
    ComfyUI's executor) -> Train Sparse Concept's list inputs: the word in the caption files is
    learned (sampled 3s)."""
    from digits.evaluator import DigitEvaluator
    from digits.data import images_of

    folder = os.path.join(server.base, "input", "threes")
    os.makedirs(folder)
    for k, digit in enumerate(images_of(3, 8, seed=0)):
        grey = ((digit[0].numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        size = 64 if k % 2 else 96  # two sizes: both become 8 x 8 digits
        Image.fromarray(grey).resize((size, size), Image.NEAREST).convert("RGB").save(
            os.path.join(folder, f"{k}.png"))
        with open(os.path.join(folder, f"{k}.txt"), "w") as file:
            file.write("sks")
    graph = {
        "1": {"class_type": "SparseAtoms_LoadDigitsModel", "inputs": {}},
        "2": {"class_type": "SparseAtoms_LoadTrainingImages",
              "inputs": {"folder": "threes", "default_caption": "", "max_size": 0}},
        "3": {"class_type": "SparseAtoms_ImageToDigitsLatent", "inputs": {"image": ["2", 0], "invert": False}},
        "4": {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": ["2", 1]}},
        "5": {"class_type": "SparseAtoms_TrainConcept", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "conditioning": ["4", 0], "steps": 300,
            "prior_weight": 1.0, "learning_rate": 0.003, "batch_size": 8, "l1": 0.0, "atom_budget": 24,
            "tune_atoms": True, "seed": 0, "training_dtype": "fp32", "gradient_checkpointing": False}},
        "6": {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": "sks"}},
        "7": {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": ""}},
        "8": {"class_type": "SparseAtoms_EmptyDigitsLatent", "inputs": {"batch_size": 16}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0],
            "seed": 0, "steps": 24, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "10": {"class_type": "SparseAtoms_DigitsToImage", "inputs": {"latent": ["9", 0], "scale": 1}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "threes"}},
    }
    entry = server.run(graph, timeout=900)
    assert "execution_success" in server.messages(entry), server.log_tail()
    images = saved_digits(server, entry, "11")
    right = DigitEvaluator.fit().classify(images) == 3
    assert len(images) == 16 and float(right.float().mean()) >= 0.8, right.tolist()
