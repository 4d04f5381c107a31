"""Quality parts of the method benchmark (``bench/bench_method.py --parts quality fewshot glyphs gap``).

Classifier fidelity saturates (every method draws 3s, even from one reference), so each trained
concept is also scored on ``n_samples`` samples of its prompt with :mod:`digits.quality`:
memorization (best correlation to the references vs to held-out real images, share closer to a
reference), diversity (mean pairwise and nearest-neighbour correlation) and the distance to the
held-out real images (Fréchet distance and MMD² in a PCA space fit once on all real digits). Every
table starts with the real held-out images themselves (leave-one-out memorization, diversity of as
many real images, real-vs-real distance of as many images: the floor a perfect generator scores).

- ``quality``: the 3 as "sks" from 8 references: sparse atoms at budgets 4/8/24/none vs LoRA ranks
  1/3/8/16 (3 matches budget 24's stored parameters, 16 the sparse atoms' trainable ones) vs full
  fine-tuning;
- ``fewshot``: 1/2/4/8 references: sparse (budget 24), LoRA at the rank whose stored parameters
  are closest to it, full fine-tuning;
- ``glyphs``: two glyphs the model never saw (:mod:`digits.glyphs`: "zq" = X, "vx" = triangle),
  8 references each, scored by template correlation and distance to held-out drawings;
- ``gap``: what closes the budget's quality cost: budget 24 vs none, 2x steps, atoms fixed
  (``train_atoms`` off), 64 atoms per layer, other dictionary methods, budget by weight norm.

Training runs are shared between parts within a seed (:class:`SeedRuns`); LoRA and full
fine-tuning train the same layers with the same loss, steps and prior as the sparse atoms.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from digits import glyphs
from digits.concept import prior_set, sample_prompts
from digits.data import images_of, load_digits
from digits.prompts import CONCEPT_PROMPT, HELD_OUT, TRAINED_DIGITS
from digits.quality import (FeatureSpace, distance, diversity, memorization, real_diversity, real_floor,
                            real_memorization, template_correlation)

PARTS = ("quality", "fewshot", "glyphs", "gap")
N_REFERENCES = 8
SPARSE_BUDGETS = (4, 8, 24, None)  # None: no budget, every atom kept
LORA_RANKS = (1, 3, 8, 16)
FEWSHOT = (1, 2, 4, 8)
GLYPH_CONCEPTS = {"zq": "x", "vx": "triangle"}  # prompt word -> glyph of digits.glyphs
GLYPH_HELD_OUT = 192
GLYPH_BUDGETS, GLYPH_RANKS = (24, None), (1, 3)
GAP_VARIANTS = {  # label -> SeedRuns.sparse arguments; "steps_factor" multiplies the bench's steps
    "budget 24 (default)": {}, "no budget": dict(budget=None),
    "budget 24, 2x steps": dict(steps_factor=2),
    "budget 24, atoms fixed (train_atoms off)": dict(train_atoms=False),
    "budget 24, 64 atoms per layer": dict(atoms_per_layer=64),
    "budget 24, dictionary 'sparse'": dict(method="sparse"),
    "budget 24, dictionary 'random'": dict(method="random"),
    "budget 24, budget by weight norm": dict(criterion="weight norm"),
}


def mean_std(values):
    values = list(values)
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(pair, percent=True):
    mean, std = pair
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3g} ± {std:.2g}"


@dataclass
class Target:
    """What a concept should draw: ``prompt``, training ``references (n_refs, 1, 8, 8)``, real
    ``held_out (m, 1, 8, 8)`` images of it (never references), the ``digit`` the classifier should
    call it (None for glyphs) and the clean ``template (1, 1, 8, 8)`` (None for digits)."""

    prompt: str
    references: torch.Tensor
    held_out: torch.Tensor
    digit: int | None = None
    template: torch.Tensor | None = None


class SeedRuns:
    """One seed's data and training runs, each run trained once and shared by every part."""

    def __init__(self, bench, seed: int, n_samples: int = 64):
        self.bench, self.seed, self.n_samples = bench, seed, n_samples
        self.prior = prior_set(bench.dit, bench.encoder, TRAINED_DIGITS, 16, seed=500 + seed)
        self.space = FeatureSpace.of_digits()
        self._runs = {}

    def target(self, concept: str = CONCEPT_PROMPT, n_refs: int = N_REFERENCES) -> Target:
        """The held-out 3 as ``concept`` "sks" (held out: every other real 3), or a glyph concept."""
        if concept == CONCEPT_PROMPT:
            pool = int((load_digits()[1] == HELD_OUT).sum())
            return Target(concept, images_of(HELD_OUT, n_refs, seed=self.seed),
                          images_of(HELD_OUT, pool - n_refs, seed=self.seed, offset=n_refs), digit=HELD_OUT)
        if concept not in GLYPH_CONCEPTS:
            raise ValueError(f"concept must be {CONCEPT_PROMPT!r} or one of {list(GLYPH_CONCEPTS)}, got {concept!r}")
        glyph = GLYPH_CONCEPTS[concept]
        return Target(concept, glyphs.references(glyph, n_refs, seed=self.seed),
                      glyphs.held_out(glyph, GLYPH_HELD_OUT), template=glyphs.template(glyph))

    def data(self, concept: str = CONCEPT_PROMPT, n_refs: int = N_REFERENCES):
        """``(references, prior)`` as :class:`Bench` trains on them."""
        return self.target(concept, n_refs).references, self.prior

    def sparse(self, budget=24, criterion="taylor", *, concept=CONCEPT_PROMPT, n_refs=N_REFERENCES, **overrides):
        """:meth:`Bench.sparse` on this seed's ``concept`` data (``overrides``: ConceptSettings fields)."""
        key = ("sparse", budget, criterion, concept, n_refs, tuple(sorted(overrides.items())))
        if key not in self._runs:
            self._runs[key] = self.bench.sparse(self.seed, budget, self.data(concept, n_refs), criterion,
                                                prompt=concept, target=self.target(concept).digit, **overrides)
        return self._runs[key]

    def dense(self, kind, rank=None, *, concept=CONCEPT_PROMPT, n_refs=N_REFERENCES):
        """:meth:`Bench.dense` (``kind`` "lora" or "full") on this seed's ``concept`` data."""
        key = ("dense", kind, rank, concept, n_refs)
        if key not in self._runs:
            self._runs[key] = self.bench.dense(self.seed, kind, rank, self.data(concept, n_refs),
                                               prompt=concept, target=self.target(concept).digit)
        return self._runs[key]

    # -- scoring ------------------------------------------------------------------------------
    def evaluate(self, run: dict, target: Target) -> dict:
        """A trained run scored on ``n_samples`` fresh samples of its prompt: fidelity (digits) or
        template correlation (glyphs), memorization, diversity, distance to the held-out images."""
        applied = {key: run[key] for key in ("atoms", "deltas") if key in run}
        samples = sample_prompts(self.bench.dit, self.bench.encoder, [target.prompt], self.n_samples,
                                 seed=4000 + self.seed, **applied)[target.prompt]
        memo = memorization(samples, target.references, target.held_out)
        spread, far = diversity(samples), distance(samples, target.held_out, self.space)
        row = dict(trainable=run["trainable"], stored=run["stored"], steps=run["steps"], seconds=run["seconds"],
                   preservation=run["preservation"], **self._fidelity(samples, target))
        return dict(row, to_references=memo.to_references, to_held_out=memo.to_held_out,
                    closer=memo.closer_to_references, pairwise=spread.mean_pairwise,
                    nearest=spread.nearest_neighbour, frechet=far.frechet, mmd2=far.mmd2)

    def real(self, target: Target) -> dict:
        """The held-out real images scored like samples: leave-one-out memorization, diversity and
        distance of ``n_samples`` of them (the floor)."""
        memo = real_memorization(target.references, target.held_out)
        spread = real_diversity(target.held_out, self.n_samples, seed=self.seed)
        floor = real_floor(target.held_out, self.n_samples, self.space, seed=self.seed)
        return dict(self._fidelity(target.held_out, target), to_references=memo.to_references,
                    to_held_out=memo.to_held_out, closer=memo.closer_to_references,
                    pairwise=spread.mean_pairwise, nearest=spread.nearest_neighbour,
                    frechet=floor.frechet, mmd2=floor.mmd2)

    def _fidelity(self, images, target: Target) -> dict:
        if target.digit is not None:
            return dict(fidelity=self.bench.evaluator.share(images, target.digit))
        return dict(template=template_correlation(images, target.template))


# -- the parts: each returns one seed's {row label: metrics} (glyphs, fewshot: one level deeper) --
def quality(runs: SeedRuns) -> dict:
    target = runs.target()
    rows = {"real held-out 3s": runs.real(target)}
    for budget in SPARSE_BUDGETS:
        rows[f"sparse atoms, {'no budget' if budget is None else f'budget {budget}'}"] = \
            runs.evaluate(runs.sparse(budget), target)
    for rank in LORA_RANKS:
        rows[f"LoRA rank {rank}"] = runs.evaluate(runs.dense("lora", rank), target)
    rows["full fine-tuning"] = runs.evaluate(runs.dense("full"), target)
    return rows


def fewshot(runs: SeedRuns) -> dict:
    out = {}
    for n_refs in FEWSHOT:
        target = runs.target(n_refs=n_refs)
        sparse = runs.sparse(24, n_refs=n_refs)
        rank = runs.bench.lora_rank_for(sparse["stored"])
        out[n_refs] = {"real held-out 3s": runs.real(target),
                       "sparse atoms, budget 24": runs.evaluate(sparse, target),
                       "LoRA, equal stored": dict(runs.evaluate(runs.dense("lora", rank, n_refs=n_refs), target),
                                                  rank=rank),
                       "full fine-tuning": runs.evaluate(runs.dense("full", n_refs=n_refs), target)}
    return out


def glyph_part(runs: SeedRuns) -> dict:
    out = {}
    for concept, glyph in GLYPH_CONCEPTS.items():
        target = runs.target(concept)
        rows = {f"real held-out {glyph}": runs.real(target)}
        for budget in GLYPH_BUDGETS:
            rows[f"sparse atoms, {'no budget' if budget is None else f'budget {budget}'}"] = \
                runs.evaluate(runs.sparse(budget, concept=concept), target)
        for rank in GLYPH_RANKS:
            rows[f"LoRA rank {rank}"] = runs.evaluate(runs.dense("lora", rank, concept=concept), target)
        rows["full fine-tuning"] = runs.evaluate(runs.dense("full", concept=concept), target)
        out[concept] = rows
    return out


def gap(runs: SeedRuns) -> dict:
    target = runs.target()
    rows = {"real held-out 3s": runs.real(target)}
    for label, variant in GAP_VARIANTS.items():
        overrides = {"budget": 24, **variant}
        if "steps_factor" in overrides:
            overrides["steps"] = overrides.pop("steps_factor") * runs.bench.steps
        rows[label] = runs.evaluate(runs.sparse(**overrides), target)
    return rows


RUN = dict(quality=quality, fewshot=fewshot, glyphs=glyph_part, gap=gap)

# -- reports -----------------------------------------------------------------------------------
COLUMNS = {  # key -> (header, format of (mean, std))
    "trainable": ("trainable", lambda p: f"{p[0]:.0f}"),
    "stored": ("stored", lambda p: f"{p[0]:.0f}"),
    "fidelity": ("fidelity %", fmt),
    "template": ("template corr", lambda p: f"{p[0]:.3f} ± {p[1]:.3f}"),
    "preservation": ("preservation %", fmt),
    "to_references": ("best corr to refs", lambda p: f"{p[0]:.3f} ± {p[1]:.3f}"),
    "to_held_out": ("best corr to held-out", lambda p: f"{p[0]:.3f} ± {p[1]:.3f}"),
    "closer": ("closer to a ref %", fmt),
    "pairwise": ("pairwise corr", lambda p: f"{p[0]:.3f} ± {p[1]:.3f}"),
    "nearest": ("nearest-neighbour corr", lambda p: f"{p[0]:.3f} ± {p[1]:.3f}"),
    "frechet": ("Fréchet", lambda p: fmt(p, False)),
    "mmd2": ("MMD² ×100", lambda p: f"{100 * p[0]:.2f} ± {100 * p[1]:.2f}"),
    "steps": ("steps", lambda p: f"{p[0]:.0f}"),
    "seconds": ("train s", lambda p: f"{p[0]:.0f}"),
}
ALL = ("trainable", "stored", "fidelity", "template", "preservation", "to_references", "to_held_out",
       "closer", "pairwise", "nearest", "frechet", "mmd2", "seconds")


def table(per_seed: list[dict], columns=ALL, first="method") -> list[str]:
    """Markdown rows of ``per_seed`` (one ``{label: metrics}`` per seed), mean ± std over seeds;
    columns no row has are left out, cells a row lacks are "–"."""
    labels = list(per_seed[0])
    columns = [c for c in columns if any(seed[label].get(c) is not None for seed in per_seed for label in labels)]
    lines = ["| " + " | ".join([first] + [COLUMNS[c][0] for c in columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for label in labels:
        cells = []
        for column in columns:
            values = [seed[label][column] for seed in per_seed if seed[label].get(column) is not None]
            cells.append(COLUMNS[column][1](mean_std(values)) if values else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


FLOOR_NOTE = ("First row: the real held-out images scored as if samples (memorization leave-one-out, "
              "diversity and distance of as many real images as samples vs the rest: the floor; its "
              "fidelity is the evaluator's on real 3s, most of which it was fit on). Distances in a "
              "fixed 8-component PCA space of all real digits; lower is closer.")


def quality_report(results, densities=None):
    return ["**Quality** (held-out 3 as 'sks', 8 references; samples of 'sks' against the other real 3s):", "",
            *table(results["quality"]), "", FLOOR_NOTE]


def fewshot_report(results, densities=None):
    lines = ["**Few-shot** (references 1/2/4/8; sparse budget 24, LoRA at the rank of equal stored "
             "parameters, full fine-tuning):"]
    for n_refs in results["fewshot"][0]:
        ranks = sorted({seed[n_refs]["LoRA, equal stored"]["rank"] for seed in results["fewshot"]})
        lines += ["", f"{n_refs} reference(s) (LoRA rank {'/'.join(map(str, ranks))}):", "",
                  *table([seed[n_refs] for seed in results["fewshot"]])]
    return lines + ["", FLOOR_NOTE]


def glyphs_report(results, densities=None):
    lines = ["**Unseen glyphs** (8 jittered references each; template correlation = mean correlation "
             "with the clean glyph):"]
    for concept, glyph in GLYPH_CONCEPTS.items():
        lines += ["", f"'{concept}' = {glyph}:", "", *table([seed[concept] for seed in results["glyphs"]])]
    return lines + ["", FLOOR_NOTE]


def gap_report(results, densities=None):
    columns = ("trainable", "stored", "steps", "fidelity", "preservation", "to_references", "closer",
               "pairwise", "frechet", "mmd2", "seconds")
    return ["**Closing the budget's quality cost** (sparse atoms on 'sks', 8 references):", "",
            *table(results["gap"], columns, first="variant"), "", FLOOR_NOTE]


REPORTS = dict(quality=quality_report, fewshot=fewshot_report, glyphs=glyphs_report, gap=gap_report)
