"""Atom effects (sparse_core.measure_effects) on a toy attention whose true effects are known.

The toy is one cross-attention: ``to_k`` feeds a softmax, ``to_v`` adds to the output. Its key
atoms get large coefficients (large weight norms) but barely move the output, since the queries
are small; its value atoms have small coefficients and move the output directly. The truth is
computed here by brute force (each atom dropped with ``SparseAtoms.select``, the model re-run),
independently of the library's own ablation.
"""

import math

import pytest
import torch
from torch.func import functional_call

import sparse_core as sc

D, TOKENS, SAMPLES, BATCHES = 8, 4, 24, 3


class ToyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_k = torch.nn.Linear(D, D, bias=False)
        self.to_v = torch.nn.Linear(D, D, bias=False)

    def forward(self, query, context):  # (n, 1, D), (n, TOKENS, D) -> (n, 1, D)
        keys, values = self.to_k(context), self.to_v(context)
        weights = torch.softmax(query @ keys.transpose(1, 2) / math.sqrt(D), dim=-1)
        return weights @ values


def _toy(device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    model = ToyAttention()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(D))
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    layers = {}
    for key, coefficients in (("to_k", [4.0, 3.5, 3.0, 2.5]), ("to_v", [1.0, 0.7, 0.5, 0.3])):
        atoms = torch.linalg.qr(torch.randn(D, D, generator=generator))[0][:4]  # (4, D) orthonormal
        readouts = torch.randn(4, D, generator=generator)
        readouts = readouts / readouts.norm(dim=1, keepdim=True)
        layers[key] = sc.AtomLayer(atoms, readouts, torch.tensor(coefficients), torch.arange(4), (D, D))
    atoms = sc.SparseAtoms(layers).to(device=device, dtype=dtype)
    query = 0.01 * torch.randn(SAMPLES, 1, D, generator=generator)  # small: keys barely matter
    context = torch.randn(SAMPLES, TOKENS, D, generator=generator)
    return model, atoms, query.to(device, dtype), context.to(device, dtype)


def _predictor(model, atoms, query, context, calls=None):
    size = SAMPLES // BATCHES

    def predict(batch):
        if calls is not None:
            calls.append(batch)
        part = slice(batch * size, (batch + 1) * size)
        return functional_call(model, sc.patched_weights(model, atoms), (query[part], context[part]))

    return predict


def _brute_force(model, atoms, query, context) -> dict:
    """{(key, row): RMS change of the output when that atom alone is dropped}."""
    with torch.no_grad():
        full = functional_call(model, sc.patched_weights(model, atoms), (query, context))
        truth = {}
        for key, layer in atoms.layers.items():
            for row in range(layer.n_atoms):
                keep = torch.ones(layer.n_atoms, dtype=torch.bool)
                keep[row] = False
                fewer = atoms.select({key: keep})
                out = functional_call(model, sc.patched_weights(model, fewer), (query, context))
                truth[key, row] = float((out - full).pow(2).mean().sqrt())
    return truth


def _flat(atoms) -> torch.Tensor:
    return torch.cat([layer.effect.cpu() for layer in atoms.layers.values()])


def _spearman(a, b) -> float:
    rank = lambda x: torch.argsort(torch.argsort(torch.as_tensor(x, dtype=torch.float64))).double()
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("method", ["auto", "jacobian", "fisher", "taylor"])
def test_effect_ranking_recovers_the_truth_and_the_weight_norm_does_not(device, method):
    model, atoms, query, context = _toy(device)
    truth = torch.tensor(list(_brute_force(model, atoms, query, context).values()))
    # the toy is what it claims: every value atom matters more than every key atom ...
    assert truth[4:].min() > 3 * truth[:4].max()
    # ... while the weight norm ranks every key atom first
    assert _spearman(torch.cat([l.weight_norm().cpu() for l in atoms.layers.values()]), truth) < 0
    estimated = sc.measure_effects(atoms, _predictor(model, atoms, query, context),
                                   n_batches=BATCHES, exact_top=0, method=method, probes=16)
    assert estimated.importance_kind == "effect"
    assert _spearman(_flat(estimated), truth) >= 0.9
    top = estimated.ranking()
    assert {top.keys[int(n)] for n in top.layer[:4]} == {"to_v"}
    if method in ("auto", "jacobian"):  # the first-order ablation effect itself: same units
        assert torch.allclose(_flat(estimated), truth.float(), rtol=0.35)


def test_exact_top_matches_brute_force_and_the_merged_ranking_is_consistent(device):
    model, atoms, query, context = _toy(device)
    truth = _brute_force(model, atoms, query, context)
    measured = sc.measure_effects(atoms, _predictor(model, atoms, query, context),
                                  n_batches=BATCHES, exact_top=3)
    effects = {(key, row): float(layer.effect[row]) for key, layer in measured.layers.items()
               for row in range(layer.n_atoms)}
    exact = sorted(truth, key=truth.get, reverse=True)[:3]
    for atom in exact:
        assert effects[atom] == pytest.approx(truth[atom], rel=1e-4)
    assert max(v for a, v in effects.items() if a not in exact) < min(effects[a] for a in exact)
    info = measured.info.effects
    assert info["exact"] == 3 and info["estimate"] == "jacobian" and info["seconds"] >= 0
    assert "exact ablation of the top 3" in info["method"] and info["metric"].startswith("rms")
    everything = sc.measure_effects(atoms, _predictor(model, atoms, query, context),
                                    n_batches=BATCHES, method="exact")
    assert torch.allclose(_flat(everything), torch.tensor(list(truth.values())).float(), rtol=1e-4)
    removed = sc.ablation_effects(atoms, _predictor(model, atoms, query, context),
                                  [("to_v", 2), ("to_k", 0)], n_batches=BATCHES)
    assert removed.tolist() == pytest.approx([truth["to_v", 2], truth["to_k", 0]], rel=1e-4)


def test_estimates_are_scaled_once_and_stay_below_the_exact_atoms():
    """Output ``n`` is ``c_n * s_n ** p_n`` (s = 1): the first-order estimate is ``p_n c_n``, the
    exact effect ``c_n`` (both over sqrt(5)). Atom 2 (p = 4) is overestimated fourfold, so the
    median ratio exact / estimate (1) would lift atoms 3 and 4 above it; one lower scale keeps
    them below every exact atom and in their own order."""
    scales, powers = torch.tensor([1.0, 0.9, 0.2, 0.5, 0.7]), torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0])
    layer = sc.AtomLayer(torch.eye(5, 2), torch.eye(5, 2), torch.ones(5), torch.arange(5), (2, 2))
    atoms = sc.SparseAtoms({"layer": layer})
    predict = lambda batch: scales * atoms["layer"].coefficients ** powers
    measured = sc.measure_effects(atoms, predict, n_batches=1, exact_top=3, method="jacobian")
    effect = measured["layer"].effect / math.sqrt(1 / 5)
    assert effect[:3].tolist() == pytest.approx([1.0, 0.9, 0.2], rel=1e-5)
    assert 0.2 > float(effect[4]) > float(effect[3]) > 0
    assert float(effect[3] / effect[4]) == pytest.approx(0.5 / 0.7, rel=1e-5)
    assert measured.info.effects["estimate_scale"] == pytest.approx(0.2 / 0.7, rel=1e-5)
    assert [int(i) for i in measured.ranking().atom_id] == [0, 1, 2, 4, 3]


def test_inactive_atoms_have_no_effect_and_the_input_is_unchanged():
    model, atoms, query, context = _toy("cpu")
    atoms["to_v"].coefficients[1] = 0.0
    before = atoms.clone()
    calls = []
    measured = sc.measure_effects(atoms, _predictor(model, atoms, query, context, calls),
                                  n_batches=BATCHES, method="exact", calibration="toy data")
    assert float(measured["to_v"].effect[1]) == 0.0 and bool((_flat(measured) > 0).sum() == 7)
    assert len(calls) == BATCHES * (1 + 7)  # the inactive atom is never run
    assert measured.info.effects["calibration"] == "toy data"
    assert all(layer.effect is None for layer in atoms.layers.values())
    for key, layer in atoms.layers.items():
        assert torch.equal(layer.coefficients, before[key].coefficients)


def test_deterministic():
    model, atoms, query, context = _toy("cpu")
    first, second = (sc.measure_effects(atoms, _predictor(model, atoms, query, context),
                                        n_batches=BATCHES, exact_top=2, probes=4)
                     for _ in range(2))
    assert torch.equal(_flat(first), _flat(second))


@pytest.mark.parametrize("fail_at", [1, 2, 4, 9, 17])
def test_atoms_restored_when_predict_or_progress_raises(fail_at):
    model, atoms, query, context = _toy("cpu")
    originals = {key: layer.coefficients for key, layer in atoms.layers.items()}
    values = {key: tensor.clone() for key, tensor in originals.items()}
    inner = _predictor(model, atoms, query, context)
    calls = []

    def predict(batch):
        calls.append(batch)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return inner(batch)

    with pytest.raises(RuntimeError, match="boom"):
        sc.measure_effects(atoms, predict, n_batches=BATCHES, exact_top=3, method="fisher")

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == fail_at:
            raise Cancelled

    with pytest.raises(Cancelled):
        sc.measure_effects(atoms, inner, n_batches=BATCHES, exact_top=3, method="fisher",
                           progress=cancel)
    for key, layer in atoms.layers.items():
        assert layer.coefficients is originals[key]
        assert torch.equal(layer.coefficients, values[key]) and not layer.coefficients.requires_grad


def test_progress_counts_every_predict_call():
    model, atoms, query, context = _toy("cpu")
    calls, reports = [], []
    sc.measure_effects(atoms, _predictor(model, atoms, query, context, calls), n_batches=BATCHES,
                       exact_top=2, progress=lambda done, total: reports.append((done, total)))
    total = BATCHES * (1 + 1 + 2)  # estimate, reference, two ablations per batch
    assert reports == [(n, total) for n in range(1, total + 1)] and len(calls) == total


@pytest.mark.parametrize("change, error, match", [
    (dict(method="magic"), ValueError, "method must be one of"),
    (dict(exact_top=-1), ValueError, "exact_top must be >= 0, got -1"),
    (dict(exact_top=2.0), TypeError, "exact_top must be an int"),
    (dict(probes=0), ValueError, "probes must be positive, got 0"),
    (dict(n_batches=0), ValueError, "n_batches must be positive, got 0"),
    (dict(progress="bar"), TypeError, "progress must be callable"),
    (dict(predict=lambda b: torch.ones(3), exact_top=0), ValueError, r"predict\(0\) does not depend on the atoms"),
    (dict(predict=lambda b: torch.full((3,), float("nan"))), ValueError, r"predict\(0\) returned NaN"),
    (dict(predict=lambda b: [1.0]), TypeError, r"predict\(0\) must return a torch.Tensor"),
])
def test_bad_arguments_are_named(change, error, match):
    model, atoms, query, context = _toy("cpu")
    arguments = dict(predict=_predictor(model, atoms, query, context), n_batches=BATCHES)
    arguments.update(change)
    with pytest.raises(error, match=match):
        sc.measure_effects(atoms, **arguments)
    with pytest.raises(KeyError, match="to_q"):
        sc.ablation_effects(atoms, arguments["predict"], [("to_q", 0)], n_batches=1)
    with pytest.raises(ValueError, match="row 9 of layer 'to_k'"):
        sc.ablation_effects(atoms, arguments["predict"], [("to_k", 9)], n_batches=1)


# -- the digits side (digits/effects.py) -----------------------------------------------------------

def test_digits_effects_are_exact_for_the_top_atoms_and_leave_the_model_unchanged():
    from torch.func import functional_call as call

    from digits import effects
    from digits.checkpoint import load_model
    from digits.concept import PREFIX, ConceptSettings, build_dictionary
    from digits.data import images_of
    from digits.prompts import tokenize

    dit, encoder, _ = load_model()
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    atoms = build_dictionary(dit, ConceptSettings())
    generator = torch.Generator().manual_seed(0)
    for key in list(atoms.keys())[-2:]:  # the last block's to_k and to_v
        atoms[key].coefficients[:3] = torch.randn(3, generator=generator)
    images = images_of(3, 4)
    measured = effects.measure(dit, encoder, atoms, images, "sks", exact_top=3)
    assert "4 images x 4 noise levels" in measured.info.effects["calibration"]
    assert all(torch.equal(v, state[k]) for k, v in dit.state_dict().items())

    calibration = effects.fixed_levels(images, "sks")
    predict = effects.predictor(dit, encoder, atoms, calibration)
    assert torch.equal(predict(1), predict(1))
    context = encoder(tokenize("sks")[None]).expand(len(calibration.inputs), -1, -1)
    run = lambda chosen: call(dit, sc.patched_weights(dit, chosen, prefix=PREFIX),
                              (calibration.inputs, calibration.sigmas * 1000, context)).detach()
    full, truth = run(atoms), {}
    for key in list(atoms.keys())[-2:]:
        for row in range(3):
            keep = torch.ones(atoms[key].n_atoms, dtype=torch.bool)
            keep[row] = False
            truth[key, row] = float((run(atoms.select({key: keep})) - full).pow(2).mean().sqrt())
    got = {atom: float(measured[atom[0]].effect[atom[1]]) for atom in truth}
    for atom in sorted(truth, key=got.get, reverse=True)[:3]:
        assert got[atom] == pytest.approx(truth[atom], rel=1e-4)
    assert _spearman(list(got.values()), list(truth.values())) >= 0.8
    assert sum(int((layer.effect > 0).sum()) for layer in measured.layers.values()) == 6
