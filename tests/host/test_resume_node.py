"""Train Sparse Concept saves as it goes and resumes exactly, on the real model-patcher: numbered
atoms and training states every N steps (a new run number each run, nothing replaced), a resumed
run equal to the one that never stopped, and resumes that cannot continue refused by name."""

import os

import pytest
import torch

import folder_paths
import sparse_core as sc

import tiny_models
from test_nodes import build, train
from test_training_objective import options


@pytest.fixture(scope="module")
def sd15(node_classes):
    model = tiny_models.build("sd15")
    return model, build(node_classes, model, preset="cross-attention k/v")


def folder(name):
    return folder_paths.get_folder_paths(name)[0]


def saves(name, stem):
    return sorted(f for f in os.listdir(os.path.join(folder(name), os.path.dirname(stem)))
                  if f.startswith(os.path.basename(stem)))


def test_save_every_writes_each_steps_atoms_and_state_under_a_new_run_number(node_classes, sd15):
    model, atoms = sd15
    stem = "checkpoints/every"
    trained = train(node_classes, "sd15", model, atoms, steps=20, budget=6, save_every=8,
                    save_name=stem)[1]
    expected = [f"every_00001_step{s:05d}.safetensors" for s in (8, 16, 20)]
    assert saves("sparse_atoms", stem) == expected and saves("sparse_atoms_states", stem) == expected
    last = sc.load_atoms(os.path.join(folder("sparse_atoms"), "checkpoints", expected[-1]))
    assert last.n_atoms == trained.n_atoms and last.n_atoms <= 6  # the active atoms, as output
    for key in trained:
        torch.testing.assert_close(last.delta(key), trained.delta(key))
    state = sc.load_training_state(os.path.join(folder("sparse_atoms_states"), "checkpoints", expected[0]))
    assert state.step == 8 and state.atoms.n_atoms == atoms.n_atoms  # the whole dictionary
    train(node_classes, "sd15", model, atoms, steps=8, save_every=8, save_name=stem)
    assert saves("sparse_atoms", stem)[-1] == "every_00002_step00008.safetensors"  # none replaced


def test_a_resumed_run_is_the_run_that_never_stopped(node_classes, sd15):
    model, atoms = sd15
    extra = dict(steps=24, budget=8, prior_latents=tiny_models.latents("sd15", seed=5),
                 prior_conditioning=tiny_models.conditioning("sd15", seed=2), caption_dropout=0.3,
                 empty_conditioning=tiny_models.conditioning("sd15", seed=9),
                 options=options(node_classes, lr_schedule="cosine", warmup_steps=3,
                                 gradient_accumulation=2),
                 validation_latents=tiny_models.latents("sd15", count=3, seed=11),
                 validation_conditioning=tiny_models.conditioning("sd15", seed=12))
    whole = train(node_classes, "sd15", model, atoms, save_every=10, save_name="checkpoints/whole",
                  **extra)[1]
    resumed = train(node_classes, "sd15", model, atoms,
                    resume_from="checkpoints/whole_00001_step00010.safetensors", **extra)[1]
    assert resumed.info.training["resumed_from"]["step"] == 10
    assert resumed.info.training["losses"] == whole.info.training["losses"]
    assert set(resumed.layers) == set(whole.layers)
    for key in whole:
        assert torch.equal(resumed.delta(key), whole.delta(key)), key
    assert resumed.info.training["validation_losses"] == whole.info.training["validation_losses"]
    assert [step for step, _ in whole.info.training["validation_losses"]] == [0, 5, 10, 15, 20, 24]
    # without the saved random state the same 14 steps take other batches and noise
    fresh = train(node_classes, "sd15", model, atoms, **{**extra, "steps": 14})[1]
    # saved atoms (a step's file) go into atom_dict and train on from where they were
    further = train(node_classes, "sd15", model, sc.load_atoms(os.path.join(
        folder("sparse_atoms"), "checkpoints", "whole_00001_step00024.safetensors")), steps=1,
        lr=1e-9)[1]
    for key in whole:
        torch.testing.assert_close(further.delta(key), whole.delta(key), rtol=1e-4, atol=1e-6)
    assert fresh.info.training["losses"] != whole.info.training["losses"][10:]


def test_resumes_that_cannot_continue_the_run_are_refused_by_name(node_classes, sd15):
    model, atoms = sd15
    train(node_classes, "sd15", model, atoms, steps=10, save_every=5, save_name="checkpoints/bad")
    state = "checkpoints/bad_00001_step00005.safetensors"
    with pytest.raises(ValueError, match=r"Train Sparse Concept: resume: the state was trained with "
                                         r"learning_rate=0.03, this run has learning_rate=0.01"):
        train(node_classes, "sd15", model, atoms, steps=10, lr=0.01, resume_from=state)
    with pytest.raises(ValueError, match=r"'checkpoints/bad_00001_step00005.safetensors' was trained "
                                         r"on 4 concept images and 0 prior images, this run has 3 and 0"):
        train(node_classes, "sd15", model, atoms, steps=10, resume_from=state,
              latents=tiny_models.latents("sd15", count=3))
    with pytest.raises(ValueError, match=r"was trained on other images"):
        train(node_classes, "sd15", model, atoms, steps=10, resume_from=state,
              latents=tiny_models.latents("sd15", seed=7))
    with pytest.raises(ValueError, match=r"resume: the state has done 5 updates; steps must be more"):
        train(node_classes, "sd15", model, atoms, steps=5, resume_from=state)
    misplaced = os.path.join(folder("sparse_atoms_states"), "checkpoints", "atoms.safetensors")
    sc.save_atoms(atoms, misplaced)
    with pytest.raises(sc.AtomsFileError, match="this is a Sparse Atoms file"):
        train(node_classes, "sd15", model, atoms, steps=10, resume_from="checkpoints/atoms.safetensors")
    with pytest.raises(ValueError, match=r"Train Sparse Concept: file name '\.\./out' tries to leave"):
        train(node_classes, "sd15", model, atoms, steps=10, save_every=5, save_name="../out")


def test_the_loss_curve_is_shown_on_the_node_while_it_trains(node_classes, sd15, monkeypatch):
    """Each step reports progress through ComfyUI's progress hook (what the server sends to the
    page); the loss curve goes with it as a preview image, at most every 2 s and after the last."""
    import comfy.utils

    model, atoms = sd15
    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: calls.append((value, total, preview)))
    train(node_classes, "sd15", model, atoms, steps=12)
    steps = [(value, total) for value, total, _ in calls if total == 12]
    assert steps == [(k, 12) for k in range(1, 13)]
    previews = [(value, preview) for value, total, preview in calls if total == 12 and preview]
    assert previews[0][0] == 1 and previews[-1][0] == 12 and len(previews) < 12
    kind, picture, size = previews[-1][1]
    assert kind == "PNG" and picture.size == (480, 240) and size == 480
