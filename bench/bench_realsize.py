"""Real-size benchmark: full-size SD1.5 / SDXL checkpoints (random weights in the real single-file
format, from tools/random_checkpoint.py), batch 1, against ComfyUI's own LoRA machinery measured in
the same run.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_realsize.py --checkpoint sdxl.safetensors \\
        [--px 256 512] [--dtypes fp32 bf16] [--checkpointing off on] [--steps 4] [--rank 16]
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_realsize.py --flux-dictionary [--atoms 64]

- Training: Train Sparse Concept (every linear and convolution layer, atoms per layer = rank) vs
  TrainLoraNode (rank, LoRA parameters in fp32 like the atoms), per image size, training dtype and
  gradient checkpointing. Each run in its own process; s/step = (T(N steps) - T(1 step)) / (N - 1),
  which removes the setup both share (and, for ours, without the atom-effect measurement that ends
  Train Sparse Concept, reported in its own column); peak memory is CUDA's max allocated (or the
  CPU's resident set) above the level before training, the effect measurement included.
- Patch time: loading the model (``load_models_gpu``) with Apply's patch vs with the stock LoRA of
  equal rank (the same atoms exported by ``sparse_core.to_lora``, loaded by
  ``comfy.sd.load_lora_for_models``), both minus the unpatched load; one untimed load of each
  first, then the median of repeats whose order reverses every time (loads get faster as the
  allocator warms up, which a fixed order would charge to whichever comes first).
  ``--patch-only`` skips the training table; ``--sample-steps 0`` skips sampling.
- Sampling overhead: KSampler on the Apply-patched model vs the same atoms as a stock LoRA and vs
  the unpatched model, in alternating blocks (each block's untimed first run writes the patched
  weights). On the CPU any patched weights sample slower than the loaded ones, so the stock LoRA
  is the baseline that isolates what Apply itself costs.
- ``--flux-dictionary``: Build Atom Dictionary (svd, "self+cross attention") on a random full-size
  Flux (dev's config, bf16, built on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_comfy  # noqa: E402  (ComfyUI set-up, our nodes, PeakMemory)

FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768,
                context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
                guidance_embed=True)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(checkpoint: str, px: int):
    """(MODEL, conditioning, latents) for ``checkpoint`` at ``px`` pixels: random conditioning of
    the model's own shapes (no text encoder needed)."""
    import torch
    import comfy.sd

    with torch.inference_mode():  # as CheckpointLoaderSimple builds it inside a graph
        model = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)[0]
    generator = torch.Generator().manual_seed(0)
    arch = type(model.model.model_config).__name__
    if arch == "SDXL":
        extra = {"pooled_output": torch.randn(1, 1280, generator=generator), "width": px, "height": px}
        context = torch.randn(1, 77, 2048, generator=generator)
    elif arch == "SD15":
        extra, context = {}, torch.randn(1, 77, 768, generator=generator)
    else:
        raise ValueError(f"--checkpoint must be an SD1.5 or SDXL checkpoint, {checkpoint} is {arch}")
    latents = {"samples": torch.randn(1, 4, px // 8, px // 8, generator=generator)}
    return model, [[context, extra]], latents, arch


def train_once(which, checkpoint, px, dtype, checkpointing, steps, rank) -> dict:
    """One training run in this process: seconds and peak memory."""
    import torch
    import comfy.model_management as mm

    model, cond, latents, _ = load(checkpoint, px)
    if which == "lora":
        from comfy_extras.nodes_train import TrainLoraNode

        def run():
            with torch.inference_mode():
                TrainLoraNode().train(model, latents, cond, 1, steps, 1, 1e-4, rank, "AdamW", "MSE", 0,
                                      dtype, "fp32", "LoRA", checkpointing, "[None]")
    else:
        from host_support import run_node

        nodes = bench_comfy._our_nodes()
        with torch.inference_mode():
            atoms = run_node(nodes["SparseAtoms_BuildDictionary"], model=model, preset="custom regex",
                             layer_regex=".", atoms_per_layer=rank, method="svd", seed=0)[0]

        def run():
            trained = run_node(nodes["SparseAtoms_TrainConcept"], model=model, latents=latents,
                               conditioning=cond, atom_dict=atoms, steps=steps, learning_rate=1e-4,
                               batch_size=1, l1=0.0, atom_budget=0, tune_atoms=True, seed=0,
                               training_dtype=dtype, gradient_checkpointing=checkpointing)[1]
            return {"training_seconds": trained.info.training["seconds"],
                    "effects_seconds": (trained.info.effects or {}).get("seconds")}
    mm.unload_all_models()
    with bench_comfy.PeakMemory() as memory:
        start = time.perf_counter()
        parts = run() or {}
        _sync()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": memory.value, **parts}


def patch_and_sample_once(checkpoint, px, rank, repeats, sample_steps) -> dict:
    """Apply's patch vs a stock LoRA of equal rank at model load; KSampler with and without atoms."""
    import torch
    import comfy.model_management as mm
    import comfy.sd
    import nodes as comfy_nodes
    import sparse_core as sc
    from host_support import run_node

    model, cond, latents, arch = load(checkpoint, px)
    nodes = bench_comfy._our_nodes()
    with torch.inference_mode():
        atoms = run_node(nodes["SparseAtoms_BuildDictionary"], model=model, preset="custom regex",
                         layer_regex=".", atoms_per_layer=rank, method="svd", seed=0)[0]
        generator = torch.Generator().manual_seed(0)
        for layer in atoms.layers.values():
            layer.coefficients = 0.01 * torch.randn(layer.n_atoms, generator=generator)
        patched = run_node(nodes["SparseAtoms_Apply"], model=model, sparse_atoms=atoms, strength=1.0,
                           density=1.0)[0]
        lora = comfy.sd.load_lora_for_models(model, None, sc.to_lora(atoms, format="lora"), 1.0, 0.0)[0]
    assert len(lora.patches) == len(patched.patches) == len(atoms), "LoRA and atoms patch different layers"

    patchers = [("base", model), ("atoms", patched), ("lora", lora)]
    for _, patcher in patchers:  # warm-up: the first loads pay for fresh memory
        mm.unload_all_models()
        mm.load_models_gpu([patcher], force_full_load=True)
    loads = {which: [] for which, _ in patchers}
    for repeat in range(repeats):
        for which, patcher in patchers if repeat % 2 == 0 else patchers[::-1]:
            mm.unload_all_models()
            _sync()
            start = time.perf_counter()
            mm.load_models_gpu([patcher], force_full_load=True)
            _sync()
            loads[which].append(time.perf_counter() - start)
    loaded = {k: statistics.median(v) for k, v in loads.items()}
    if not sample_steps:
        return {"arch": arch, "layers": len(atoms), "load": loaded, "sample": None}

    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    empty = {"samples": torch.zeros_like(latents["samples"])}
    samples = {"base": [], "atoms": [], "lora": []}
    for _ in range(2):  # blocks: the one-time merge happens in each block's untimed first run
        for which, patcher in patchers:
            mm.unload_all_models()
            for timed in [False] + [True] * repeats:
                start = time.perf_counter()
                with torch.inference_mode():
                    comfy_nodes.common_ksampler(patcher, 0, sample_steps, 5.0, "euler", "normal", cond,
                                                negative, empty)
                _sync()
                if timed:
                    samples[which].append(time.perf_counter() - start)
    return {"arch": arch, "layers": len(atoms), "load": loaded,
            "sample": {k: statistics.median(v) for k, v in samples.items()}}


def flux_dictionary(atoms_per_layer: int) -> dict:
    """Build Atom Dictionary on a random full-size Flux on the GPU."""
    import torch
    import comfy.model_patcher
    import comfy.supported_models as sm
    from host_support import run_node

    if not torch.cuda.is_available():
        raise SystemExit("--flux-dictionary needs a CUDA GPU (a full-size Flux is 24 GB in bf16)")
    config = sm.Flux(dict(FLUX_DEV))
    config.set_inference_dtype(torch.bfloat16, None)
    device = torch.device("cuda")
    with device:
        model = config.get_model({})
    with torch.no_grad():
        for name, p in model.named_parameters():  # fan-in scaled normal, norm gains 1, biases 0
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if name.endswith(("weight", "scale")) else 0.0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    nodes = bench_comfy._our_nodes()
    parameters = sum(p.numel() for p in model.diffusion_model.parameters())
    torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        atoms = run_node(nodes["SparseAtoms_BuildDictionary"], model=patcher, preset="self+cross attention",
                         layer_regex="", atoms_per_layer=atoms_per_layer, method="svd", seed=0)[0]
    _sync()
    return {"parameters": parameters, "layers": len(atoms), "atoms": atoms.n_atoms,
            "seconds": time.perf_counter() - start, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def child(*args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)]
    output = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if output.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{output.stderr[-4000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def train_table(options, name):
    """Train Sparse Concept vs TrainLoraNode, one markdown row per size, dtype and checkpointing."""
    print("| checkpoint | px | dtype | checkpointing | Train Sparse Concept s/step | TrainLoraNode s/step | "
          "time ratio | peak MiB (ours / LoRA) | memory ratio | effects measured after training (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for px in options.px:
        for dtype in options.dtypes:
            for checkpointing in options.checkpointing:
                row = {}
                for which in ("ours", "lora"):
                    short, long = (child("train", which, options.checkpoint, px, dtype, checkpointing == "on",
                                         steps, options.rank) for steps in (1, options.steps))
                    print(f"<!-- {which} {px} {dtype} {checkpointing}: 1 step {short}, {options.steps} steps "
                          f"{long} -->", flush=True)
                    # Train Sparse Concept ends by measuring atom effects, a cost of its own (reported
                    # apart): it is taken out of both runs, so s/step is the training loop's alone.
                    spent = [run["seconds"] - (run.get("effects_seconds") or 0.0) for run in (short, long)]
                    row[which] = ((spent[1] - spent[0]) / (options.steps - 1), long["peak_bytes"],
                                  long.get("effects_seconds"))
                (ours_t, ours_m, effects), (lora_t, lora_m, _) = row["ours"], row["lora"]
                print(f"| {name} | {px} | {dtype} | {checkpointing} | {ours_t:.3f} | {lora_t:.3f} | "
                      f"**{ours_t / lora_t:.2f}x** | {ours_m / 2**20:.0f} / {lora_m / 2**20:.0f} | "
                      f"**{ours_m / lora_m:.2f}x** | {effects:.1f} |", flush=True)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        name, *args = json.loads(sys.argv[2])
        bench_comfy._comfy()  # ComfyUI on the path, its device chosen (CUDA when there is one)...
        import comfy.model_management  # noqa: F401  (...and fixed, before the host tests' helpers)
        import host_support  # noqa: F401  (run_node)
        function = {"train": train_once, "patch": patch_and_sample_once, "flux": flux_dictionary}[name]
        print(json.dumps(function(*args)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="an SD1.5 or SDXL single-file checkpoint")
    parser.add_argument("--px", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--steps", type=int, default=4, help="training steps of the long run (>= 2)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank = atoms per layer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-steps", type=int, default=4, help="0: no sampling overhead")
    parser.add_argument("--patch-only", action="store_true", help="skip the training table")
    parser.add_argument("--flux-dictionary", action="store_true")
    parser.add_argument("--atoms", type=int, default=64, help="atoms per layer of --flux-dictionary")
    options = parser.parse_args()
    if options.flux_dictionary:
        flux = child("flux", options.atoms)
        print(f"| Flux-size dictionary (svd, self+cross attention) | {flux['parameters'] / 1e9:.1f} B "
              f"parameters | {flux['layers']} layers | {flux['atoms']} atoms | {flux['seconds']:.1f} s | "
              f"peak {flux['peak_gib']:.1f} GiB |")
        return
    if not options.checkpoint or not os.path.isfile(options.checkpoint):
        parser.error(f"--checkpoint must be an existing file, got {options.checkpoint!r} "
                     "(make one with tools/random_checkpoint.py)")
    if options.steps < 2:
        parser.error(f"--steps must be at least 2, got {options.steps}")
    name = os.path.basename(options.checkpoint)
    if not options.patch_only:
        train_table(options, name)
    px = options.px[0]
    patch = child("patch", options.checkpoint, px, options.rank, options.repeats, options.sample_steps)
    load, sample = patch["load"], patch["sample"]
    ours, stock = load["atoms"] - load["base"], load["lora"] - load["base"]
    overhead = lambda baseline: f"{100 * (sample['atoms'] / sample[baseline] - 1):+.1f}%"
    sampled = (f"{sample['base']:.2f} / {sample['atoms']:.2f} / {sample['lora']:.2f} | "
               f"**{overhead('lora')}** | {overhead('base')}") if sample else "not run | - | -"
    print(f"\n| checkpoint | layers (rank {options.rank}) | model load s: unpatched / atoms / LoRA | "
          f"patch s: atoms / LoRA | patch ratio | KSampler {options.sample_steps} steps at {px} px s: "
          f"unpatched / atoms / LoRA | sampling: atoms vs LoRA | atoms vs unpatched |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {name} | {patch['layers']} | {load['base']:.2f} / {load['atoms']:.2f} / {load['lora']:.2f} | "
          f"{ours:.2f} / {stock:.2f} | **{ours / stock:.2f}x** | {sampled} |")


if __name__ == "__main__":
    main()
