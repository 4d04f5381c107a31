"""The shipped composition graph through a real ComfyUI server, on several seeds.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_composition_graph.py [--seeds 0,1,2]
        [--variant shipped|before]

Runs ``tests/host/workflows_api/digits_composition.json`` (what ``workflows/digits_composition.json``
queues) with every seed in the graph (examples, dictionaries, training, samplers) moved by
``10 * seed``, each seed on a fresh server, and judges the 32 "bold sks" samples with the digits
evaluator (classifiers fit on real digits only): the share that are 3s, bold, and both; and, as
an outside evaluator would, against all real 3s made bold (:func:`digits.data.embolden`) with
:mod:`digits.quality`: a 1-nearest-neighbour two-sample test (0.5 = indistinguishable), the
samples' mean pairwise correlation (diversity) and the Fréchet distance, each beside its
real-vs-real value for sets of the same size.
``--variant before`` drops what the recipe adds (caption dropout, the concept under attribute
words, the other free words in the priors, 400 steps at batch 16) to show what each run would
draw without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GRAPH = os.path.join(REPO, "tests", "host", "workflows_api", "digits_composition.json")
SAVED = "16"  # the SaveImage node of "bold sks"


def seeded(graph: dict, seed: int) -> dict:
    graph = copy.deepcopy(graph)
    for node in graph.values():
        if "seed" in node["inputs"]:
            node["inputs"]["seed"] += 10 * seed
    return graph


def before(graph: dict) -> dict:
    """The previous round's recipe: the concept under "sks" only, real digits as priors, no
    caption dropout, 300 steps at batch 8."""
    graph = copy.deepcopy(graph)
    concept, style = graph["5"]["inputs"], graph["8"]["inputs"]
    concept.update(latents=["2", 0], conditioning=["2", 1], prior_latents=["3", 0],
                   prior_conditioning=["3", 1], steps=300, batch_size=8)
    style.update(prior_latents=["17", 0], prior_conditioning=["17", 1], steps=300, batch_size=8,
                 caption_dropout=0.0)
    style.pop("empty_conditioning")
    return graph


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", choices=["shipped", "before"], default="shipped")
    args = parser.parse_args(argv)
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path[:0] = [os.path.join(REPO, "tests", "host"), os.path.join(REPO, "tools")]
    import conftest  # noqa: F401  (ComfyUI first on the path, CPU)
    sys.path.append(REPO)
    from comfy_server import ComfyServer
    import torch

    from digits import quality
    from digits.data import embolden, load_digits
    from digits.evaluator import DigitEvaluator
    from host_support import saved_digits

    evaluator = DigitEvaluator.fit()
    images, labels = load_digits()
    real = embolden(images[labels == 3])  # every real 3, bold
    space = quality.FeatureSpace.of_digits()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(real), generator=generator)
    floor = dict(two_sample=quality.two_sample_accuracy(real[order[:32]], real[order[32:64]]),
                 pairwise=quality.real_diversity(real, 32).mean_pairwise,
                 frechet=quality.real_floor(real, 32, space).frechet)
    graph = json.load(open(GRAPH))
    if args.variant == "before":
        graph = before(graph)
    print(f"| seed | 3 and bold | 3 | bold | 1-NN two-sample vs real | pairwise corr | Fréchet "
          f"| seconds |  ({args.variant})\n|---|---|---|---|---|---|---|---|")
    print(f"| real bold 3s | | | | {floor['two_sample']:.2f} | {floor['pairwise']:.2f} | "
          f"{floor['frechet']:.2f} | |")
    for seed in [int(s) for s in args.seeds.split(",")]:
        server = ComfyServer(os.environ["COMFYUI_PATH"]).start()  # fresh: nothing cached
        try:
            start = time.time()
            entry = server.run(seeded(graph, seed), timeout=1800)
            if "execution_success" not in server.messages(entry):
                print(f"| {seed} | failed: {server.log_tail(5)} |")
                continue
            images = saved_digits(server, entry, SAVED)
            three = evaluator.classify(images) == 3
            bold = evaluator.is_bold(images)
            share = lambda mask: f"{100 * float(mask.float().mean()):.0f} %"
            two_sample = quality.two_sample_accuracy(images, real[order[:32]])
            pairwise = quality.diversity(images).mean_pairwise
            frechet = quality.distance(images, real, space).frechet
            print(f"| {seed} | {share(three & bold)} | {share(three)} | {share(bold)} | "
                  f"{two_sample:.2f} | {pairwise:.2f} | {frechet:.2f} | {time.time() - start:.0f} |",
                  flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
