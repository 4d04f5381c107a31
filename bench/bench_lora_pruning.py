"""Pruning an existing LoRA by measured effect: how much of the LoRA's effect its top 25 % atoms keep.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_lora_pruning.py [--seeds 0 1 2] [--keep 0.25]

The pipeline of ``workflows/digits_lora_pruning.json``, node by node: ComfyUI's own Train LoRA
node (``TrainLoraNode``) trains a LoRA on the digits model (the held-out 3, 8 images, prompt
``sks``); LoRA to Sparse Atoms atomizes it (SVD of each layer's delta W); Measure Atom Effects
measures every atom's effect on the training images; the top 25 % of atoms by that effect are
kept. For comparison: the top 25 % by weight norm (for an atomized LoRA: the singular values, i.e.
the best low-rank approximation per layer) and random 25 % (5 draws).

Two views, on data no step above saw:

- **prediction**: the model's predictions for 8 *other* images of 3 at 4 noise levels (fixed
  noise); a variant keeps ``1 - rms(f_variant - f_full) / rms(f_full - f_base)`` of the full
  LoRA's effect (1 = the same predictions as the full LoRA, 0 = no better than the base model).
  ``full`` is the LoRA as the stock loader applies it; the atoms cover its linear weights only
  (the stock trainer also trains biases, which are not atoms), so "all atoms" is reported too.
- **evaluator**: the share of 64 samples for ``sks`` (KSampler, euler, 24 steps, cfg 3) that the
  independent digit classifier reads as a 3.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_comfy import _comfy, _our_nodes  # noqa: E402

LORA = dict(batch_size=8, steps=300, grad_accumulation_steps=1, learning_rate=3e-3, rank=4,
            optimizer="AdamW", loss_function="MSE", training_dtype="fp32", lora_dtype="fp32",
            algorithm="LoRA", gradient_checkpointing=False, existing_lora="[None]")
SAMPLES = 64


def run_seed(seed: int, keep: float, nodes_by_id) -> dict:
    import torch
    import nodes as comfy_nodes
    from comfy_extras.nodes_train import TrainLoraNode, LoraModelLoader

    from host_support import run_node
    from digits.data import images_of
    from digits.evaluator import DigitEvaluator

    effects = _module(nodes_by_id, "effects")

    node = lambda name, **inputs: run_node(nodes_by_id[f"SparseAtoms_{name}"], **inputs)
    model = node("LoadDigitsModel")[0]
    latents, conds = node("DigitExamples", digits="3", per_digit=8, seed=0, style="plain",
                          prompt="sks").args
    positive, negative = node("DigitPrompt", prompt="sks")[0], node("DigitPrompt", prompt="")[0]
    torch.manual_seed(seed)  # the stock trainer draws batches and noise levels from torch's global RNG
    started = time.perf_counter()
    with torch.inference_mode():
        lora = TrainLoraNode().train(model, latents, conds, seed=seed, **LORA)[1]
    lora_seconds = time.perf_counter() - started
    atoms = node("FromLoRA", model=model, lora_name="[None]", lora=lora)[0]
    measured = node("MeasureEffects", model=model, sparse_atoms=atoms, positive=positive,
                    negative=negative, latent={"samples": torch.zeros(1, 1, 8, 8)},
                    calibration_latents=latents, calibration_conditioning=conds,
                    calibration_images=8, noise_levels=4, batch_size=8, exact_top=16, top_n=0,
                    alone_strength=1.0, seed=seed, steps=24, cfg=3.0, sampler_name="euler",
                    scheduler="simple")[0]
    count = math.ceil(keep * atoms.n_atoms)
    generator = torch.Generator().manual_seed(seed)
    random_masks = []
    for _ in range(5):
        order = torch.randperm(atoms.n_atoms, generator=generator)[:count]
        flat = torch.zeros(atoms.n_atoms, dtype=torch.bool)
        flat[order] = True
        random_masks.append(dict(zip(atoms.keys(), flat.split([l.n_atoms for l in atoms.layers.values()]))))
    apply = lambda chosen: node("Apply", model=model, sparse_atoms=chosen, strength=1.0, density=1.0)[0]
    with torch.inference_mode():
        full = LoraModelLoader().load_lora_model(model, lora, 1.0)[0]
    variants = {
        "base model": model, "full LoRA": full, "all atoms": apply(atoms),
        f"top {keep:.0%} by effect": apply(measured.top_k(count)),
        f"top {keep:.0%} by weight norm": apply(atoms.top_k(count)),
    }
    randoms = [apply(atoms.select(mask)) for mask in random_masks]

    held_out = images_of(3, 8, seed=0, offset=8)  # not among the training images
    calibration = effects.Calibration(held_out, conds[:1], noise_levels=4, seed=1000 + seed)
    outputs = {name: effects.predictions(patched, calibration) for name, patched in variants.items()}
    random_outputs = [effects.predictions(patched, calibration) for patched in randoms]
    rms = lambda x: float(x.pow(2).mean().sqrt())
    base = outputs["base model"]

    def kept(output, reference: str) -> float:
        """Share of ``reference``'s change of the prediction that ``output`` keeps."""
        return 1 - rms(output - outputs[reference]) / rms(outputs[reference] - base)

    evaluator = DigitEvaluator.fit()
    empty = {"samples": torch.zeros(SAMPLES, 1, 8, 8)}

    def threes(patched) -> float:
        with torch.inference_mode():
            samples = comfy_nodes.common_ksampler(patched, seed, 24, 3.0, "euler", "simple",
                                                  positive, negative, empty)[0]["samples"]
        return evaluator.share(samples, 3)

    row = lambda output, patched: (kept(output, "full LoRA"), kept(output, "all atoms"), threes(patched))
    rows = {name: row(outputs[name], patched) for name, patched in variants.items()}
    random_rows = [row(output, patched) for output, patched in zip(random_outputs, randoms)]
    rows[f"random {keep:.0%} (mean of 5)"] = tuple(statistics.mean(v) for v in zip(*random_rows))
    return {"rows": rows, "atoms": atoms.n_atoms, "kept": count, "lora_seconds": lora_seconds,
            "effects_seconds": measured.info.effects["seconds"],
            "lora_change": rms(outputs["full LoRA"] - base)}


def _module(nodes_by_id, name: str):
    """Our ``nodes.<name>`` module as ComfyUI's custom-node loader imported it."""
    package = nodes_by_id["SparseAtoms_MeasureEffects"].__module__.rpartition(".")[0]
    return importlib.import_module(f"{package}.{name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", type=float, default=0.25)
    args = parser.parse_args()
    _comfy()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars from the trainer and the sampler
    nodes_by_id = _our_nodes()
    results = {seed: run_seed(seed, args.keep, nodes_by_id) for seed in args.seeds}
    first = results[args.seeds[0]]
    print(f"TrainLoraNode: rank {LORA['rank']}, {LORA['steps']} steps, batch {LORA['batch_size']}, "
          f"lr {LORA['learning_rate']} -> {first['atoms']} atoms; keeping {first['kept']}")
    print("Share of the full LoRA's / of all its atoms' change of the prediction kept, and share "
          "of samples read as a 3, per seed:")
    print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds)
          + " | mean: LoRA effect kept | atoms' effect kept | 3s |")
    print("|---|" + "---|" * (len(args.seeds) + 3))
    for name in first["rows"]:
        cells = [results[s]["rows"][name] for s in args.seeds]
        means = [statistics.mean(column) for column in zip(*cells)]
        print(f"| {name} | " + " | ".join(f"{a:.0%} / {b:.0%} / {t:.0%}" for a, b, t in cells)
              + " | " + " | ".join(f"**{m:.0%}**" for m in means) + " |")
    for s in args.seeds:
        r = results[s]
        print(f"seed {s}: LoRA trained in {r['lora_seconds']:.1f} s, effects measured in "
              f"{r['effects_seconds']:.1f} s ({r['effects_seconds'] / r['lora_seconds']:.0%}); "
              f"rms prediction change of the LoRA {r['lora_change']:.4f}")


if __name__ == "__main__":
    main()
