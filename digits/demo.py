"""The demo: teach the shipped digits model the held-out digit 3 and the held-out style "bold"
with a few sparse atoms each, then compose them.

    python -m digits.demo --out demo_out

Builds a dictionary on the cross-attention k/v projections, trains sparse atoms for 3 from eight
reference images bound to the unused word "sks" (also after each attribute word the model knows,
the references transformed to match; with prior preservation on the other digits and words;
the atom budget ranks atoms by accumulated |s dL/ds|), measures each kept atom's effect (how much
the prediction for "sks" changes without it; the saved atoms are ranked by it). Then trains a
second set of atoms the same way for the style: bold versions of other digits under
"bold <digit>" (the base model never saw the word or a bold image). Samples every digit and
"sks" with the concept atoms applied, and "bold sks" with both sets applied (as two chained Apply
nodes do). Prints a short report: fidelity (share of "sks" samples the evaluator calls 3),
composition (share of "bold sks" samples that are 3s and bold, by the evaluator's digit and
style classifiers), preservation (evaluator accuracy on the nine trained digits with the atoms
applied, against the base model), atoms kept, trainable parameters, file size, the cost of
measuring the effects relative to training, time.
Writes report.json, before/after grids, the importance heat-map, both atoms files and every
sample under samples/<prompt>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

import sparse_core as sc

from .checkpoint import MODEL_PATH, load_model
from . import composition
from .concept import ConceptSettings, build_dictionary, sample_prompts, train_concept
from .data import images_of
from .effects import measure
from .evaluator import DigitEvaluator, reference_similarity
from .images import grid, save_each
from .prompts import COMPOSED_PROMPT, CONCEPT_PROMPT, DIGITS, HELD_OUT, STYLE_WORD, TRAINED_DIGITS


def run(out: str, *, settings: ConceptSettings, references: int = 8, per_prompt: int = 32,
        model_path=MODEL_PATH, quiet: bool = False) -> dict:
    start = time.time()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    torch.manual_seed(settings.seed)
    os.makedirs(out, exist_ok=True)
    dit, encoder, _ = load_model(model_path)
    evaluator = DigitEvaluator.fit()
    refs = images_of(HELD_OUT, references, seed=settings.seed)
    say(f"evaluator held-out accuracy {evaluator.held_out_accuracy:.3f}; "
        f"{references} reference images of {HELD_OUT}, bound to {CONCEPT_PROMPT!r}")

    prompts = [CONCEPT_PROMPT, *DIGITS]
    before = sample_prompts(dit, encoder, prompts, per_prompt, seed=settings.seed + 1)
    images, prompts_taught, prior = composition.concept_data(dit, encoder, refs, seed=settings.seed)
    atoms = build_dictionary(dit, settings)
    say(f"dictionary: {len(atoms)} layers ({settings.preset}), {atoms.n_atoms} atoms "
        f"({settings.method}); training {settings.steps} steps, budget {settings.budget} atoms")
    train_start = time.perf_counter()
    result = train_concept(dit, encoder, atoms, images, prompts_taught, settings, prior=prior)
    training_seconds = time.perf_counter() - train_start
    if result.stopped:
        say(f"training stopped early: {result.stopped}")
    atoms = measure(dit, encoder, atoms, refs, CONCEPT_PROMPT, seed=settings.seed)
    kept = _nonzero(atoms)
    style_images, style_prompts, style_prior = composition.style_data(dit, encoder, seed=settings.seed)
    style_settings = dataclasses.replace(settings, cfg_dropout=composition.STYLE_CFG_DROPOUT)
    style = build_dictionary(dit, style_settings)
    say(f"style: {len(style_images)} bold images of other digits under '{STYLE_WORD} <digit>'")
    style_result = train_concept(dit, encoder, style, style_images, style_prompts, style_settings,
                                 prior=style_prior)
    style_kept = _nonzero(style)
    after = sample_prompts(dit, encoder, prompts, per_prompt, atoms=kept, seed=settings.seed + 1)
    after.update(sample_prompts(dit, encoder, [COMPOSED_PROMPT], per_prompt, atoms_list=[kept, style_kept],
                                seed=settings.seed + 1))

    path = os.path.join(out, "sks_atoms.safetensors")
    sc.save_atoms(kept, path, overwrite=True)  # the demo's own output folder
    sc.save_atoms(style_kept, os.path.join(out, f"{STYLE_WORD}_atoms.safetensors"), overwrite=True)
    for prompt, images in after.items():
        save_each(images, os.path.join(out, "samples", prompt))
    grid([refs, before[CONCEPT_PROMPT][:16], after[CONCEPT_PROMPT][:16]]).save(
        os.path.join(out, "concept_before_after.png"))
    grid([style_images[:16], after[COMPOSED_PROMPT][:16]]).save(os.path.join(out, "composition.png"))
    grid([after[p][:16] for p in prompts]).save(os.path.join(out, "per_prompt_after.png"))
    grid([before[p][:16] for p in prompts]).save(os.path.join(out, "per_prompt_before.png"))
    table = sc.importance_table(atoms, kept={k: set(l.index.tolist()) for k, l in kept.layers.items()})
    from PIL import Image
    Image.fromarray(sc.importance_heatmap(table).numpy()).save(os.path.join(out, "importance.png"))

    trainable = atoms.n_parameters(atoms=settings.train_atoms, readouts=False)  # readouts stay fixed
    report = {
        "concept_prompt": CONCEPT_PROMPT,
        "concept_digit": HELD_OUT,
        "fidelity": evaluator.share(after[CONCEPT_PROMPT], HELD_OUT),
        "fidelity_before": evaluator.share(before[CONCEPT_PROMPT], HELD_OUT),
        "reference_similarity": reference_similarity(after[CONCEPT_PROMPT], refs),
        "composed_prompt": COMPOSED_PROMPT,
        "composition": _both(evaluator, after[COMPOSED_PROMPT]),
        "composed_digit_share": evaluator.share(after[COMPOSED_PROMPT], HELD_OUT),
        "composed_bold_share": float(evaluator.is_bold(after[COMPOSED_PROMPT]).float().mean()),
        "concept_bold_share": float(evaluator.is_bold(after[CONCEPT_PROMPT]).float().mean()),
        "style_atoms_kept": style_kept.n_atoms,
        "style_training_stopped": style_result.stopped,
        "preservation": evaluator.accuracy({d: after[d] for d in TRAINED_DIGITS}),
        "preservation_base_model": evaluator.accuracy({d: before[d] for d in TRAINED_DIGITS}),
        "atoms_kept": kept.n_atoms,
        "atoms_total": atoms.n_atoms,
        "layers": len(atoms),
        "trainable_parameters": trainable,
        "stored_parameters": kept.n_parameters(),
        "file_bytes": os.path.getsize(path),
        "training_steps": result.steps_done,
        "training_stopped": result.stopped,
        "final_loss": result.final_loss,
        "training_seconds": round(training_seconds, 2),
        "effects_seconds": atoms.info.effects["seconds"],
        "effects": atoms.info.effects,
        "evaluator_held_out_accuracy": evaluator.held_out_accuracy,
        "style_evaluator_held_out_accuracy": evaluator.style_held_out_accuracy,
        "samples_per_prompt": per_prompt,
        "seconds": round(time.time() - start, 1),
        "settings": vars(settings),
    }
    with open(os.path.join(out, "report.json"), "w") as stream:
        json.dump(report, stream, indent=1)
    say(_summary(report, out))
    return report


def _nonzero(atoms: sc.SparseAtoms) -> sc.SparseAtoms:
    """The atoms the budget kept (non-zero coefficients)."""
    return atoms.select({key: layer.coefficients != 0 for key, layer in atoms.layers.items()})


def _both(evaluator: DigitEvaluator, images: torch.Tensor) -> float:
    """Share of ``images`` that are bold 3s."""
    return float(((evaluator.classify(images) == HELD_OUT) & evaluator.is_bold(images)).float().mean())


def _summary(r, out):
    return "\n".join([
        f"fidelity      {r['fidelity']:.0%} of {r['concept_prompt']!r} samples are {r['concept_digit']}s "
        f"(before training: {r['fidelity_before']:.0%})",
        f"composition   {r['composition']:.0%} of {r['composed_prompt']!r} samples are bold "
        f"{r['concept_digit']}s ({r['composed_digit_share']:.0%} are {r['concept_digit']}s, "
        f"{r['composed_bold_share']:.0%} bold; {r['concept_bold_share']:.0%} of "
        f"{r['concept_prompt']!r} without the word are bold)",
        f"preservation  {r['preservation']:.1%} on the nine trained digits with the atoms applied "
        f"(base model: {r['preservation_base_model']:.1%})",
        f"atoms         {r['atoms_kept']} kept of {r['atoms_total']} in {r['layers']} layers "
        f"(style: {r['style_atoms_kept']})",
        f"parameters    {r['trainable_parameters']} trained, {r['stored_parameters']} stored; "
        f"file {r['file_bytes'] / 1024:.1f} KiB",
        f"importance    measured effects ({r['effects']['method']}): {r['effects_seconds']:.2f} s, "
        f"{100 * r['effects_seconds'] / r['training_seconds']:.1f} % of the training time",
        f"time          {r['seconds']} s; outputs in {out}/",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--steps", type=int, default=ConceptSettings.steps)
    parser.add_argument("--budget", type=int, default=ConceptSettings.budget,
                        help="atoms kept over the model; 0: no budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32, help="samples per prompt (>= 32)")
    args = parser.parse_args()
    settings = ConceptSettings(steps=args.steps, budget=args.budget or None, seed=args.seed)
    run(args.out, settings=settings, per_prompt=args.samples)


if __name__ == "__main__":
    main()
