"""Benchmark of the method's claims on the shipped digits model (CPU, no downloads).

    python bench/bench_method.py [--seeds 0 1 2] [--json results.json]

Every figure is mean +- std over the seeds (each seed picks other reference images, other noise,
other initial atoms). The evaluator is a classifier fit on real digits and never trained on.

1. Concept customization: teach the held-out 3 as "sks" from 8 images, with prior preservation,
   on the cross-attention k/v projections. Sparse atoms (budget 24 of 256) vs LoRA on the same
   layers at the rank whose parameter count matches the kept atoms' vs full fine-tuning of those
   layers; fidelity (share of "sks" samples called 3), preservation (accuracy on the nine trained
   digits, atoms applied), trainable and stored parameters, training time.
2. Sparsity sweep: fidelity and preservation against the number of atoms kept (the budget).
3. Editing: fine-tune atoms on one image of a digit (self+cross attention, no budget), then
   prompt the other digits with the atoms applied at density 100 % -> 5 %: alignment (evaluator
   says the prompted digit) and fidelity to the source image (best pixel correlation).
4. Composition: concept atoms ("sks" = 3) + style atoms (bold strokes bound to the word "bold",
   learned on bold versions of the other digits under "bold <digit>") applied together; share of
   "bold sks" samples that are 3s and bold (ink above the median of the bold training images).
5. Importance = measured effect: the concept's 24 atoms, their effects measured at the end of
   training (digits/effects.py), against each atom's exact ablation effect on 256 other noisy
   versions of the references (Spearman; also for the weight norm and each estimate alone);
   fidelity after keeping / removing the top k atoms vs k random ones; the cost of measuring.
6. Budget criterion: the training budget ranking atoms by weight norm vs by accumulated Taylor
   score |s dL/ds| (TrainConfig.budget_by, 'taylor' by default), at equal atom counts.
7. Quality beyond the classifier (bench/bench_quality.py, parts quality, fewshot, glyphs, gap):
   memorization, diversity and distance to held-out real images of sparse atoms at budgets 4-all
   vs LoRA ranks vs full fine-tuning, with 1-8 references, on unseen glyphs, and what closes the
   budget's quality cost.

Concept atoms everywhere are trained with the Taylor budget and ranked by measured effect, as the
demo does; editing (3) is reported with density by weight norm and by effect. ``--parts`` runs a
subset; ``--steps`` sets the concept runs' training steps (400), ``--samples`` the samples per
concept the quality parts score (64); the JSON goes to bench/results/ unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_core as sc  # noqa: E402
import bench_quality as bq  # noqa: E402  (the quality parts; bench/ is on the path as the script's folder)
from digits.checkpoint import load_model  # noqa: E402
from digits import composition  # noqa: E402
from digits.concept import (PREFIX, ConceptSettings, build_dictionary, flow_loss,  # noqa: E402
                            sample_prompts, train_concept)
from digits.data import images_of, stroke_mass  # noqa: E402
from digits.effects import measure, predictor, random_levels  # noqa: E402
from digits.evaluator import DigitEvaluator, reference_similarity  # noqa: E402
from digits.prompts import CONCEPT_PROMPT, HELD_OUT, STYLE_WORD, TRAINED_DIGITS  # noqa: E402

PER_PROMPT = 32
PARTS = ("concept", "editing", "composition", "effects", "budget", *bq.PARTS)
KS = (1, 2, 4, 8)  # atoms kept / removed in the effect experiment
CRITERIA = ("weight norm", "taylor")  # the training budget's ranking
BUDGET_CHECK = (2, 4, 8, 24)
DENSE_LR = {"lora": 3e-3, "full": 1e-3}
mean_std, fmt = bq.mean_std, bq.fmt


def spearman(a, b) -> float:
    """Rank correlation of two sequences of equal length (ranks by sort order)."""
    rank = lambda x: torch.argsort(torch.argsort(torch.as_tensor(x, dtype=torch.float64))).double()
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def flat(atoms: sc.SparseAtoms, values: dict) -> torch.Tensor:
    return torch.cat([values[key].detach().cpu().double() for key in atoms.keys()])


class Bench:
    def __init__(self, steps: int = ConceptSettings.steps):
        self.dit, self.encoder, _ = load_model()
        self.evaluator = DigitEvaluator.fit()
        self.kv_weights = sc.linear_weights(self.dit, r"attn2\.to_[kv]$", prefix=PREFIX)
        self.steps = steps  # training steps of the concept runs (sparse, LoRA, full)

    def score(self, seed, prompt=CONCEPT_PROMPT, target=HELD_OUT, **applied):
        """(fidelity: share of ``prompt``'s samples called ``target``, None without a target;
        preservation on the trained digits; ``prompt``'s samples), ``applied`` as sample_prompts'."""
        samples = sample_prompts(self.dit, self.encoder, [prompt, *TRAINED_DIGITS],
                                 PER_PROMPT, seed=1000 + seed, **applied)
        fidelity = None if target is None else self.evaluator.share(samples[prompt], target)
        preservation = self.evaluator.accuracy({d: samples[d] for d in TRAINED_DIGITS})
        return fidelity, preservation, samples[prompt]

    def lora_rank_for(self, stored: int) -> int:
        """The LoRA rank on the k/v layers whose parameter count is closest to ``stored``."""
        return max(1, round(stored / sum(sum(w.shape) for w in self.kv_weights.values())))

    # -- 1 and 2 ---------------------------------------------------------------------------
    def sparse(self, seed, budget, data, criterion="taylor", *, prompt=CONCEPT_PROMPT,
               target=HELD_OUT, **overrides):
        """Train like the demo (budget ranked by ``criterion``; ``overrides``: other
        ConceptSettings fields), measure effects, score with every kept atom."""
        refs, prior = data
        settings = ConceptSettings(**{"seed": seed, "budget": budget, "budget_by": criterion,
                                      "steps": self.steps, **overrides})
        atoms = build_dictionary(self.dit, settings)
        start = time.perf_counter()
        train_concept(self.dit, self.encoder, atoms, refs, prompt, settings, prior=prior)
        seconds = time.perf_counter() - start
        atoms = measure(self.dit, self.encoder, atoms, refs, prompt, seed=seed)
        kept = atoms.select({key: layer.coefficients != 0 for key, layer in atoms.layers.items()})
        fidelity, preservation, samples = self.score(seed, prompt, target, atoms=kept)
        trainable = atoms.n_parameters(atoms=settings.train_atoms, readouts=settings.train_readouts)
        return dict(fidelity=fidelity, preservation=preservation, seconds=seconds,
                    effects_seconds=atoms.info.effects["seconds"],
                    similarity=reference_similarity(samples, refs), kept=kept.n_atoms,
                    trainable=trainable, stored=kept.n_parameters(), steps=settings.steps, atoms=kept)

    def dense(self, seed, kind, rank, data, lr=None, *, prompt=CONCEPT_PROMPT, target=HELD_OUT):
        """LoRA (``kind="lora"``) or full fine-tuning of the same layers, same loss and steps
        (``lr``: :data:`DENSE_LR` by default)."""
        refs, prior = data
        lr = DENSE_LR[kind] if lr is None else lr
        settings = ConceptSettings(seed=seed, steps=self.steps)
        generator = torch.Generator().manual_seed(seed)
        params, factors = [], {}
        for key, weight in self.kv_weights.items():
            name = key[len(PREFIX):] + ".weight"
            out_features, in_features = weight.shape
            if kind == "lora":  # the usual init: down random, up zero (update starts at zero)
                down = (torch.randn(rank, in_features, generator=generator) / in_features ** 0.5)
                up = torch.zeros(out_features, rank)
                factors[name] = (up.requires_grad_(), down.requires_grad_())
                params += [up, down]
            else:
                delta = torch.zeros(out_features, in_features, requires_grad=True)
                factors[name] = (delta,)
                params.append(delta)
        parameters = dict(self.dit.named_parameters())

        def deltas():
            return {name: (f[0] @ f[1] if kind == "lora" else f[0]) for name, f in factors.items()}

        weights_fn = lambda: {name: parameters[name] + d for name, d in deltas().items()}
        loss_fn = flow_loss(self.dit, self.encoder, refs, prompt, settings, weights_fn, prior)
        optimizer = torch.optim.Adam(params, lr=lr)
        start = time.perf_counter()
        for step in range(settings.steps):
            loss = loss_fn(step)
            if isinstance(loss, dict):  # concept and prior parts, summed as train_atoms does
                loss = sum(loss.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        trained = {k: v.detach() for k, v in deltas().items()}
        fidelity, preservation, samples = self.score(seed, prompt, target, deltas=trained)
        count = sum(p.numel() for p in params)
        return dict(fidelity=fidelity, preservation=preservation, seconds=seconds,
                    similarity=reference_similarity(samples, refs), trainable=count, stored=count,
                    steps=settings.steps, deltas=trained)

    # -- 3 ---------------------------------------------------------------------------------
    def editing(self, seed, densities):
        """Imagic-style: atoms fine-tuned to draw one source image under the edit prompt; the
        fine-tune dominates the prompt until pruning lets the model's own digit back in."""
        source_digit, targets = [(7, ["1", "4"]), (2, ["5", "8"]), (4, ["0", "6"])][seed % 3]
        source = images_of(source_digit, 1, seed=seed)
        rankings = ("weight norm", "effect")
        rows = {(ranking, density): [] for ranking in rankings for density in densities}
        cost = []
        for target in targets:
            settings = ConceptSettings(preset="self+cross attention", atoms_per_layer=16,
                                       steps=200, lr=1e-2, budget=None, batch=8, seed=seed)
            atoms = build_dictionary(self.dit, settings)
            start = time.perf_counter()
            train_concept(self.dit, self.encoder, atoms, source, target, settings)
            seconds = time.perf_counter() - start
            measured = measure(self.dit, self.encoder, atoms, source, target, seed=seed, draws=8)
            cost.append(measured.info.effects["seconds"] / seconds)
            for ranking, ranked in zip(rankings, (atoms, measured)):
                for density in densities:
                    kept = ranked.density(density)
                    images = sample_prompts(self.dit, self.encoder, [target], 16, atoms=kept,
                                            seed=2000 + seed)[target]
                    rows[ranking, density].append(dict(
                        alignment=self.evaluator.share(images, int(target)),
                        fidelity=reference_similarity(images, source), kept=kept.n_atoms))
        mean = lambda rs: {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        return dict(curves={ranking: {d: mean(rows[ranking, d]) for d in densities}
                            for ranking in rankings}, cost=statistics.mean(cost))

    # -- 4 ---------------------------------------------------------------------------------
    def composition(self, seed):
        """Concept and style taught apart as the demo does (:mod:`digits.composition`), then
        "bold sks" with both atom sets applied: bold by the evaluator's style classifier (and, for
        comparison with the previous round, by ink above the bold images' median, a rule that
        passes only about half of real bold digits)."""
        concept_settings = ConceptSettings(seed=seed)
        style_settings = replace(concept_settings, cfg_dropout=composition.STYLE_CFG_DROPOUT)
        refs = images_of(HELD_OUT, 8, seed=seed)
        taught, threshold = [], None
        for settings, (images, prompts, prior) in (
                (concept_settings, composition.concept_data(self.dit, self.encoder, refs, seed=seed)),
                (style_settings, composition.style_data(self.dit, self.encoder, seed=seed))):
            atoms = build_dictionary(self.dit, settings)
            train_concept(self.dit, self.encoder, atoms, images, prompts, settings, prior=prior)
            taught.append(atoms.top_k(atoms.n_active))
            threshold = float(stroke_mass(images).median())  # the style's, once the loop ends
        styled = f"{STYLE_WORD} {CONCEPT_PROMPT}"
        samples = sample_prompts(self.dit, self.encoder, [styled, CONCEPT_PROMPT, f"{STYLE_WORD} 5"],
                                 64, atoms_list=taught, seed=3000 + seed)
        bold_of = self.evaluator.is_bold
        is_three = self.evaluator.classify(samples[styled]) == HELD_OUT
        return dict(both=float((is_three & bold_of(samples[styled])).float().mean()),
                    three=float(is_three.float().mean()),
                    bold=float(bold_of(samples[styled]).float().mean()),
                    bold_by_ink=float((stroke_mass(samples[styled]) > threshold).float().mean()),
                    sks_is_3=self.evaluator.share(samples[CONCEPT_PROMPT], HELD_OUT),
                    bold_without_word=float(bold_of(samples[CONCEPT_PROMPT]).float().mean()),
                    five_bold=float(bold_of(samples[f"{STYLE_WORD} 5"]).float().mean()),
                    five_is_5=self.evaluator.share(samples[f"{STYLE_WORD} 5"], 5))

    # -- 5 -------------------------------------------------------------------------------------
    def fidelity(self, seed, atoms) -> float:
        images = sample_prompts(self.dit, self.encoder, [CONCEPT_PROMPT], PER_PROMPT, atoms=atoms,
                                seed=1000 + seed)[CONCEPT_PROMPT]
        return self.evaluator.share(images, HELD_OUT)

    def effects(self, seed, data, run, draws=5):
        """The concept's atoms ``run["atoms"]`` (effects measured after training) against exact
        single-atom ablation on 256 fresh noisy references; keep / remove the top k vs k random."""
        refs, _ = data
        kept = run["atoms"]
        truth_set = random_levels(refs, CONCEPT_PROMPT, 256, seed=10_000 + seed)
        atoms_list = [(key, row) for key, layer in kept.layers.items() for row in range(layer.n_atoms)]
        truth = sc.ablation_effects(kept, predictor(self.dit, self.encoder, kept, truth_set),
                                    atoms_list, n_batches=truth_set.n_batches)
        norms = {key: layer.weight_norm() for key, layer in kept.layers.items()}
        out = dict(spearman_effect=spearman(flat(kept, kept.importance()), truth),
                   spearman_weight_norm=spearman(flat(kept, norms), truth),
                   cost=run["effects_seconds"] / run["seconds"], kept=kept.n_atoms)
        for method in ("jacobian", "taylor", "fisher"):
            alone = measure(self.dit, self.encoder, kept, refs, CONCEPT_PROMPT, seed=seed,
                            exact_top=0, method=method)
            out[f"spearman_{method}"] = spearman(flat(alone, alone.importance()), truth)
        by_norm = kept.without_effects()
        generator = torch.Generator().manual_seed(seed)
        for k in KS:
            for ranking, ranked in (("effect", kept), ("weight norm", by_norm)):
                top = ranked.top_k_mask(k)
                out[f"keep {ranking} {k}"] = self.fidelity(seed, ranked.select(top))
                out[f"remove {ranking} {k}"] = self.fidelity(
                    seed, ranked.select({key: ~mask for key, mask in top.items()}))
            keep, remove = [], []
            for _ in range(draws):
                chosen = torch.zeros(kept.n_atoms, dtype=torch.bool)
                chosen[torch.randperm(kept.n_atoms, generator=generator)[:k]] = True
                masks = dict(zip(kept.keys(), chosen.split([l.n_atoms for l in kept.layers.values()])))
                keep.append(self.fidelity(seed, kept.select(masks)))
                remove.append(self.fidelity(seed, kept.select({key: ~m for key, m in masks.items()})))
            out[f"keep random {k}"], out[f"remove random {k}"] = statistics.mean(keep), statistics.mean(remove)
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16, 24, 64, 256])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", help="default: bench/results/bench_method_<parts>.json")
    parser.add_argument("--steps", type=int, default=ConceptSettings.steps,
                        help="training steps of the concept runs (sparse, LoRA, full)")
    parser.add_argument("--samples", type=int, default=64, help="samples per concept the quality parts score")
    args = parser.parse_args()
    torch.manual_seed(0)
    bench = Bench(steps=args.steps)
    start = time.time()
    results = dict(concept={"sparse": [], "lora": [], "full": []}, sweep={}, editing=[],
                   composition=[], effects=[], budget={b: {c: [] for c in CRITERIA} for b in BUDGET_CHECK},
                   **{part: [] for part in bq.PARTS})
    densities = [1.0, 0.5, 0.3, 0.2, 0.1, 0.05]
    for seed in args.seeds:
        runs = bq.SeedRuns(bench, seed, n_samples=args.samples)  # each run trained once per seed
        data, run = runs.data(), runs.sparse
        if "concept" in args.parts:
            for budget in args.budgets:
                results["sweep"].setdefault(budget, []).append(run(budget))
            results["concept"]["sparse"].append(run(24))
            rank = bench.lora_rank_for(run(24)["stored"])
            results["lora_rank"] = rank
            results["concept"]["lora"].append(runs.dense("lora", rank))
            results["concept"]["full"].append(runs.dense("full"))
        if "budget" in args.parts:
            for budget in BUDGET_CHECK:
                for criterion in CRITERIA:
                    results["budget"][budget][criterion].append(run(budget, criterion))
        if "effects" in args.parts:
            results["effects"].append(bench.effects(seed, data, run(24)))
        if "editing" in args.parts:
            results["editing"].append(bench.editing(seed, densities))
        if "composition" in args.parts:
            results["composition"].append(bench.composition(seed))
        for part in bq.PARTS:
            if part in args.parts:
                results[part].append(bq.RUN[part](runs))
        print(f"seed {seed} done after {time.time() - start:.0f} s", flush=True)

    lines = [f"Seeds {args.seeds}; {PER_PROMPT} samples per prompt; evaluator held-out accuracy "
             f"{bench.evaluator.held_out_accuracy:.3f}. Base model (no atoms): fidelity of 'sks' "
             f"{fmt(mean_std(bench.score(s)[0] for s in args.seeds))} %, preservation "
             f"{fmt(mean_std(bench.score(s)[1] for s in args.seeds))} %."]
    for part in args.parts:
        lines += [""] + REPORTS[part](results, densities)
    lines += ["", f"Total {time.time() - start:.0f} s."]
    print("\n".join(lines))
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"bench_method_{'_'.join(args.parts)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for runs in list(results["concept"].values()) + list(results["sweep"].values()):
        for r in runs:
            for key in ("atoms", "deltas"):  # tensors: not for the JSON
                r.pop(key, None)
    for by_criterion in results["budget"].values():
        for runs in by_criterion.values():
            for r in runs:
                r.pop("atoms", None)
    with open(path, "w") as stream:
        json.dump(dict(results, seeds=args.seeds, parts=args.parts, report=lines), stream, indent=1,
                  default=str)
    print(f"JSON: {path}")


def concept_report(results, densities):
    concept, rank = results["concept"], results.get("lora_rank")
    lines = ["**Concept customization** (held-out 3 as 'sks', 8 images, cross-attention k/v):", "",
             "| method | fidelity % | preservation % | similarity to refs | trainable params | stored params | train s |",
             "|---|---|---|---|---|---|---|"]
    names = {"sparse": "sparse atoms (24 of 256 kept)", "lora": f"LoRA rank {rank}", "full": "full fine-tuning"}
    for kind, runs in concept.items():
        lines.append(f"| {names[kind]} | {fmt(mean_std(r['fidelity'] for r in runs))} | "
                     f"{fmt(mean_std(r['preservation'] for r in runs))} | "
                     f"{fmt(mean_std(r['similarity'] for r in runs), False)} | {runs[0]['trainable']} | "
                     f"{runs[0]['stored']} | {fmt(mean_std(r['seconds'] for r in runs), False)} |")
    lines += ["", "**Sparsity sweep** (atoms kept of 256):", "",
              "| atoms kept | share of atoms | fidelity % | preservation % |", "|---|---|---|---|"]
    for budget, runs in results["sweep"].items():
        kept = statistics.mean(r["kept"] for r in runs)
        lines.append(f"| {kept:.0f} | {100 * kept / 256:.1f} % | {fmt(mean_std(r['fidelity'] for r in runs))} | "
                     f"{fmt(mean_std(r['preservation'] for r in runs))} |")
    return lines


def editing_report(results, densities):
    editing = results["editing"]
    lines = ["**Editing** (atoms fine-tuned on one source image under another digit's prompt, that "
             "prompt sampled; density keeps the top atoms by weight norm | by measured effect):", "",
             "| density | atoms kept | alignment % (norm / effect) | fidelity to source (norm / effect) |",
             "|---|---|---|---|"]
    for density in densities:
        cells = []
        for key, percent in (("alignment", True), ("fidelity", False)):
            cells.append(" / ".join(fmt(mean_std(e["curves"][ranking][density][key] for e in editing), percent)
                                     for ranking in ("weight norm", "effect")))
        kept = statistics.mean(e["curves"]["effect"][density]["kept"] for e in editing)
        lines.append(f"| {100 * density:.0f} % | {kept:.0f} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Measuring the editing atoms' effects took {fmt(mean_std(e['cost'] for e in editing))} % "
                  "of their training time."]
    return lines


def composition_report(results, densities):
    composition = results["composition"]
    keys = ("both", "three", "bold", "bold_by_ink", "sks_is_3", "bold_without_word", "five_bold", "five_is_5")
    return ["**Composition** (concept atoms + style atoms taught apart, prompt 'bold sks'; bold = the "
            "evaluator's style classifier):", "",
            "| 3 and bold % | 3 % | bold % | bold by ink > bold median % | 'sks' is a 3 % | "
            "'sks' without the word: bold % | 'bold 5': bold % | 'bold 5' is a 5 % |",
            "|---|---|---|---|---|---|---|---|",
            "| " + " | ".join(fmt(mean_std(c[k] for c in composition)) for k in keys) + " |",
            "", "3 and bold per seed: " + ", ".join(f"{100 * c['both']:.0f} %" for c in composition)]


def effects_report(results, densities):
    effects = results["effects"]
    per_seed = lambda key, digits=2: ", ".join(f"{e[key]:+.{digits}f}" for e in effects)
    lines = ["**Importance vs exact single-atom ablation** (the concept's 24 atoms; truth: RMS change "
             "of the prediction for 256 fresh noisy references; Spearman per seed):", "",
             "| ranking | Spearman per seed |", "|---|---|",
             f"| stored importance (measured effect, as saved) | {per_seed('spearman_effect')} |",
             f"| weight norm | {per_seed('spearman_weight_norm')} |"]
    lines += [f"| {method} estimate alone | {per_seed('spearman_' + method)} |"
              for method in ("jacobian", "taylor", "fisher")]
    lines += ["", "**Fidelity after keeping / removing atoms** (share of 'sks' samples called 3; "
              "random: mean of 5 draws):", "",
              "| k | keep top k by effect | keep top k by weight norm | keep k random | "
              "remove top k by effect | remove top k by weight norm | remove k random |",
              "|---|---|---|---|---|---|---|"]
    for k in KS:
        lines.append(f"| {k} | " + " | ".join(
            fmt(mean_std(e[f"{action} {ranking} {k}"] for e in effects))
            for action in ("keep", "remove") for ranking in ("effect", "weight norm", "random")) + " |")
    lines += ["", f"Measuring the effects took {fmt(mean_std(e['cost'] for e in effects))} % of the "
                  "training time."]
    return lines


def budget_report(results, densities):
    lines = ["**Budget criterion** (atoms ranked during training by weight norm | by accumulated "
             "Taylor score |s dL/ds|):", "",
             "| budget | fidelity % (norm / taylor) | preservation % (norm / taylor) |", "|---|---|---|"]
    for budget, by_criterion in results["budget"].items():
        cells = [" / ".join(fmt(mean_std(r[key] for r in by_criterion[c])) for c in CRITERIA)
                 for key in ("fidelity", "preservation")]
        lines.append(f"| {budget} | {cells[0]} | {cells[1]} |")
    return lines


REPORTS = dict(concept=concept_report, editing=editing_report, composition=composition_report,
               effects=effects_report, budget=budget_report, **bq.REPORTS)


if __name__ == "__main__":
    main()
