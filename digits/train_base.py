"""Train the shipped digits model (a one-off run; its output ships as digits_dit.safetensors).

    python -m digits.train_base --steps 12000 --out digits/digits_dit.safetensors

Flow matching on the bundled digits without the held-out 3: ``x = (1 - s) x0 + s noise`` with
``s ~ U(0, 1)``, target ``noise - x0``. Each image's prompt is its digit after up to two attribute
words in random order (``"7"``, ``"slant 7"``, ``"small faint 7"``; each attribute with
probability ``--attribute-p``), the image transformed to match (:mod:`digits.attributes`), so the
model learns word positions and combinations; the held-out style ``bold`` is never shown. Prompts
drop to ``""`` 10 % of the time (for classifier-free guidance). Adam with cosine decay and an
exponential moving average of the weights, which is what is saved (also at every evaluation). The
evaluator scores class-conditional samples of plain and attributed prompts as it goes.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from . import attributes
from .checkpoint import save_checkpoint
from .data import load_digits
from .evaluator import DigitEvaluator
from .model import DEFAULT_CONFIG, DigitsDiT, PromptEncoder
from .prompts import HELD_OUT, LENGTH, TRAINED_DIGITS, VOCAB, tokenize, tokenize_many
from .sampling import sample


def flow_matching_loss(dit, encoder, x0, prompt, generator) -> torch.Tensor:
    """``mean((dit(x_s, 1000 s, encoder(prompt)) - (noise - x0))^2)`` at ``x_s = (1 - s) x0 +
    s noise``, ``s ~ U(0, 1)`` per image (noise drawn first, then ``s``, from ``generator``)."""
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(len(x0), generator=generator)
    s = sigma[:, None, None, None]
    x = (1 - s) * x0 + s * noise
    return (dit(x, sigma * 1000, encoder(prompt)) - (noise - x0)).pow(2).mean()


def update_ema(pairs, decay: float) -> None:
    """Each ``(ema, live)`` module pair: ``ema <- decay * ema + (1 - decay) * live``."""
    with torch.no_grad():
        for ema, live in pairs:
            for e, p in zip(ema.parameters(), live.parameters()):
                e.lerp_(p, 1 - decay)


def evaluate(dit, encoder, evaluator, per_digit=24, seed=1234) -> dict:
    """Digit accuracy per attribute prefix (``""`` = plain prompts) and each attribute's measured
    strength: the sample statistic with the attribute over without, next to the real images'."""
    scores = {}
    for prefix in ["", *attributes.TRAINED]:
        prompts = [f"{prefix} {d}".strip() for d in TRAINED_DIGITS for _ in range(per_digit)]
        images = sample(dit, encoder(tokenize_many(prompts)), encoder(tokenize("")[None]), seed=seed)
        scores[prefix or "plain"] = evaluator.accuracy(
            {f"{i}": images[k * per_digit:(k + 1) * per_digit] for k, i in enumerate(TRAINED_DIGITS)})
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--attribute-p", type=float, default=0.3)
    parser.add_argument("--eval-every", type=int, default=3000)
    parser.add_argument("--out", default="digits/digits_dit.safetensors")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits(exclude=(HELD_OUT,))
    empty = tokenize("")
    config = dict(DEFAULT_CONFIG)
    dit = DigitsDiT(**config).initialize(generator)
    encoder = PromptEncoder(len(VOCAB), LENGTH, config["context_dim"])
    torch.nn.init.normal_(encoder.embedding.weight, std=1.0, generator=generator)
    ema_dit, ema_encoder = copy.deepcopy(dit), copy.deepcopy(encoder)
    params = list(dit.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)  # no weight decay: unseen tokens stay put
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, s / 500) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    evaluator = DigitEvaluator.fit()
    print(f"{len(images)} training images; evaluator held-out accuracy "
          f"{evaluator.held_out_accuracy:.4f}", flush=True)
    training = dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, ema=args.ema,
                    objective="flow matching, v = noise - x0, timesteps = 1000 sigma",
                    cfg_dropout=0.1, held_out=HELD_OUT, attributes=list(attributes.TRAINED),
                    attribute_p=args.attribute_p, held_out_style=attributes.HELD_OUT_STYLE,
                    evaluator_held_out_accuracy=evaluator.held_out_accuracy,
                    torch=torch.__version__, sampler="euler, 24 steps, cfg 3.0")
    start, history = time.time(), []
    for step in range(1, args.steps + 1):
        index = torch.randint(len(images), (args.batch,), generator=generator)
        prompts, chosen = attributes.random_prompts(labels[index], generator, p=args.attribute_p)
        x0, prompt = attributes.apply_each(images[index], chosen), tokenize_many(prompts)
        drop = torch.rand(args.batch, generator=generator) < 0.1
        prompt[drop] = empty
        loss = flow_matching_loss(dit, encoder, x0, prompt, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        update_ema(((ema_dit, dit), (ema_encoder, encoder)), args.ema)
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            scores = evaluate(ema_dit.eval(), ema_encoder.eval(), evaluator)
            history.append((step, scores))
            print(f"step {step}: class-conditional accuracy {scores}", flush=True)
            done = dict(training, accuracy_history=history, final_accuracy=scores, steps_done=step,
                        seconds=round(time.time() - start))
            save_checkpoint(ema_dit, ema_encoder, args.out, config=config, training=done,
                            held_out=HELD_OUT)
    print(f"saved {args.out}: {done}", flush=True)


if __name__ == "__main__":
    main()
