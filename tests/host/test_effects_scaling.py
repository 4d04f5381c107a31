"""The atom-effect measurement that ends Train Sparse Concept scales with the training's length:
short runs request fewer exact ablations and probes (down to fixed minimums), long runs the full
ones, and the atoms record what was used."""

from dataclasses import replace

import pytest
import torch

import sparse_core as sc
import tiny_models
from host_support import node_module, run_node


@pytest.fixture(scope="module")
def effects(node_classes):
    """Our ``nodes.effects`` as ComfyUI loaded it."""
    return node_module(node_classes, "effects")


@pytest.fixture(scope="module")
def training(node_classes):
    return node_module(node_classes, "training")


def concept(training, count=4):
    return training.Dataset(tiny_models.latents("sd15", count)["samples"], tiny_models.conditioning("sd15"))


@pytest.mark.parametrize("with_prior", [False, True])
def test_the_plan_grows_with_the_run_and_stays_near_its_share(effects, training, with_prior):
    """Over run lengths from 1 to 20,000 steps: probes, exact ablations and calibration never
    shrink as the run grows; the cost stays within the share once above the minimums; the
    shortest runs get the minimums, the long ones the full settings."""
    plans = {}
    minimum = 2 + 2 * effects.MIN_PROBES + effects.MIN_EXACT_TOP
    for batch in (1, 4):
        previous = None
        for steps in (1, 3, 10, 40, 100, 120, 300, 1000, 20_000):
            settings = training.TrainSettings(steps=steps, batch=batch)
            plan = plans[steps, batch] = effects.training_measurement(concept(training, 8), settings,
                                                                      with_prior)
            share = effects.TRAINING_SHARE * 3 * steps * batch * (2 if with_prior else 1)
            assert plan.forward_passes() <= max(share, minimum), (steps, batch, plan)
            assert plan.probes >= effects.MIN_PROBES and plan.exact_top >= effects.MIN_EXACT_TOP
            if previous is not None:
                assert plan.probes >= previous.probes and plan.exact_top >= previous.exact_top
                assert plan.forward_passes() >= previous.forward_passes(), (steps, batch)
            previous = plan
    shortest, longest = plans[1, 1], plans[20_000, 4]
    assert (shortest.probes, shortest.exact_top) == (effects.MIN_PROBES, effects.MIN_EXACT_TOP)
    assert (longest.probes, longest.exact_top) == (effects.PROBES, effects.EXACT_TOP)
    assert longest.calibration.describe() == "8 latents x 4 noise levels"
    medium = plans[40, 1] if with_prior else plans[100, 1]  # between the two: scaled down
    assert effects.MIN_PROBES < medium.probes < effects.PROBES, medium
    assert effects.MIN_EXACT_TOP < medium.exact_top < effects.EXACT_TOP, medium


def test_a_short_run_requests_fewer_ablations_and_probes_than_a_long_one(node_classes, effects, training,
                                                                         monkeypatch):
    """Through ``after_training`` (what the node calls): the settings reach the measurement and
    are recorded in the atoms' info."""
    model = tiny_models.build("sd15")
    with torch.inference_mode():
        atoms = run_node(node_classes["SparseAtoms_BuildDictionary"], model=model,
                         preset="self+cross attention", layer_regex="", atoms_per_layer=4,
                         method="svd", seed=0)[0]
    generator = torch.Generator().manual_seed(0)
    atoms = sc.SparseAtoms({key: replace(layer, coefficients=0.5 * torch.randn(layer.n_atoms, generator=generator))
                            for key, layer in atoms.layers.items()}, atoms.info)
    assert atoms.n_active > effects.EXACT_TOP  # so the exact count is the plan's, not the atoms'
    requested = []
    measure_effects = sc.measure_effects

    def spy(*args, **kwargs):
        requested.append((kwargs["exact_top"], kwargs["probes"]))
        return measure_effects(*args, **kwargs)

    monkeypatch.setattr(sc, "measure_effects", spy)
    results = [effects.after_training(model, atoms, concept(training, 2),
                                      training.TrainSettings(steps=steps, batch=1), False)
               for steps in (3, 3000)]
    (short_exact, short_probes), (long_exact, long_probes) = requested
    assert short_exact < long_exact and short_probes < long_probes, requested
    assert requested[1] == (effects.EXACT_TOP, effects.PROBES)
    for (measured, line), asked in zip(results, requested):
        assert (measured.info.effects["exact"], measured.info.effects.get("probes")) == asked
        assert f"top {asked[0]} exact" in line


def test_train_sparse_concept_records_the_measurement_it_used(node_classes, effects):
    model = tiny_models.build("sd15")
    with torch.inference_mode():
        atoms = run_node(node_classes["SparseAtoms_BuildDictionary"], model=model,
                         preset="self+cross attention", layer_regex="", atoms_per_layer=4,
                         method="svd", seed=0)[0]
    trained = run_node(node_classes["SparseAtoms_TrainConcept"], model=model,
                       latents=tiny_models.latents("sd15"), conditioning=tiny_models.conditioning("sd15"),
                       atom_dict=atoms, steps=4, learning_rate=3e-2, batch_size=1, l1=0.0,
                       atom_budget=0, tune_atoms=True, seed=0, training_dtype="fp32",
                       gradient_checkpointing=False)[1]
    assert trained.n_active > effects.EXACT_TOP
    recorded = trained.info.effects
    assert recorded["exact"] < effects.EXACT_TOP
    assert (recorded["exact"], recorded.get("probes")) == (effects.MIN_EXACT_TOP, effects.MIN_PROBES)
    assert f"({effects.MIN_PROBES} random probes per batch)" in recorded["method"]
    assert recorded["calibration"] == "1 latent x 1 noise level"

