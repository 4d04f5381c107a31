"""Build Atom Dictionary, Train Sparse Concept, Apply Sparse Atoms, Atom Mask Editor."""

from __future__ import annotations

import logging
import re
import time

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

import sparse_core as sc

from . import explorer, masks, presets, routes
from .checkpoints import NO_RESUME, PeriodicSaver, load_state, state_files, widget_message
from .common import (CATEGORY, FOLDER, AtomDict, SparseAtomsType, TrainingOptionsType,
                     TrainingSamplesType, check_finite, rgb_to_image, save_numbered, send_text)
from .concept import train_concept
from .datasets import dataset, single, single_conditioning
from .guided import Cancelled
from .option_nodes import OPTION_FIELDS
from .patching import adaptable_layers, apply_to_model, check_fit, model_family, model_weights
from .previews import LiveCurve, check_requests
from .training import RunState, TrainSettings

log = logging.getLogger("sparse_atoms")


def build_dictionary(model, preset: str, layer_regex: str, atoms_per_layer: int, method: str,
                     seed: int, progress=None) -> tuple[sc.SparseAtoms, str]:
    """The dictionary and a one-line report of what was selected."""
    family, architecture = model_family(model)
    layers = adaptable_layers(model)
    regex = presets.preset_regex(family, preset, layer_regex)
    chosen = presets.select_layers(list(layers), regex, family=f"{family}: {architecture}", preset=preset)
    device = model.load_device
    weights = {key: weight.to(device) for key, weight in model_weights(model, chosen).items()}
    atoms = sc.build_atoms(weights, atoms_per_layer, method, seed=seed, fit_to_layer=True,
                           info=sc.AtomsInfo(architecture=architecture), progress=progress)
    atoms = atoms.to("cpu")
    parameters = sum(w.numel() for w in weights.values())
    smaller = sum(layer.n_atoms < atoms_per_layer for layer in atoms.layers.values())
    report = (f"{len(chosen)} layers selected ({parameters:,} weights) in this {architecture} model "
              f"({family}); {atoms.n_atoms} atoms ({method}, {atoms_per_layer} per layer"
              + (f"; {smaller} small layers have only min(out, in)" if smaller else "") + ")")
    return atoms, report


class BuildAtomDictionary(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_BuildDictionary", display_name="Build Atom Dictionary",
            category=CATEGORY,
            description="Chooses the layers to adapt and builds a dictionary of atoms for each "
                        "(coefficients start at zero, so the model is unchanged until trained).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to adapt."),
                io.Combo.Input("preset", options=presets.PRESET_NAMES, default="cross-attention k/v",
                               tooltip="Which layers to adapt, per model family. 'cross-attention "
                                       "k/v' binds a new word with the least effect on other prompts."),
                io.String.Input("layer_regex", default="",
                                tooltip="With preset 'custom regex': a regular expression searched "
                                        "in layer names such as diffusion_model.x.attn2.to_k."),
                io.Int.Input("atoms_per_layer", default=32, min=1, max=4096,
                             tooltip="Atoms in each layer's dictionary ('svd' allows at most "
                                     "min(out, in) of the layer)."),
                io.Combo.Input("method", options=list(sc.DICTIONARY_METHODS), default="svd",
                               tooltip="svd: principal directions of the weight; sparse: sparse "
                                       "dictionary learning on the weight (may be overcomplete); "
                                       "random: random orthonormal atoms."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seeds 'sparse' and 'random'."),
            ],
            outputs=[AtomDict.Output("atom_dict", display_name="ATOM_DICT")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, preset, layer_regex, atoms_per_layer, method, seed):
        bar = None

        def progress(done, total, key):
            nonlocal bar
            bar = bar or comfy.utils.ProgressBar(total)
            bar.update_absolute(done, total)

        atoms, report = build_dictionary(model, preset, layer_regex, atoms_per_layer, method, seed,
                                         progress)
        log.info("Build Atom Dictionary: %s", report)
        return io.NodeOutput(atoms, ui={"text": [report]})


DATA_INPUTS = {"latents", "conditioning", "prior_latents", "prior_conditioning",
               "validation_latents", "validation_conditioning"}


class TrainSparseConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_TrainConcept", display_name="Train Sparse Concept", category=CATEGORY,
            description="Teaches the model a concept from a few images by training sparse atoms "
                        "(l1 and an atom budget keep only a handful).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to teach."),
                io.Latent.Input("latents", tooltip="The concept's images, VAE-encoded (a batch)."),
                io.Conditioning.Input("conditioning", tooltip="One prompt for all images, or one per image."),
                io.MultiType.Input(
                    AtomDict.Input("atom_dict", optional=True,
                                   tooltip="From Build Atom Dictionary, or trained atoms (Load "
                                           "Sparse Atoms, e.g. a saved step) to train further; "
                                           "default: cross-attention k/v, 32 svd atoms per layer."),
                    types=[AtomDict, SparseAtomsType]),
                io.Latent.Input("prior_latents", optional=True,
                                tooltip="Prior preservation: images of the class (e.g. the base "
                                        "model's own samples) so other prompts keep their meaning."),
                io.Conditioning.Input("prior_conditioning", optional=True,
                                      tooltip="The prompt(s) of the prior images: one, or one per image."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the prior-preservation loss."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=0.003, min=1e-6, max=1.0, step=1e-5,
                               tooltip="Adam learning rate for the coefficients (and atoms)."),
                io.Int.Input("batch_size", default=1, min=1, max=256,
                             tooltip="Images per step (and prior images per step)."),
                io.Float.Input("l1", default=0.0, min=0.0, max=100.0, step=0.001,
                               tooltip="l1 weight on the coefficients (soft-threshold lr*l1 after each step)."),
                io.Int.Input("atom_budget", default=24, min=0, max=1_000_000,
                             tooltip="At most this many atoms (over the whole model) stay non-zero, "
                                     "enforced gradually during training; 0 = no budget."),
                io.Boolean.Input("tune_atoms", default=True,
                                 tooltip="Train the atoms' directions too (the paper's default), not "
                                         "only their coefficients."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds batches, noise and noise levels: same seed, same atoms."),
                io.Combo.Input("training_dtype", options=["fp32", "bf16"], default="fp32",
                               tooltip="Compute dtype of the model during training (atoms stay fp32)."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Less memory, about a third more time per step."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=0.95, step=0.05,
                               optional=True,
                               tooltip="Share of the concept's images trained under the empty "
                                       "prompt each step (as base models are trained): teach a "
                                       "style with 0.3 so guidance does not exaggerate it. Needs "
                                       "empty_conditioning."),
                io.Conditioning.Input("empty_conditioning", optional=True,
                                      tooltip="The empty prompt's conditioning (your negative "
                                              "prompt encoder on ''), for caption_dropout."),
                TrainingOptionsType.Input("options", optional=True,
                                          tooltip="From Sparse Training Options: lr schedule, "
                                                  "weight decay, gradient accumulation and "
                                                  "clipping, noise levels, loss."),
                io.Int.Input("save_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Every this many steps (and at the end) save the atoms to "
                                     "models/sparse_atoms and the whole training state to "
                                     "models/sparse_atoms_states (to resume from); 0 = off."),
                io.String.Input("save_name", default="checkpoints/concept", optional=True,
                                tooltip="Name of the saves: <save_name>_<run>_step<step>."
                                        "safetensors; a new run number each run, nothing is "
                                        "replaced."),
                io.Latent.Input("validation_latents", optional=True,
                                tooltip="Held-out images of the concept: their loss (fixed noise "
                                        "and noise levels) every 5 steps, drawn on the loss curve."),
                io.Conditioning.Input("validation_conditioning", optional=True,
                                      tooltip="The validation images' prompt(s): one, or one per image."),
                io.Combo.Input("resume_from", options=state_files(), default=NO_RESUME,
                               optional=True,
                               tooltip="A saved training state (models/sparse_atoms_states) to "
                                       "continue exactly: same images and settings, steps the "
                                       "run's total (more than the state's)."),
                TrainingSamplesType.Input("samples", optional=True,
                                          tooltip="From Sparse Training Samples: prompts sampled "
                                                  "every N steps, shown while training runs and "
                                                  "returned as the samples output."),
            ],
            outputs=[io.Model.Output("trained_model", display_name="MODEL"),
                     SparseAtomsType.Output("sparse_atoms", display_name="SPARSE_ATOMS"),
                     io.Image.Output("loss_curve", display_name="loss curve"),
                     io.Image.Output("sample_images", display_name="samples",
                                     tooltip="Sparse Training Samples' images, in the order "
                                             "sampled (empty without samples).")],
            hidden=[io.Hidden.unique_id],
            is_input_list=True,  # takes the lists of current ComfyUI's dataset nodes
        )

    @classmethod
    def execute(cls, **inputs):
        """Every input arrives as a list (``is_input_list``): the data sets stay lists (of
        LATENT batches, of CONDITIONING), every other input is its one value."""
        for name, value in inputs.items():
            if name not in DATA_INPUTS:
                inputs[name] = (single_conditioning if name == "empty_conditioning" else single)(
                    value, name)
        return cls._execute(**inputs)

    @classmethod
    def _execute(cls, model, latents, conditioning, steps, learning_rate, batch_size, l1,
                atom_budget, tune_atoms, seed, training_dtype, gradient_checkpointing,
                atom_dict=None, prior_latents=None, prior_conditioning=None, prior_weight=1.0,
                caption_dropout=0.0, empty_conditioning=None, options=None, save_every=0,
                save_name="checkpoints/concept", resume_from=NO_RESUME, validation_latents=None,
                validation_conditioning=None, samples=None):
        check_finite("Train Sparse Concept", learning_rate=learning_rate, l1=l1,
                     prior_weight=prior_weight, caption_dropout=caption_dropout)
        concept = dataset(model, latents, conditioning, "latents", "conditioning")
        prior = None
        if (prior_latents is None) != (prior_conditioning is None):
            raise ValueError("prior preservation needs both prior_latents and prior_conditioning")
        if prior_latents is not None:
            prior = dataset(model, prior_latents, prior_conditioning, "prior_latents",
                            "prior_conditioning")
        validation = None
        if (validation_latents is None) != (validation_conditioning is None):
            raise ValueError("Train Sparse Concept: a validation loss needs both "
                             "validation_latents and validation_conditioning")
        if validation_latents is not None:
            validation = dataset(model, validation_latents, validation_conditioning,
                                 "validation_latents", "validation_conditioning")
        empty = None
        if caption_dropout > 0:
            if not empty_conditioning or len(empty_conditioning) != 1:
                given = "none" if not empty_conditioning else f"{len(empty_conditioning)} entries"
                raise ValueError(f"Train Sparse Concept: caption_dropout {caption_dropout:g} trains "
                                 "images under the empty prompt: wire its CONDITIONING (one entry, "
                                 f"e.g. your text encoder on '') to empty_conditioning (got {given})")
            empty = empty_conditioning[0]
        atoms, resume = atom_dict, None
        if resume_from != NO_RESUME:  # the state's dictionary, every atom of it, is what trains
            resume = load_state(resume_from)
            atoms = resume.atoms
            check_fit(model, atoms)
        elif atoms is None:
            atoms, report = build_dictionary(model, "cross-attention k/v", "", 32, "svd", seed)
            log.info("Train Sparse Concept: no ATOM_DICT given, built %s", report)
        else:
            check_fit(model, atoms)
        settings = TrainSettings(steps=steps, lr=learning_rate, batch=batch_size, l1=l1,
                                 budget=atom_budget or None, train_atoms=tune_atoms, seed=seed,
                                 dtype=training_dtype, gradient_checkpointing=gradient_checkpointing,
                                 prior_weight=prior_weight, caption_dropout=caption_dropout,
                                 **_options(options))
        node_id = cls.hidden.unique_id
        bar = comfy.utils.ProgressBar(steps)
        sizes = list(dict.fromkeys(batch.shape[1:] for batch in concept.batches))
        requests = [] if samples is None else check_requests(samples, sizes)
        curve = LiveCurve([] if resume is None else resume.history["losses"],
                          lambda latents: explorer.to_rgb(model, latents))

        def on_step(step, loss):
            picture = curve.add(loss, step + 1 == steps, run_state.validation_losses)
            bar.update_absolute(step + 1, steps, picture)
            send_text(f"step {step + 1}/{steps}  loss {loss:.4f}", node_id)
            comfy.model_management.throw_exception_if_processing_interrupted()

        run_state = RunState(every=save_every, resume=resume, resume_name=repr(resume_from),
                             on_state=PeriodicSaver(save_name, node_id) if save_every else None,
                             sample_requests=requests, on_samples=curve.add_samples)
        try:
            run = train_concept(model, atoms, concept, settings, run_state=run_state,
                                on_step=on_step, prior=prior, validation=validation,
                                empty_cond=empty, resume_file=resume_from, node_id=node_id)
        except ValueError as error:
            if str(error).startswith("resume:"):
                raise ValueError(widget_message(error)) from None
            raise
        except Cancelled as cancelled:  # the atoms of the last completed step are kept
            _save_interrupted(cancelled.atoms, node_id)
            raise
        return io.NodeOutput(run.model, run.atoms, run.loss_curve, run.samples,
                             ui={"text": [run.message]})


def _options(options) -> dict:
    """The fields a Sparse Training Options node gives (checked again with the steps)."""
    if options is None:
        return {}
    if not isinstance(options, dict) or not set(options) <= OPTION_FIELDS:
        raise ValueError("Train Sparse Concept: options must come from a Sparse Training Options "
                         f"node, got {type(options).__name__}")
    return options


def _save_interrupted(atoms, node_id) -> None:
    """Cancelling keeps the atoms of the last completed step: they are saved (atomically) to
    models/sparse_atoms/interrupted/<time>-node<id>_00001.safetensors (a new number for every
    cancel) and the log says where; the input model is unchanged."""
    if atoms is None:
        return
    node = re.sub(r"[^A-Za-z0-9_-]", "-", str(node_id))  # e.g. "12:5" inside a subgraph
    path = save_numbered(folder_paths.get_folder_paths(FOLDER)[0],
                         f"interrupted/{time.strftime('%Y%m%d-%H%M%S')}-node{node}",
                         "Train Sparse Concept (cancelled)",
                         lambda target, overwrite: sc.save_atoms(atoms, target, overwrite=overwrite),
                         overwrite=False)  # a new numbered name: never replaces an earlier run's atoms
    log.warning("Train Sparse Concept cancelled; the atoms of the last completed step were saved "
                "to %s", path)


class ApplySparseAtoms(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_Apply", display_name="Apply Sparse Atoms", category=CATEGORY,
            description="Patches W + strength * delta W of the kept atoms into the model (merged "
                        "when the model loads: no cost per sampling step). Chain two to combine a "
                        "concept and a style; stacks with LoRAs.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it may already carry LoRAs or atoms)."),
                SparseAtomsType.Input("sparse_atoms", tooltip="Trained, loaded or masked atoms."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of delta W (negative removes the concept)."),
                io.Float.Input("density", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Keep the top ceil(density * N) atoms by importance."),
            ],
            outputs=[io.Model.Output("patched_model", display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, sparse_atoms, strength, density):
        check_finite("Apply Sparse Atoms", strength=strength, density=density)
        kept = sparse_atoms.density(density)
        patched = apply_to_model(model, kept, strength)
        return io.NodeOutput(patched, ui={"text": [f"{kept.n_atoms} of {sparse_atoms.n_atoms} atoms "
                                                   f"applied at strength {strength:g}"]})


class AtomMaskEditor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_MaskEditor", display_name="Atom Mask Editor", category=CATEGORY,
            description="Shows which atoms matter (layers x atoms by importance) and keeps the ones "
                        "you choose: density selects the most important, the mask switches atoms off.",
            inputs=[
                SparseAtomsType.Input("sparse_atoms", tooltip="The atoms to inspect and mask."),
                io.String.Input("mask", default="", multiline=False,
                                tooltip="Atoms switched off (JSON written by the editor widget; "
                                        "empty keeps every atom)."),
                io.Float.Input("density", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Keep the top ceil(density * N) atoms by importance."),
            ],
            outputs=[SparseAtomsType.Output("masked_atoms", display_name="SPARSE_ATOMS"),
                     io.Image.Output("importance", display_name="importance")],
        )

    @classmethod
    def execute(cls, sparse_atoms, mask, density):
        check_finite("Atom Mask Editor", density=density)
        off = masks.parse_mask(mask, sparse_atoms)
        keep = masks.keep_masks(sparse_atoms, off, density)
        kept = sparse_atoms.select(keep)
        kept_ids = {key: set(layer.index.tolist()) for key, layer in kept.layers.items()}
        table = sc.importance_table(sparse_atoms, kept=kept_ids)
        routes.remember(table)  # a reloaded page gets it back by table["id"]
        picture = rgb_to_image(masks.heatmap_picture(table))
        summary = masks.editor_summary(table)
        return io.NodeOutput(kept, picture, ui={"atom_table": [table], "text": [summary]})


NODES = [BuildAtomDictionary, TrainSparseConcept, ApplySparseAtoms, AtomMaskEditor]
