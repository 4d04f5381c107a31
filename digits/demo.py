"""The demo: teach the shipped digits model the held-out digit 3 with a few sparse atoms.

    python -m digits.demo --out demo_out

Builds a dictionary on the cross-attention k/v projections, trains sparse atoms for 3 from eight
reference images bound to the unused word "sks" (with prior preservation on the other digits;
the atom budget ranks atoms by accumulated |s dL/ds|), measures each kept atom's effect (how much
the prediction for "sks" changes without it; the saved atoms are ranked by it), samples every
prompt with the atoms applied, and prints a short report: fidelity (share of "sks" samples the
evaluator calls 3), preservation (evaluator accuracy on the nine trained digits with the atoms
applied, against the base model), atoms kept, trainable parameters, file size, the cost of
measuring the effects relative to training, time.
Writes report.json, before/after grids, the importance heat-map, the atoms file and every sample
under samples/<prompt>/.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import sparse_core as sc

from .checkpoint import MODEL_PATH, load_model
from .concept import ConceptSettings, build_dictionary, prior_set, sample_prompts, train_concept
from .data import images_of
from .effects import measure
from .evaluator import DigitEvaluator, reference_similarity
from .images import grid, save_each
from .prompts import CONCEPT_PROMPT, DIGITS, HELD_OUT, TRAINED_DIGITS


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
    prior = prior_set(dit, encoder, TRAINED_DIGITS, 16, seed=settings.seed + 2)
    atoms = build_dictionary(dit, settings)
    say(f"dictionary: {len(atoms)} layers ({settings.preset}), {atoms.n_atoms} atoms "
        f"({settings.method}); training {settings.steps} steps, budget {settings.budget} atoms")
    train_start = time.perf_counter()
    result = train_concept(dit, encoder, atoms, refs, CONCEPT_PROMPT, settings, prior=prior)
    training_seconds = time.perf_counter() - train_start
    if result.stopped:
        say(f"training stopped early: {result.stopped}")
    atoms = measure(dit, encoder, atoms, refs, CONCEPT_PROMPT, seed=settings.seed)
    kept = atoms.select({key: layer.coefficients != 0 for key, layer in atoms.layers.items()})
    after = sample_prompts(dit, encoder, prompts, per_prompt, atoms=kept, seed=settings.seed + 1)

    path = os.path.join(out, "sks_atoms.safetensors")
    sc.save_atoms(kept, path, overwrite=True)  # the demo's own output folder
    for prompt, images in after.items():
        save_each(images, os.path.join(out, "samples", prompt))
    grid([refs, before[CONCEPT_PROMPT][:16], after[CONCEPT_PROMPT][:16]]).save(
        os.path.join(out, "concept_before_after.png"))
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
        "samples_per_prompt": per_prompt,
        "seconds": round(time.time() - start, 1),
        "settings": vars(settings),
    }
    with open(os.path.join(out, "report.json"), "w") as stream:
        json.dump(report, stream, indent=1)
    say(_summary(report, out))
    return report


def _summary(r, out):
    return "\n".join([
        f"fidelity      {r['fidelity']:.0%} of {r['concept_prompt']!r} samples are {r['concept_digit']}s "
        f"(before training: {r['fidelity_before']:.0%})",
        f"preservation  {r['preservation']:.1%} on the nine trained digits with the atoms applied "
        f"(base model: {r['preservation_base_model']:.1%})",
        f"atoms         {r['atoms_kept']} kept of {r['atoms_total']} in {r['layers']} layers",
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
