"""Training sparse atoms through ComfyUI's own machinery (like its LoRA trainer).

The conditioning, latent scaling and model loading go through a ``Guider_Basic`` whose sampler is
our training loop: ``guider(x_t, sigma)`` is the model's own denoised prediction with the
conditioning encoded the way sampling encodes it, for any model type (eps, v or flow), because
noise comes from the model's ``model_sampling``::

    sigma  = model_sampling.percent_to_sigma(u),  u ~ U(0, 1)
    x_t    = model_sampling.noise_scaling(sigma, noise, x0)
    loss   = mean(((guider(x_t, sigma) - x0) / s(sigma))^2)

where ``s(sigma)`` is how much the denoised prediction moves per unit of the model's own output
(:func:`objective.prediction_scale`: sigma for eps and flow models, sigma / sqrt(1 + sigma^2) for
v-prediction). Dividing the x0-space error by it makes the loss the error of the model's own
prediction (its noise, velocity or v), so every noise level weighs alike instead of the x0 loss
growing with sigma^2 (or, divided by sigma alone, a v model's loss shrinking like 1 / (1 + sigma^2)
and swinging with the noise levels drawn). :mod:`objective` has the other choices: logit-normal
noise levels and the flow shift, L1 and Huber errors, min-SNR weighting. Atoms enter as weight wrappers (differentiable ``W + delta W``); the
loop itself is :func:`sparse_core.train_atoms`, shared with the standalone demo.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

import comfy.samplers

import sparse_core as sc

from .checkpoints import check_resume, data_fingerprint
from .datasets import Dataset, ImagesBySize, broadcast_conds, distinct_conds
from .guided import run_guided, saved_tensor_copies
from .objective import (LOSS_TYPES, LOSS_WEIGHTINGS, TIMESTEP_SAMPLING, draw_levels, image_errors,
                        level_weights, prediction_scale)
from .previews import draw_samples

TRAINING_DTYPES = ("fp32", "bf16")


@dataclass(kw_only=True)
class TrainSettings(sc.TrainConfig):
    """A :class:`sparse_core.TrainConfig` plus how ComfyUI runs the model: its compute ``dtype``
    during training (the atoms stay fp32) and gradient checkpointing; and ``caption_dropout``,
    the share of concept images each step trains under the empty prompt instead of their own (as
    base models are trained, so classifier-free guidance's unconditional branch knows the new
    images too; without it guidance exaggerates a style it never saw). The training objective
    (:mod:`objective`): ``timestep_sampling`` and ``timestep_shift`` (how noise levels are
    drawn), ``loss_type``, ``loss_weighting`` with ``min_snr_gamma``; the defaults are today's
    objective, draw for draw."""

    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.0
    timestep_sampling: str = "uniform"
    timestep_shift: float = 1.0
    loss_type: str = "MSE"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        for name, options in (("timestep_sampling", TIMESTEP_SAMPLING), ("loss_type", LOSS_TYPES),
                              ("loss_weighting", LOSS_WEIGHTINGS)):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {getattr(self, name)!r}")
        for name in ("timestep_shift", "min_snr_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be > 0 and finite, got {value}")
            setattr(self, name, float(value))
        dropout = self.caption_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"caption_dropout must be a number, got {type(dropout).__name__}")
        if not 0 <= dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {dropout}")
        self.caption_dropout = float(dropout)
        if self.dtype not in TRAINING_DTYPES:
            raise ValueError(f"training dtype must be one of {list(TRAINING_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise TypeError(f"gradient_checkpointing must be True or False, got "
                            f"{type(self.gradient_checkpointing).__name__}")


def _sampler_inputs(model_wrap, latent_image, seed):
    """What a ``comfy.samplers.Sampler.sample`` call gives a training-like loop: the positive
    CONDITIONING entries, the model's sampling (sigmas), the latents ``(N, C, H, W)`` (already
    through ``process_latent_in``) and a generator seeded with ``seed``."""
    return (model_wrap.conds["positive"], model_wrap.inner_model.model_sampling, latent_image,
            torch.Generator().manual_seed(seed))


def _by_condition(cond_of, indices):
    """``(cond_index, [image indices])`` for the images ``indices``, one group per conditioning
    (``cond_of[i]`` is image ``i``'s: a list, or a dict for this step's images), in conditioning
    order: one forward per group."""
    for cond_index in sorted({cond_of[i] for i in indices}):
        yield cond_index, [i for i in indices if cond_of[i] == cond_index]


def _by_size_and_condition(where, cond_of, indices):
    """``(size, cond_index, [image indices])`` for the images ``indices``, one group per image
    size (``where[i][0]``, in order of first appearance) and conditioning (``cond_of[i]`` is image
    ``i``'s: a list, or a dict for this step's images), in conditioning order: one forward per
    group."""
    for size in dict.fromkeys(where[i][0] for i in indices):
        for cond_index, chosen in _by_condition(cond_of, [i for i in indices if where[i][0] == size]):
            yield size, cond_index, chosen


def _denoise(model_wrap, cond, x_t, sigma, extra_args, autocast, copy_saved):
    """The model's denoised prediction for ``x_t`` at ``sigma`` under the one CONDITIONING entry
    ``cond`` (the caller restores ``model_wrap.conds["positive"]``)."""
    model_wrap.conds["positive"] = [cond]
    with autocast, saved_tensor_copies(copy_saved):
        return model_wrap(x_t, sigma, **extra_args)


def _draw(count: int, batch: int, weights, offset: int, generator) -> list[int]:
    """``batch`` of the images ``offset .. offset + count - 1`` (all of them if fewer), each at
    most once: uniformly, or with probability in proportion to ``weights[i]`` (without
    replacement) when the images have weights."""
    if weights is None:
        return (torch.randperm(count, generator=generator)[:batch] + offset).tolist()
    return (torch.multinomial(weights[offset:offset + count], min(batch, count),
                              replacement=False, generator=generator) + offset).tolist()


class _TrainingSampler(comfy.samplers.Sampler):
    """Runs :func:`sparse_core.train_atoms` where a sampler would run its steps."""

    def __init__(self, atoms, settings, n_concept, cond_of, on_step, copy_saved, empty_index=None,
                 run_state=None, sizes=None, weights=None):
        self.atoms, self.settings, self.n_concept = atoms, settings, n_concept
        self.cond_of, self.on_step, self.copy_saved = cond_of, on_step, copy_saved
        self.empty_index = empty_index  # the empty prompt's conditioning, for caption dropout
        self.run_state = run_state or RunState()
        self.sizes = sizes  # the images by size (ImagesBySize); none: one batch, in order
        self.weights = weights  # (training images,) how often each is drawn; none: all alike
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        settings = self.settings
        conds, sampling, x0_all, generator = _sampler_inputs(model_wrap, latent_image, settings.seed)
        run_state = self.run_state
        if run_state.resume is not None:  # the batches, noise and levels continue their stream
            generator.set_state(run_state.resume.extra["generator"])
        total = len(self.cond_of)  # training images; held-out validation images come after them
        autocast = torch.autocast(x0_all.device.type, dtype=torch.bfloat16,
                                  enabled=settings.dtype == "bf16")
        if self.sizes is None:
            x0_of, conds_of = {None: x0_all}, {None: conds}
            where = [(None, i) for i in range(len(x0_all))]
        else:
            x0_of, conds_of, where = self.sizes.prepare(model_wrap, x0_all, conds, settings.seed)

        def group_loss(indices, generator, levels=None, cond_of=None):
            """Mean prediction error over images ``indices``, one forward per conditioning
            (``cond_of``, default each image's own); noise levels ``levels[i]`` in [0, 1] per
            image when given, else drawn uniformly."""
            total_loss = 0.0
            for size, cond_index, chosen in _by_size_and_condition(where, cond_of or self.cond_of,
                                                                   indices):
                x0 = x0_of[size][[where[i][1] for i in chosen]]
                noise_ = torch.randn(x0.shape, generator=generator).to(x0)
                percents = [levels[i] for i in chosen] if levels else draw_levels(
                    len(chosen), generator, settings.timestep_sampling, settings.timestep_shift)
                sigma = torch.tensor([sampling.percent_to_sigma(float(u)) for u in percents]).to(x0)
                x_t = sampling.noise_scaling(sigma, noise_, x0, False)
                denoised = _denoise(model_wrap, conds_of[size][cond_index], x_t, sigma, extra_args,
                                    autocast,
                                    self.copy_saved)
                scale = prediction_scale(sampling, sigma, x0.dim())
                errors = image_errors(denoised, x0, scale, settings.loss_type)
                weights = level_weights(sampling, sigma, scale, settings.loss_weighting,
                                        settings.min_snr_gamma)
                total_loss = total_loss + (errors if weights is None else errors * weights).sum()
            return total_loss / len(indices)

        def loss_fn(step):
            chosen = _draw(self.n_concept, settings.batch, self.weights, 0, generator)
            cond_of = None
            if settings.caption_dropout > 0:  # drawn only then: without it, the same stream
                dropped = torch.rand(len(chosen), generator=generator) < settings.caption_dropout
                cond_of = {i: self.empty_index if drop else self.cond_of[i]
                           for i, drop in zip(chosen, dropped.tolist())}
            concept = group_loss(chosen, generator, cond_of=cond_of)
            if total > self.n_concept and settings.prior_weight > 0:
                prior = _draw(total - self.n_concept, settings.batch, self.weights, self.n_concept,
                              generator)
                return {"concept": concept,
                        "prior": settings.prior_weight * group_loss(prior, generator)}
            return concept

        checked = _check_images(self.n_concept, self.cond_of, settings)

        def check_fn():
            """The guard's check: the same loss on fixed images, noise and noise levels."""
            fixed = torch.Generator().manual_seed(settings.seed + 1)
            return {name: group_loss(indices, fixed, levels) *
                    (settings.prior_weight if name.startswith("prior") else 1.0)
                    for name, (indices, levels) in checked.items()}

        def on_state(state):
            state.extra.update(generator=generator.get_state(), data=run_state.fingerprint)
            if run_state.validation_losses:  # so a resumed run's curve has them all
                state.extra["validation_losses"] = torch.tensor(run_state.validation_losses,
                                                                dtype=torch.float64)
            run_state.on_state(state)

        hooks = []  # each runs after a step (with the steps done), before the caller's on_step
        run_state.validation_losses.clear()  # a retry starts them again
        run_state.samples.clear()
        if run_state.validation:  # held out: its own fixed noise, never the training stream
            picks, levels = _even_part(sorted(run_state.validation), CHECK_IMAGES)
            earlier = (run_state.resume.extra.get("validation_losses")
                       if run_state.resume is not None else None)
            if earlier is not None:
                run_state.validation_losses.extend((int(step), value)
                                                   for step, value in earlier.tolist())

            def validate(steps_done):
                if steps_done % VALIDATION_EVERY and steps_done != settings.steps:
                    return
                fixed = torch.Generator().manual_seed(settings.seed + 2)
                with torch.no_grad():
                    loss = group_loss(picks, fixed, levels, cond_of=run_state.validation)
                run_state.validation_losses.append((steps_done, float(loss)))

            hooks.append(validate)
        if run_state.previews:  # images from the model as it is: no gradients, own noise

            def sample(steps_done):
                due = [(request, positive, negative) for request, positive, negative
                       in run_state.previews if request.due(steps_done, settings.steps)]
                if not due:
                    return
                taken = []
                for request, positive, negative in due:
                    encoded = conds_of[request.latent.shape[1:] if self.sizes else None]
                    taken.append(draw_samples(model_wrap.inner_model, request, encoded[positive],
                                              None if negative is None else encoded[negative],
                                              extra_args["model_options"], autocast,
                                              x0_all.device))
                run_state.samples.append((steps_done, [r for r, _, _ in due], taken))
                if run_state.on_samples is not None:
                    run_state.on_samples(steps_done, taken)

            hooks.append(sample)
        if run_state.resume is None:
            for hook in hooks:
                hook(0)
        elif run_state.validation and run_state.resume.step not in {
                step for step, _ in run_state.validation_losses}:
            validate(run_state.resume.step)  # the state was saved before that step's validation
        def after_step(step, loss):
            for hook in hooks:
                hook(step + 1)
            if self.on_step is not None:
                self.on_step(step, loss)

        try:
            self.result = sc.train_atoms(self.atoms, loss_fn, settings,
                                         on_step=after_step if hooks else self.on_step,
                                         check_fn=check_fn, resume=run_state.resume,
                                         state_every=run_state.every,
                                         on_state=on_state if run_state.every else None)
        finally:
            model_wrap.conds["positive"] = conds
        return torch.zeros_like(latent_image)


CHECK_IMAGES = 16  # at most this many images per part of the guard's check (every 5 steps)
VALIDATION_EVERY = 5  # steps between validation losses (like the guard's check; and the last)


def _even_part(indices: list[int], size: int) -> tuple[list[int], dict[int, float]]:
    """Up to ``size`` of ``indices``, evenly spread, each with its own noise level, evenly spaced
    in (0, 1)."""
    picks = [indices[int(k)] for k in
             torch.linspace(0, len(indices) - 1, min(size, len(indices))).round().long().unique()]
    return picks, {i: (k + 0.5) / len(picks) for k, i in enumerate(picks)}


def _check_images(n_concept: int, cond_of: list[int], settings: TrainSettings) -> dict:
    """``{part: (image indices, {index: noise level})}`` for the guard's check: ``"concept"``,
    up to ``max(4, 2 * batch)`` (at most :data:`CHECK_IMAGES`) concept images; then one part per
    prior prompt (``"prior"``, or ``"prior 1"``, ``"prior 2"``... with several; prompts beyond
    :data:`CHECK_IMAGES` share parts), at least 2 images each: a prompt that drifts shows in its
    own part instead of vanishing in the mean. Noise levels are evenly spaced within each part.
    Every 5 steps it costs one forward pass per check image, no backward."""
    count = min(CHECK_IMAGES, max(4, 2 * settings.batch))

    part = _even_part
    parts = {"concept": part(list(range(n_concept)), count)}
    if len(cond_of) > n_concept and settings.prior_weight > 0:
        prompts = sorted({cond_of[i] for i in range(n_concept, len(cond_of))})
        groups = [prompts[k::CHECK_IMAGES] for k in range(min(CHECK_IMAGES, len(prompts)))]
        for k, group in enumerate(groups):
            indices = [i for i in range(n_concept, len(cond_of)) if cond_of[i] in group]
            name = "prior" if len(groups) == 1 else f"prior {k + 1}"
            parts[name] = part(indices, max(2, count // len(groups)))
    return parts


@dataclass
class RunState:
    """Saving and resuming a run: ``on_state(state)`` every ``every`` steps (0: never) gets a
    :class:`sparse_core.TrainingState` whose ``extra`` holds the training generator's state and
    the data's fingerprint; ``resume`` is a state to continue (its atoms are the ones trained)."""

    every: int = 0
    on_state: object = None
    resume: sc.TrainingState | None = None
    fingerprint: torch.Tensor | None = None
    resume_name: str = "the training state"  # for messages
    validation: dict | None = None  # {image index: conditioning index} of held-out images
    validation_losses: list = field(default_factory=list)  # [(steps done, loss)]
    sample_requests: list = field(default_factory=list)  # from Sparse Training Samples
    previews: list = field(default_factory=list)  # [(request, positive, negative cond index)]
    samples: list = field(default_factory=list)  # [(steps done, [request], [latents (B,C,H,W)])]
    on_samples: object = None  # on_samples(steps done, [latents]) after each sampling


def train(model, atoms: sc.SparseAtoms, concept: Dataset, settings: TrainSettings,
          prior: Dataset | None = None, on_step=None, empty_cond=None,
          run_state: RunState | None = None, validation: Dataset | None = None):
    """Train a copy of ``atoms`` on ``concept`` (and ``prior``); returns (atoms, TrainingResult).

    ``on_step(step, loss)`` runs after every step (progress, cancel); ``empty_cond`` (one
    CONDITIONING entry, the empty prompt's) is what ``settings.caption_dropout`` trains under;
    ``run_state`` saves states as training goes and resumes one (:class:`RunState`);
    ``validation`` (held-out images) gets its loss, on fixed noise and noise levels, before
    training and every :data:`VALIDATION_EVERY` steps (``run_state.validation_losses``);
    ``run_state.sample_requests`` (:class:`previews.SampleRequest`) are sampled before training,
    every ``request.every`` steps and after the last (``run_state.samples``)."""
    if settings.caption_dropout > 0 and empty_cond is None:
        raise ValueError(f"caption_dropout {settings.caption_dropout:g} needs the empty prompt's "
                         "conditioning (empty_conditioning)")
    concept_conds = broadcast_conds(concept.conds, len(concept), "Train Sparse Concept")
    latents, conds = concept.batches, concept_conds
    if prior is not None:
        latents += _matching(prior, concept, "prior")
        conds = conds + broadcast_conds(prior.conds, len(prior), "prior preservation")
    run_state = run_state or RunState()
    run_state.fingerprint = data_fingerprint(latents, len(concept))
    if run_state.resume is not None:
        check_resume(run_state.resume, run_state.fingerprint, run_state.resume_name)
        atoms = run_state.resume.atoms
    n_train = len(conds)
    if validation is not None:
        latents += _matching(validation, concept, "validation")
        conds = conds + broadcast_conds(validation.conds, len(validation), "validation")
    weights = None
    if concept.weights is not None or (prior is not None and prior.weights is not None):
        parts = [concept] + ([prior] if prior is not None else [])
        weights = torch.cat([torch.ones(len(d)) if d.weights is None else d.weights for d in parts])
    unique, cond_of = distinct_conds(conds)  # identical prompts share one forward pass
    run_state.validation = {i: cond_of[i] for i in range(n_train, len(cond_of))} or None
    cond_of = cond_of[:n_train]
    empty_index = None
    if settings.caption_dropout > 0:
        unique.append(empty_cond)
        empty_index = len(unique) - 1
    run_state.previews = []  # sampling prompts: encoded by the training guider too
    for request in run_state.sample_requests:
        positive, negative = len(unique), None
        unique.append(request.positive)
        if request.negative is not None:
            negative = len(unique)
            unique.append(request.negative)
        run_state.previews.append((request, positive, negative))

    sizes = ImagesBySize([t.detach().float() for t in latents])

    def make_sampler(wired, copy_saved):
        return _TrainingSampler(wired, settings, len(concept), cond_of, on_step, copy_saved,
                                empty_index, run_state, sizes, weights)

    trained, sampler = run_guided(model, atoms, sizes.first_batch, unique, make_sampler,
                                  seed=settings.seed, bf16=settings.dtype == "bf16",
                                  checkpointing=settings.gradient_checkpointing,
                                  what="Train Sparse Concept")
    return trained.to("cpu"), sampler.result


def _matching(extra: Dataset, concept: Dataset, name: str) -> list[torch.Tensor]:
    """``extra``'s batches, whose images must have the concept images' channels (and, but for
    their size, shape)."""
    ours = concept.batches[0].shape[1:-2]
    for batch in extra.batches:
        if batch.shape[1:-2] != ours:
            raise ValueError(f"{name} latents have images of shape {tuple(batch.shape[1:])}, the "
                             f"concept latents {tuple(concept.batches[0].shape[1:])}: they must "
                             "match but for their size")
    return extra.batches
