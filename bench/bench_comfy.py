"""Benchmark of the ComfyUI nodes against ComfyUI itself, measured in the same run.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_comfy.py [--repeats 3] [--quick]

- Train Sparse Concept vs ComfyUI's own TrainLoraNode: time per training step and peak memory
  during training, on the same model, the same layers (every linear and convolution layer, which
  is what TrainLoraNode adapts), atoms per layer = LoRA rank, batch 1, fp32. Each measurement runs
  in its own process (so peak memory is clean); time per step = (time of N steps - time of 1
  step) / (N - 1), which removes the setup both trainers share.
- Apply Sparse Atoms: KSampler time on the patched model vs the unpatched model (the patch is
  merged into the weights when the model loads, so sampling should cost the same).
- Build Atom Dictionary (svd) on every attention layer of the mid-size model.
- Measuring atom effects after training (what Train Sparse Concept does at its end, on its own
  training images, with the calibration it picks for a run of S steps) against the training time
  of those S steps (S x its time per step, measured in the same process before and after), on the
  same model and atoms, all coefficients non-zero (the most atoms there can be to estimate). Its
  time includes loading the model; a warm-up measurement runs first.

Models: a tiny SDXL-like UNet (as in the host tests) and a mid-size SDXL-like UNet that fits a
CPU (channels 128, transformer depth 0/2/4 with 768-wide context), both built from ComfyUI's
classes with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _comfy():
    comfy_path = os.path.abspath(os.environ["COMFYUI_PATH"])
    for path in (comfy_path, os.path.join(REPO, "tests", "host"), REPO):
        if path not in sys.path:
            sys.path.insert(0 if path == comfy_path else len(sys.path), path)
    sys.modules.pop("nodes", None)
    from comfy.cli_args import args

    args.cpu = not _cuda()
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))


def _cuda():
    import torch

    return torch.cuda.is_available()


MID_SDXL = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=128,
                num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 4, 4],
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 4, 4, 4], transformer_depth_middle=4,
                use_spatial_transformer=True, legacy=False, context_dim=768,
                num_classes="sequential", adm_in_channels=1280 + 6 * 256,
                use_linear_in_transformer=True, use_temporal_attention=False,
                use_temporal_resblock=False)


def build_model(name: str):
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    import tiny_models

    if name == "tiny-sdxl":
        return tiny_models.build("sdxl"), tiny_models.conditioning("sdxl"), tiny_models.latents("sdxl", 4)
    config = sm.SDXL(dict(MID_SDXL))
    config.unet_config.update(num_heads=-1, num_head_channels=64)
    config.set_inference_dtype(torch.float32, None)
    model = tiny_models.fill_random(config.get_model({}), seed=0)
    generator = torch.Generator().manual_seed(0)
    patcher = comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    cond = [[torch.randn(1, 77, 768, generator=generator),
             {"pooled_output": torch.randn(1, 1280, generator=generator), "width": 256, "height": 256}]]
    latents = {"samples": torch.randn(4, 4, 32, 32, generator=generator)}
    return patcher, cond, latents


class PeakMemory:
    """Peak resident memory (CPU) or allocated memory (CUDA) above the level at start."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.value = max(self.peak, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_once(which: str, model_name: str, steps: int, rank: int) -> dict:
    """One training run in this process: seconds and peak memory."""
    _comfy()
    import torch
    import comfy.model_management as mm

    with torch.inference_mode():  # as a checkpoint loader node builds it inside a graph
        model, cond, latents = build_model(model_name)
    if which == "lora":
        from comfy_extras.nodes_train import TrainLoraNode

        def run():
            with torch.inference_mode():
                TrainLoraNode().train(model, latents, cond, 1, steps, 1, 1e-4, rank, "AdamW", "MSE",
                                      0, "fp32", "fp32", "LoRA", False, "[None]")
    else:
        from host_support import run_node  # loads nothing; the node classes come from load_custom_node
        node_classes = _our_nodes()
        with torch.inference_mode():
            atoms = run_node(node_classes["SparseAtoms_BuildDictionary"], model=model,
                             preset="custom regex", layer_regex=".", atoms_per_layer=rank,
                             method="svd", seed=0)[0]

        def run():
            run_node(node_classes["SparseAtoms_TrainConcept"], model=model, latents=latents,
                     conditioning=cond, atom_dict=atoms, steps=steps, learning_rate=1e-4,
                     batch_size=1, l1=0.0, atom_budget=0, tune_atoms=True, seed=0,
                     training_dtype="fp32", gradient_checkpointing=False)
    mm.unload_all_models()
    with PeakMemory() as memory:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": memory.value}


def effects_once(model_name: str, rank: int, run_steps: list[int], steps: int) -> dict:
    """In this process: Train Sparse Concept's time per step (batch 1, every layer, ``rank``
    atoms per layer; from runs of 1 and ``steps`` steps, before and after the measurements) and
    the seconds of the effect measurement it runs at the end of a run of each of ``run_steps``
    steps (after a warm-up measurement), on the same atoms with every coefficient non-zero."""
    _comfy()
    import importlib

    import torch
    from host_support import run_node

    node_classes = _our_nodes()
    package = node_classes["SparseAtoms_MeasureEffects"].__module__.rpartition(".")[0]
    effects = importlib.import_module(f"{package}.effects")
    training = importlib.import_module(f"{package}.training")
    with torch.inference_mode():
        model, cond, latents = build_model(model_name)
        atoms = run_node(node_classes["SparseAtoms_BuildDictionary"], model=model,
                         preset="custom regex", layer_regex=".", atoms_per_layer=rank,
                         method="svd", seed=0)[0]

    def train(n):
        start = time.perf_counter()
        run_node(node_classes["SparseAtoms_TrainConcept"], model=model, latents=latents,
                 conditioning=cond, atom_dict=atoms, steps=n, learning_rate=1e-4, batch_size=1,
                 l1=0.0, atom_budget=0, tune_atoms=True, seed=0, training_dtype="fp32",
                 gradient_checkpointing=False)
        return time.perf_counter() - start

    # (the trainer's own measurement at its end is the same 1 x 1 one for both lengths)
    per_step = [(train(steps) - train(1)) / (steps - 1)]
    active = _all_active(atoms)
    dataset = training.Dataset(latents["samples"], cond)
    plan = lambda n: effects.training_measurement(dataset, training.TrainSettings(steps=n), False)
    run = lambda p: effects.measure(model, active, p.calibration, exact_top=p.exact_top, probes=p.probes)
    measured = {}
    with torch.inference_mode():
        run(plan(1))  # warm-up
        for n in run_steps:
            measured[n] = (run(plan(n)).info.effects["seconds"], f"{plan(n).calibration.describe()} "
                           f"({plan(n).probes} probes, top {plan(n).exact_top} exact)")
    per_step.append((train(steps) - train(1)) / (steps - 1))
    return {"per_step": statistics.mean(per_step), "atoms": atoms.n_atoms, "measured": measured}


def _all_active(atoms):
    """``atoms`` with random non-zero coefficients (every atom active)."""
    from dataclasses import replace

    import sparse_core as sc
    import torch

    generator = torch.Generator().manual_seed(0)
    layers = {key: replace(layer, coefficients=0.1 * torch.randn(layer.n_atoms, generator=generator))
              for key, layer in atoms.layers.items()}
    return sc.SparseAtoms(layers, atoms.info)


def subprocess_effects(model, rank, run_steps, steps) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child-effects", model, str(rank),
               str(steps), *map(str, run_steps)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(output.stdout.strip().splitlines()[-1])


def _our_nodes():
    import asyncio
    import tempfile

    import folder_paths
    import nodes

    root = tempfile.mkdtemp(prefix="bench_comfy_")
    folder_paths.models_dir = root
    before = set(nodes.NODE_CLASS_MAPPINGS)
    asyncio.run(nodes.load_custom_node(REPO, ignore=before))
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("SparseAtoms_")}


def subprocess_train(which, model, steps, rank) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", which, model, str(steps), str(rank)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(output.stdout.strip().splitlines()[-1])


def bench_training(model, rank, steps, repeats):
    rows = {}
    for which in ("ours", "lora"):
        per_step, peaks = [], []
        for _ in range(repeats):
            short = subprocess_train(which, model, 1, rank)
            long = subprocess_train(which, model, steps, rank)
            per_step.append((long["seconds"] - short["seconds"]) / (steps - 1))
            peaks.append(long["peak_bytes"])
        rows[which] = (statistics.median(per_step), statistics.median(peaks))
    return rows


def bench_apply_and_build(model_name, repeats):
    _comfy()
    import torch
    import comfy.model_management as mm
    import nodes as comfy_nodes
    from host_support import run_node

    node_classes = _our_nodes()
    model, cond, _ = build_model(model_name)
    with torch.inference_mode():
        start = time.perf_counter()
        atoms = run_node(node_classes["SparseAtoms_BuildDictionary"], model=model,
                         preset="self+cross attention", layer_regex="", atoms_per_layer=64,
                         method="svd", seed=0)[0]
        build_seconds = time.perf_counter() - start
        for layer in atoms.layers.values():
            layer.coefficients.normal_()
        patched = run_node(node_classes["SparseAtoms_Apply"], model=model, sparse_atoms=atoms,
                           strength=1.0, density=1.0)[0]
    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    latent = {"samples": torch.zeros(1, 4, 32, 32)}

    def sample(which):
        with torch.inference_mode():
            comfy_nodes.common_ksampler(which, 0, 10, 5.0, "euler", "normal", cond, negative, latent)

    # Blocks of runs per model, alternating base / patched / base / patched, so that the
    # machine's drift hits both; switching models (and the one-time merge of the patches) happens
    # in an untimed warm-up run at the start of each block.
    times = {"base": [], "patched": []}
    for _ in range(2):
        for which, patcher in (("base", model), ("patched", patched)):
            mm.unload_all_models()
            sample(patcher)
            for _ in range(repeats):
                start = time.perf_counter()
                sample(patcher)
                times[which].append(time.perf_counter() - start)
    return {"build_seconds": build_seconds, "layers": len(atoms), "atoms": atoms.n_atoms,
            "base": statistics.median(times["base"]), "patched": statistics.median(times["patched"])}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child-effects":
        model, rank, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(effects_once(model, rank, [int(n) for n in sys.argv[5:]], steps)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        which, model, steps, rank = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(train_once(which, model, steps, rank)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--skip-training", action="store_true", help="only the Apply and Build figures")
    parser.add_argument("--effects-runs", type=int, nargs="*", default=[300, 1000],
                        help="training-run lengths (steps) whose effect measurement is timed")
    args = parser.parse_args()
    models = ["tiny-sdxl"] if args.quick else ["tiny-sdxl", "mid-sdxl"]
    steps = {"tiny-sdxl": 21, "mid-sdxl": 6}
    lines = ["| model | trainer | s / step | peak memory (MiB) | time ratio | memory ratio |",
             "|---|---|---|---|---|---|"]
    effect_lines = ["| model | training run (batch 1): steps x s/step | effects measured on | "
                    "measuring (s) | training (s) | measuring / training |", "|---|---|---|---|---|---|"]
    for model in ([] if args.skip_training else models):
        rows = bench_training(model, args.rank, steps[model], args.repeats)
        (ours_t, ours_m), (lora_t, lora_m) = rows["ours"], rows["lora"]
        lines.append(f"| {model} | Train Sparse Concept ({args.rank} atoms/layer) | {ours_t:.3f} | "
                     f"{ours_m / 2**20:.0f} | **{ours_t / lora_t:.2f}x** | **{ours_m / lora_m:.2f}x** |")
        lines.append(f"| {model} | TrainLoraNode (rank {args.rank}) | {lora_t:.3f} | {lora_m / 2**20:.0f} | 1 | 1 |")
        print(lines[-2], "\n" + lines[-1], flush=True)
        if args.effects_runs:
            result = subprocess_effects(model, args.rank, args.effects_runs, steps[model])
            for run_steps, (seconds, calibration) in result["measured"].items():
                training = int(run_steps) * result["per_step"]
                effect_lines.append(
                    f"| {model} | {run_steps} steps x {result['per_step']:.3f} s, {result['atoms']} "
                    f"atoms | {calibration} | {seconds:.2f} | {training:.1f} | **{seconds / training:.1%}** |")
                print(effect_lines[-1], flush=True)
    apply = bench_apply_and_build(models[-1], args.repeats)
    lines += ["", "| model | KSampler, 10 steps: unpatched (s) | with atoms applied (s) | overhead |",
              "|---|---|---|---|",
              f"| {models[-1]} | {apply['base']:.3f} | {apply['patched']:.3f} | "
              f"**{100 * (apply['patched'] / apply['base'] - 1):+.1f}%** |",
              "", f"Build Atom Dictionary (svd, 64 atoms/layer) on every attention layer of {models[-1]}: "
              f"{apply['layers']} layers, {apply['atoms']} atoms in {apply['build_seconds']:.2f} s "
              f"({1000 * apply['build_seconds'] / apply['layers']:.0f} ms per layer)"]
    if len(effect_lines) > 2:
        lines += ["", "Measuring atom effects at the end of Train Sparse Concept, relative to its "
                  "training time:", *effect_lines]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
