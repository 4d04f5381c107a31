"""What the divergence guard should keep: samples of the atoms along training, by learning rate.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_guard.py [--every 10] [--cases all]

Trains the digits concept graph (``tests/host/workflows_api/digits_concept.json``: eight 3s as
"sks", prior preservation on the other digits, 32 svd atoms per cross-attention k/v layer,
budget 24, tuned atoms, batch 8) through ComfyUI's own nodes in this process, with the guard's
stopping turned off, at the learning rates an outside probe found broken (0.003/150 steps,
0.03/300, 0.1/150, 0.3 in bf16/100). Every ``--every`` steps the atoms in place are applied
with Apply Sparse Atoms and sampled with ComfyUI's KSampler (euler, 24 steps, cfg 3, 16 images
per prompt): the share of "sks" samples the evaluator (:mod:`digits.evaluator`, never trained on
generated images) calls a 3, and of "7" samples it calls a 7 (preservation). Printed beside them:
the largest total coefficient growth the guard measures, and the guard's check (the same loss on fixed images, noise and noise levels):
concept and prior losses over the starting atoms' (the evidence the guard can see while training).
``--guard`` keeps the guard on and samples what the node returns instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CASES = {"0.003": (0.003, 150, "fp32"), "0.03": (0.03, 300, "fp32"),
         "0.1": (0.1, 150, "fp32"), "0.3bf16": (0.3, 100, "bf16")}


def load_comfy():
    comfy_path = os.path.abspath(os.environ["COMFYUI_PATH"])
    sys.path.insert(0, comfy_path)
    sys.path.append(REPO)
    sys.modules.pop("nodes", None)
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths
    import nodes

    root = tempfile.mkdtemp(prefix="bench-guard-")
    for name in ("models", "output", "input", "temp"):
        os.makedirs(os.path.join(root, name))
    folder_paths.models_dir = os.path.join(root, "models")
    folder_paths.set_output_directory(os.path.join(root, "output"))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(REPO, ignore=before))
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("SparseAtoms_")}, nodes


def run(node_class, **inputs):
    import torch
    from comfy_api.latest import io

    prepared = node_class.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "1"})
    with torch.inference_mode():
        return prepared.execute(**inputs).result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--cases", default="all")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--first", type=int, default=0, help="sample from this step on")
    parser.add_argument("--guard", action="store_true", help="keep the guard's stops on")
    parser.add_argument("--steps", type=int, default=None, help="override every case's steps")
    options = parser.parse_args()
    ours, nodes = load_comfy()
    import torch

    torch.set_num_threads(2)
    import sparse_core as sc
    from digits.evaluator import DigitEvaluator

    evaluator = DigitEvaluator.fit()
    graph = json.load(open(os.path.join(REPO, "tests", "host", "workflows_api", "digits_concept.json")))
    model, = run(ours["SparseAtoms_LoadDigitsModel"])
    inputs = {k: v for k, v in graph["2"]["inputs"].items() if k != "model"}
    atom_dict = run(ours["SparseAtoms_BuildDictionary"], model=model, **inputs)[0]
    concept = run(ours["SparseAtoms_DigitExamples"], **graph["3"]["inputs"])
    prior = run(ours["SparseAtoms_DigitExamples"], **graph["4"]["inputs"])
    negative, = run(ours["SparseAtoms_DigitPrompt"], prompt="")

    def sample(atoms, prompt):
        patched, = run(ours["SparseAtoms_Apply"], model=model, sparse_atoms=atoms,
                       strength=1.0, density=1.0)
        positive, = run(ours["SparseAtoms_DigitPrompt"], prompt=prompt)
        latent = {"samples": torch.zeros(options.samples, 1, 8, 8)}
        with torch.inference_mode():
            out = nodes.KSampler().sample(patched, 0, 24, 3.0, "euler", "simple", positive, negative,
                                          latent)[0]
        return out["samples"].clamp(-1, 1)

    def shares(atoms):
        return (evaluator.share(sample(atoms, "sks"), 3), evaluator.share(sample(atoms, "7"), 7))

    snapshots, captured, checks = {}, {}, {}
    real_train_atoms = sc.train_atoms

    def check(check_fn):
        with torch.no_grad():
            return {name: float(value) for name, value in check_fn().items()}

    def recording(atoms, loss_fn, config=None, *, on_step=None, check_fn=None, **fields):
        checks[0] = check(check_fn)

        def record(step, loss):
            if (step + 1) % options.every == 0 and step + 1 >= options.first:
                snapshots[step + 1] = atoms.clone().to("cpu")
                checks[step + 1] = check(check_fn)
            if on_step is not None:
                on_step(step, loss)
        captured["result"] = real_train_atoms(atoms, loss_fn, config, on_step=record,
                                              check_fn=check_fn, **fields)
        return captured["result"]

    sc.train_atoms = recording
    import sparse_core._guard as guard

    if not options.guard:  # record what happens without the guard's stops
        guard.MAX_TOTAL_GROWTH = guard.MAX_STEP_GROWTH = guard.LOSS_LIMIT = float("inf")
        guard.BROKEN_WINDOWS, guard.BROKEN_RISE = 10**9, float("inf")
    cases = CASES if options.cases == "all" else {k: CASES[k] for k in options.cases.split(",")}
    report = {}
    for name, (lr, steps, dtype) in cases.items():
        snapshots.clear()
        steps = options.steps or steps
        train_inputs = {**graph["5"]["inputs"], "learning_rate": lr, "steps": steps, "training_dtype": dtype}
        for key in ("model", "latents", "conditioning", "atom_dict", "prior_latents", "prior_conditioning"):
            train_inputs.pop(key)
        try:
            outputs = run(ours["SparseAtoms_TrainConcept"], model=model, latents=concept[0],
                          conditioning=concept[1], atom_dict=atom_dict, prior_latents=prior[0],
                          prior_conditioning=prior[1], **train_inputs)
        except ValueError as error:  # no working state: the node keeps nothing
            outputs, failure = None, str(error)
        result = captured["result"]
        if options.guard:
            kept = {"stopped": result.stopped, "warnings": result.warnings,
                    "steps_done": result.steps_done}
            if outputs is None:
                kept["node_error"] = failure
            else:
                kept["concept"], kept["preservation"] = shares(outputs[1])
            print(f"\n== lr {lr} {dtype} {steps} steps, guard on: {json.dumps(kept)}", flush=True)
            report[name] = kept
            continue
        start_c = checks[0]["concept"]
        rows = []
        print(f"\n== lr {lr} {dtype} {steps} steps; stopped: {result.stopped}")
        print(" step  growth  concept/start  worst prior/start   sks->3   7->7")
        for step, atoms in sorted(snapshots.items()):
            c = checks[step]["concept"] / start_c
            p = max(v / checks[0][k] for k, v in checks[step].items() if k.startswith("prior"))
            concept_share, kept_share = shares(atoms.top_k(atoms.n_active))
            rows.append(dict(step=step, growth=result.growth[step - 1], concept_rise=c, prior_rise=p,
                             concept=concept_share, preservation=kept_share))
            print(f" {step:4d}  {result.growth[step - 1]:8.3g}  {c:8.2f}  {p:8.2f}  "
                  f"{concept_share:6.0%}  {kept_share:6.0%}", flush=True)
        report[name] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main()
