"""Time per training step of Train Sparse Concept, this checkout against an earlier revision,
measured in the same run: does what the trainer gained cost the default run anything?

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_train_step.py [--baseline 95b960d]
        [--steps 300] [--repeats 3]

The run is the shipped digits concept graph's training (eight 3s as "sks", 36 prior images,
batch 8, atom budget 24, 300 steps) on the digits model, through the node as ComfyUI loads it.
Each measurement is its own process, loading one tree of the extension (the baseline revision is
exported with ``git archive`` into a temporary folder); runs alternate baseline / now so that a
slower minute of the machine hits both. Time per step is read off ComfyUI's progress hook, which
the node calls after every step: ``(t_last - t_first) / (steps - 1)``, so loading, building the
dictionary and measuring effects afterwards are not in it. A third variant (this checkout only)
samples 8 images of "sks" every 50 steps with Sparse Training Samples (24 Euler steps, cfg 3):
the cost of watching a run. Run it with nothing else busy: on 2 cores a second process makes
torch several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def child(tree: str, steps: int, with_samples: bool) -> dict:
    """In a fresh process: load the extension from ``tree`` into ComfyUI, train, time the steps."""
    import asyncio
    import time

    comfy_path = os.path.abspath(os.environ["COMFYUI_PATH"])
    sys.path.insert(0, comfy_path)
    sys.modules.pop("nodes", None)
    from comfy.cli_args import args

    args.cpu = True
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    import comfy.utils
    import folder_paths
    import nodes
    from comfy_api.latest import io

    base = tempfile.mkdtemp(prefix="bench_train_step_")
    folder_paths.set_output_directory(os.path.join(base, "output"))
    folder_paths.set_temp_directory(os.path.join(base, "temp"))
    folder_paths.models_dir = os.path.join(base, "models")
    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(tree, ignore=before)), f"{tree} did not load"
    classes = nodes.NODE_CLASS_MAPPINGS

    def run(node_id, **inputs):
        prepared = classes[node_id].PREPARE_CLASS_CLONE({io.Hidden.unique_id: "1"})
        with torch.inference_mode():
            return prepared.execute(**inputs)

    model = run("SparseAtoms_LoadDigitsModel")[0]
    latent, conds = run("SparseAtoms_DigitExamples", digits="3", per_digit=8, seed=0,
                        style="plain", prompt="sks")
    prior, prior_conds = run("SparseAtoms_DigitExamples", digits="0,1,2,4,5,6,7,8,9", per_digit=4,
                             seed=1, style="plain", prompt="")
    atoms = run("SparseAtoms_BuildDictionary", model=model, preset="cross-attention k/v",
                layer_regex="", atoms_per_layer=32, method="svd", seed=0)[0]
    extra = {}
    if with_samples:
        prompt = lambda text: run("SparseAtoms_DigitPrompt", prompt=text)[0]
        extra["samples"] = run("SparseAtoms_TrainingSamples", positive=prompt("sks"),
                               latent=run("SparseAtoms_EmptyDigitsLatent", batch_size=8)[0],
                               every=50, seed=0, steps=24, cfg=3.0, sampler_name="euler",
                               scheduler="simple", negative=prompt(""))[0]
    stamps = []
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, node_id=None: (
        stamps.append(time.perf_counter()) if total == steps else None)
    trained = run("SparseAtoms_TrainConcept", model=model, latents=latent, conditioning=conds,
                  atom_dict=atoms, prior_latents=prior, prior_conditioning=prior_conds,
                  prior_weight=1.0, steps=steps, learning_rate=0.003, batch_size=8, l1=0.0,
                  atom_budget=24, tune_atoms=True, seed=0, training_dtype="fp32",
                  gradient_checkpointing=False, **extra)[1]
    shutil.rmtree(base, ignore_errors=True)
    return {"ms_per_step": 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1),
            "final_loss": trained.info.training["losses"][-1], "steps": len(stamps)}


def measure(tree: str, steps: int, with_samples: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", tree, "--steps", str(steps)]
    if with_samples:
        command.append("--with-samples")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="95b960d",
                        help="git revision to compare with (default: before the trainer features)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--with-samples", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        print(json.dumps(child(options.child, options.steps, options.with_samples)))
        return
    old = tempfile.mkdtemp(prefix="bench_baseline_")
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", options.baseline],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        runs = {"baseline": [], "now": [], "now + samples": []}
        for _ in range(options.repeats):
            runs["baseline"].append(measure(old, options.steps, False))
            runs["now"].append(measure(REPO, options.steps, False))
            runs["now + samples"].append(measure(REPO, options.steps, True))
    finally:
        shutil.rmtree(old, ignore_errors=True)
    median = {name: statistics.median(r["ms_per_step"] for r in rs) for name, rs in runs.items()}
    print(f"Train Sparse Concept, digits concept, {options.steps} steps, median of "
          f"{options.repeats} alternating runs (ms per step; min-max)")
    print(f"{'tree':<16}{'ms/step':>10}{'min':>9}{'max':>9}{'ratio':>8}  final loss")
    for name, rs in runs.items():
        values = [r["ms_per_step"] for r in rs]
        print(f"{name:<16}{median[name]:>10.1f}{min(values):>9.1f}{max(values):>9.1f}"
              f"{median[name] / median['baseline']:>8.3f}  {rs[0]['final_loss']:.6f}")
    print(json.dumps({"baseline": options.baseline, "steps": options.steps,
                      "median_ms_per_step": median,
                      "ratio_now": median["now"] / median["baseline"],
                      "ratio_now_with_samples": median["now + samples"] / median["baseline"]}))


if __name__ == "__main__":
    main()
