"""Quality metrics (digits/quality.py) and the glyph generator (digits/glyphs.py): each metric
separates what it should (copies, real draws, blurred / shifted / other-class sets), against
closed forms where there are some; the quality bench parts run end to end on tiny settings."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repo_support import REPO
from digits import glyphs
from digits.data import images_of, load_digits
from digits.quality import (FeatureSpace, correlations, distance, diversity, frechet_distance, memorization,
                            mmd2, real_diversity, real_floor, real_memorization, template_correlation,
                            two_sample_accuracy)


@pytest.fixture(scope="module")
def space():
    return FeatureSpace.of_digits()


@pytest.fixture(scope="module")
def threes():
    """8 references, 64 real "samples" and the 111 other real 3s (held out), disjoint."""
    pool = images_of(3, 183, seed=0)
    return pool[:8], pool[8:72], pool[72:]


def test_two_sample_accuracy_tells_other_images_from_real_ones(threes):
    _, samples, held_out = threes
    same = two_sample_accuracy(samples[:32], held_out[:32])
    sevens = two_sample_accuracy(images_of(7, 32, seed=0), held_out[:32])
    blurred = two_sample_accuracy(blur(samples[:32]), held_out[:32])
    assert same < 0.7 and sevens > 0.95 and blurred > 0.9, (same, sevens, blurred)
    copies = samples[:1].expand(32, -1, -1, -1)  # near-identical samples: each finds a copy
    assert two_sample_accuracy(copies, held_out[:32]) >= 0.95


def blur(images):
    return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)


def test_correlations_are_pearsons():
    a, b = torch.randn(5, 1, 8, 8), torch.randn(3, 1, 8, 8)
    expected = np.corrcoef(a.flatten(1).numpy(), b.flatten(1).numpy())[:5, 5:]
    assert np.allclose(correlations(a, b).numpy(), expected)
    assert torch.allclose(correlations(a, 2 * a + 1).diagonal(), torch.ones(5, dtype=torch.float64))


def test_memorization_separates_copies_from_new_draws(threes):
    refs, samples, held_out = threes
    copies = refs[torch.arange(64) % 8]
    copied = memorization(copies, refs, held_out)
    assert copied.to_references == pytest.approx(1.0) and copied.closer_to_references == 1.0
    new = memorization(samples, refs, held_out)
    assert new.to_references < 0.9 and new.closer_to_references < 0.2
    floor = real_memorization(refs, held_out)  # leave-one-out: an image never matches itself
    assert floor.to_held_out < 0.97 and floor.closer_to_references < 0.2
    assert abs(new.closer_to_references - floor.closer_to_references) < 0.1


def test_diversity_separates_copies_from_real_images(threes):
    refs, samples, _ = threes
    one = diversity(refs[:1].expand(16, -1, -1, -1))
    assert one.mean_pairwise == pytest.approx(1.0) and one.nearest_neighbour == pytest.approx(1.0)
    eight = diversity(refs[torch.arange(64) % 8])  # mean pairwise barely moves; every image has a twin
    real = real_diversity(torch.cat([samples, threes[2]]), 64)
    assert eight.nearest_neighbour == pytest.approx(1.0) and real.nearest_neighbour < 0.95
    assert diversity(samples).mean_pairwise == pytest.approx(real.mean_pairwise, abs=0.03)
    image = torch.randn(1, 1, 8, 8)
    signed = diversity(torch.cat([image, image, -image]))  # pairs: +1, -1, -1 (Pearson of x and -x)
    assert (signed.mean_pairwise, signed.nearest_neighbour) == (pytest.approx(-1 / 3), pytest.approx(1 / 3))


def test_frechet_distance_matches_the_closed_form():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=generator, dtype=torch.float64) @ torch.randn(4, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(150, 4, generator=generator, dtype=torch.float64) + 0.5
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = (np.sum((a.mean(0) - b.mean(0)).numpy() ** 2) + np.trace(ca + cb)
                - 2 * np.trace(scipy_linalg.sqrtm(ca @ cb)).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_mmd2_is_unbiased_and_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=generator), torch.randn(4, 3, generator=generator) + 1
    k = lambda x, y: float(torch.exp(-(x - y).double().pow(2).sum() / (2 * 1.5 ** 2)))
    within = lambda x: sum(k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j) / (len(x) * (len(x) - 1))
    cross = sum(k(x, y) for x in a for y in b) / (len(a) * len(b))
    assert mmd2(a, b, 1.5) == pytest.approx(within(a) + within(b) - 2 * cross)
    same = [mmd2(torch.randn(32, 3, generator=generator), torch.randn(32, 3, generator=generator), 1.5)
            for _ in range(200)]
    assert abs(np.mean(same)) < 0.003 and min(same) < 0  # unbiased: centred on 0, not above it


def test_feature_space_is_deterministic_orthonormal_pca():
    images = load_digits()[0]
    one, two = FeatureSpace.fit(images, 8), FeatureSpace.fit(images.flip(0), 8)  # order does not matter
    assert torch.allclose(one.components, two.components, atol=1e-8) and one.bandwidth == pytest.approx(two.bandwidth)
    assert torch.allclose(one.components @ one.components.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
    variance = one.features(images).var(0)
    assert bool((variance[:-1] >= variance[1:]).all())  # principal components, largest first
    assert one.features(images).shape == (1797, 8)


def test_real_floor_splits_without_overlap(space, threes):
    real = threes[0].repeat(3, 1, 1, 1) + 0.1 * torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    order = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    expected = distance(real[order[:12]], real[order[12:]], space)  # n_samples above half: half
    assert real_floor(real, 20, space, splits=1, seed=5) == expected


def test_distance_real_draws_score_the_floor_and_distortions_score_worse(space, threes):
    _, samples, held_out = threes
    floor = real_floor(held_out, 48, space)
    real = distance(samples, held_out, space)
    assert real.frechet < 2 * floor.frechet and real.mmd2 < 0.005 and floor.mmd2 < 0.005
    eights = images_of(8, 64, seed=0)
    worse = {"blurred": blur(samples), "shifted": torch.roll(samples, 1, dims=3),
             "copies": threes[0][torch.arange(64) % 8], "eights": eights,
             "quarter eights": torch.cat([samples[:48], eights[:16]])}
    for name, images in worse.items():
        d = distance(images, held_out, space)
        assert d.frechet > 3 * real.frechet and d.mmd2 > 0.01, (name, d, real)


def test_glyphs_are_jittered_digit_like_drawings():
    for glyph in glyphs.GLYPHS:
        refs = glyphs.references(glyph, 8, seed=0)
        assert refs.shape == (8, 1, 8, 8) and refs.dtype == torch.float32
        assert float(refs.min()) >= -1 and float(refs.max()) <= 1
        levels = (refs + 1) * 8
        assert torch.equal(levels, levels.round())  # 17 grey levels, as the digits
        assert len({tuple(image.flatten().tolist()) for image in refs}) == 8  # jitter: all differ
        assert torch.equal(refs, glyphs.references(glyph, 8, seed=0))  # deterministic
        assert not torch.equal(refs, glyphs.references(glyph, 8, seed=1))
        held = glyphs.held_out(glyph, 64)
        assert float(correlations(refs, held).max()) < 0.9999  # disjoint streams: no reference held out
        assert torch.equal(refs[:3], glyphs.references(glyph, 3, seed=0))  # fewer: a prefix
        assert glyphs.template(glyph).shape == (1, 1, 8, 8)


def test_glyph_templates_and_distances_tell_glyphs_apart(space):
    for glyph in ("x", "triangle"):
        other = "plus" if glyph == "x" else "circle"
        held = glyphs.held_out(glyph, 192)
        fresh = glyphs.references(glyph, 64, seed=7)
        own = template_correlation(fresh, glyphs.template(glyph))
        assert own > 0.6 and own > template_correlation(fresh, glyphs.template(other)) + 0.2
        assert own > template_correlation(blur(fresh), glyphs.template(glyph))
        floor = real_floor(held, 64, space)
        assert distance(fresh, held, space).frechet < 2 * floor.frechet
        assert distance(blur(fresh), held, space).frechet > 5 * floor.frechet
        assert distance(glyphs.held_out(other, 64), held, space).frechet > 20 * floor.frechet


@pytest.mark.parametrize("call, error", [
    (lambda: glyphs.draw("star", 4, seed=0), ValueError),
    (lambda: glyphs.references("x", 4.0, seed=0), TypeError),
    (lambda: glyphs.references("x", 0, seed=0), ValueError),
    (lambda: glyphs.held_out("x", 4, seed=-1), ValueError),
    (lambda: FeatureSpace.fit(torch.zeros(10, 1, 8, 8), 11), ValueError),
    (lambda: FeatureSpace.fit(torch.zeros(10, 1, 8, 8), 2.0), TypeError),
    (lambda: FeatureSpace.of_digits().features(torch.zeros(2, 1, 4, 4)), ValueError),
    (lambda: mmd2(torch.zeros(3, 2), torch.zeros(3, 2), 0.0), ValueError),
    (lambda: frechet_distance(torch.zeros(1, 2), torch.zeros(3, 2)), ValueError),
    (lambda: diversity(torch.zeros(1, 1, 8, 8)), ValueError),
    (lambda: real_memorization(torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 8, 8)), ValueError),
    (lambda: real_floor(torch.zeros(3, 1, 8, 8), 8, FeatureSpace.of_digits()), ValueError),
    (lambda: template_correlation(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)), ValueError),
    (lambda: correlations(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4)), ValueError),
])
def test_bad_inputs_are_named(call, error):
    with pytest.raises(error):
        call()


def test_quality_parts_run_end_to_end_on_tiny_settings(monkeypatch, tmp_path):
    """bench_method.py --parts quality fewshot glyphs gap, with one run per row kind and 1 step."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench_method = pytest.importorskip("bench_method")
    import bench_quality as bq
    monkeypatch.setattr(bench_method, "PER_PROMPT", 2)
    monkeypatch.setattr(bq, "SPARSE_BUDGETS", (24,))
    monkeypatch.setattr(bq, "LORA_RANKS", (1,))
    monkeypatch.setattr(bq, "FEWSHOT", (1,))
    monkeypatch.setattr(bq, "GLYPH_CONCEPTS", {"zq": "x"})
    monkeypatch.setattr(bq, "GLYPH_BUDGETS", (24,))
    monkeypatch.setattr(bq, "GLYPH_RANKS", (1,))
    monkeypatch.setattr(bq, "GAP_VARIANTS", {k: bq.GAP_VARIANTS[k] for k in (
        "budget 24 (default)", "budget 24, 2x steps", "budget 24, atoms fixed (train_atoms off)")})
    path = tmp_path / "quality.json"
    monkeypatch.setattr(sys, "argv", ["bench_method.py", "--seeds", "0", "--steps", "1", "--samples", "8",
                                      "--parts", *bq.PARTS, "--json", str(path)])
    bench_method.main()
    results = json.loads(path.read_text())
    assert set(results["quality"][0]) == {"real held-out 3s", "sparse atoms, budget 24", "LoRA rank 1",
                                          "full fine-tuning"}
    row = results["quality"][0]["sparse atoms, budget 24"]
    assert row["stored"] == 24 * (64 + 64 + 1) and 0 <= row["closer"] <= 1 and row["frechet"] > 0
    assert results["fewshot"][0]["1"]["LoRA, equal stored"]["rank"] == 3
    assert "template" in results["glyphs"][0]["zq"]["sparse atoms, budget 24"]
    gap = results["gap"][0]
    assert gap["budget 24, atoms fixed (train_atoms off)"]["trainable"] == 256
    assert (gap["budget 24, 2x steps"]["steps"], gap["budget 24 (default)"]["steps"]) == (2, 1)
    report = "\n".join(results["report"])
    for title in ("**Quality**", "**Few-shot**", "**Unseen glyphs**", "**Closing the budget"):
        assert title in report
