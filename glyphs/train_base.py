"""Train the glyph base model: the digits DiT (:mod:`digits.model`, shared) at 32 x 32 with
cross-attention to glyph prompts (:mod:`glyphs.prompts`), on the training split of
``glyphs/data/glyphs.npz`` (``python -m glyphs.render`` makes it).

    python -m glyphs.train_base --minutes 180 --out glyphs/glyphs_dit.safetensors

Flow matching as for the digits model (``x = (1 - s) x0 + s noise``, target ``noise - x0``), on
every training font's glyphs but the held-out characters; each prompt is the character, then each
of its font's words (class, bold/light, italic) with probability ``--word-p``, in that order;
10 % of prompts are empty (for guidance). Adam with warmup, an exponential moving average of the
weights (what is evaluated and saved). Legibility every ``--eval-every`` steps: the share of
samples of the seen characters (prompt: the character alone) that a character reader fit on the
held-out families' real renderings reads as the character asked.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from safetensors.torch import save_file

from digits.model import DigitsDiT, PromptEncoder
from digits.sampling import sample
from digits.train_base import flow_matching_loss, update_ema

from .evaluator import CharacterReader
from .prompts import LENGTH, VOCAB, tokenize, tokenize_many, typeface_words
from .render import CHARS

CONFIG = dict(image_size=32, patch_size=4, in_channels=1, dim=128, depth=6, heads=4,
              context_dim=128, mlp_ratio=4)


def training_set(path: str):
    """``(images (N, 1, 32, 32) in [-1, 1], prompts' words [(char, [font words])])``."""
    data = np.load(path)
    held_chars = set(data["held_out_chars"].tolist())
    fonts = np.flatnonzero(~data["held_out_family"])
    chars = [k for k, c in enumerate(CHARS) if c not in held_chars]
    images = torch.from_numpy(data["images"][fonts][:, chars].astype(np.float32) / 127.5 - 1)
    words = [typeface_words(str(data["class"][f]), int(data["weight"][f]), bool(data["italic"][f]))
             for f in fonts]
    pairs = [(CHARS[c], words[i]) for i in range(len(fonts)) for c in chars]
    return images.reshape(-1, 1, 32, 32), pairs, [CHARS[c] for c in chars]


def prompts_for(pairs, generator, word_p: float) -> list[str]:
    keep = torch.rand(len(pairs), 4, generator=generator) < word_p
    return [" ".join([char] + [w for w, k in zip(words, keep[i].tolist()) if k])
            for i, (char, words) in enumerate(pairs)]


def legibility(dit, encoder, reader, chars, per_char=2, seed=1234) -> float:
    asked = [c for c in chars for _ in range(per_char)]
    with torch.no_grad():
        images = sample(dit, encoder(tokenize_many(asked)), encoder(tokenize("")[None]), seed=seed,
                        size=32)
    return reader.legibility(images, asked)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="glyphs/data/glyphs.npz")
    parser.add_argument("--steps", type=int, default=200000)
    parser.add_argument("--minutes", type=float, default=180.0, help="stop after this long")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--word-p", type=float, default=0.7)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="glyphs/glyphs_dit.safetensors")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, pairs, chars = training_set(args.data)
    reader = CharacterReader.fit()
    print(f"{len(images)} training glyphs; reader on unseen real fonts: "
          f"{reader.held_out_accuracy:.4f}", flush=True)
    dit = DigitsDiT(**CONFIG).initialize(generator)
    encoder = PromptEncoder(len(VOCAB), LENGTH, CONFIG["context_dim"])
    torch.nn.init.normal_(encoder.embedding.weight, std=1.0, generator=generator)
    ema_dit, ema_encoder = copy.deepcopy(dit), copy.deepcopy(encoder)
    optimizer = torch.optim.Adam([*dit.parameters(), *encoder.parameters()], lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 1000))
    empty = tokenize("")
    training = dict(vars(args), config=CONFIG, objective="flow matching, v = noise - x0",
                    cfg_dropout=0.1, reader_held_out_accuracy=reader.held_out_accuracy,
                    torch=torch.__version__, sampler="euler, 24 steps, cfg 3.0")
    start, history, step = time.time(), [], 0
    while step < args.steps and time.time() - start < 60 * args.minutes:
        step += 1
        index = torch.randint(len(images), (args.batch,), generator=generator)
        x0 = images[index]
        prompt = tokenize_many(prompts_for([pairs[i] for i in index.tolist()], generator, args.word_p))
        prompt[torch.rand(args.batch, generator=generator) < 0.1] = empty
        loss = flow_matching_loss(dit, encoder, x0, prompt, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        update_ema(((ema_dit, dit), (ema_encoder, encoder)), args.ema)
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            score = legibility(ema_dit.eval(), ema_encoder.eval(), reader, chars)
            history.append((step, round(time.time() - start), score))
            print(f"step {step}: legibility {score:.3f}", flush=True)
            _save(ema_dit, ema_encoder, args.out, dict(training, history=history, steps_done=step))
    score = legibility(ema_dit.eval(), ema_encoder.eval(), reader, chars)
    history.append((step, round(time.time() - start), score))
    _save(ema_dit, ema_encoder, args.out, dict(training, history=history, steps_done=step))
    print(f"saved {args.out}: {step} steps, legibility {score:.3f}", flush=True)


def _save(dit, encoder, path, training):
    """The EMA weights in half precision (4.6 MB; loading casts them back to the model's dtype)."""
    half = lambda v: v.detach().cpu().to(torch.float16).contiguous()
    tensors = {f"diffusion_model.{k}": half(v) for k, v in dit.state_dict().items()}
    tensors.update({f"prompt_encoder.{k}": half(v) for k, v in encoder.state_dict().items()})
    save_file(tensors, path, metadata={"config": json.dumps(CONFIG), "vocab": json.dumps(VOCAB),
                                       "training": json.dumps(training)})


if __name__ == "__main__":
    main()
