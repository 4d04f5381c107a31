"""Full-size checkpoints: random weights in the real single-file format (tools/random_checkpoint.py),
loaded by ComfyUI's own loader, the shipped SD1.5 workflows run end to end through the real server
at a small image size, and the exported LoRA in the stock LoraLoader equal to Apply on the real
SD1.5 key layout.

The checks of the tool itself (layout, writer, errors) are fast and run by default. The full-size
ones are slow (minutes, several GiB of memory): marked ``realsize``, which the default run
deselects. Run them with:

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 python -m pytest -q -s -m realsize tests/host/test_realsize.py

Environment:
- ``SPARSE_ATOMS_REALSIZE_ARCHS``: ``sd15`` (default) or ``sd15,sdxl`` (adds the SDXL loader check and
  sdxl_concept / sdxl_editing, then sdxl_composition on the concept's atoms). Measured on the CPU at 256 px: SD1.5's workflows peak at about
  9 GiB resident in the server; SDXL's loader check at 14 GiB, and its workflows at 14 GiB with
  ``--bf16-unet --fp16-text-enc`` (sdxl_concept 167 s, sdxl_editing 189 s of graph time on an
  otherwise busy 2-core CPU); in fp32 they need more than 24 GiB.
- ``SPARSE_ATOMS_REALSIZE_PX``: image size of the workflows (default 256).
- ``SPARSE_ATOMS_REALSIZE_DIR``: keep the generated checkpoints there between runs (default: a
  temporary directory, regenerated each run).
- ``SPARSE_ATOMS_REALSIZE_SERVER_ARGS``: more ComfyUI options for the server (e.g. ``--bf16-unet``).
- ``SPARSE_ATOMS_REALSIZE_REPORT``: append each run's figures (JSON lines) to this file.

Each workflow prints one ``REALSIZE {...}`` line: graph time (ComfyUI's execution_start to
execution_success, which includes loading the checkpoint) and the server's peak resident memory.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import comfy.model_base
import comfy.model_management as mm
import comfy.sd
import folder_paths
import nodes as comfy_nodes

import random_checkpoint
import sparse_core as sc
from comfy_server import ComfyServer
from host_support import COMFYUI_PATH, REPO, run_node

API = pathlib.Path(__file__).parent / "workflows_api"
TOOL = os.path.join(REPO, "tools", "random_checkpoint.py")
PX = int(os.environ.get("SPARSE_ATOMS_REALSIZE_PX", "256"))
ARCHS = os.environ.get("SPARSE_ATOMS_REALSIZE_ARCHS", "sd15").split(",")
WORKFLOWS = {"sd15_concept": "sd15", "sd15_editing": "sd15", "sdxl_concept": "sdxl", "sdxl_editing": "sdxl"}
EXPECTED = {  # what ComfyUI must make of each checkpoint
    "sd15": dict(config="SD15", clip="SD1ClipModel", context=768, pooled=768,
                 clip_key=("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                           "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")),
    "sdxl": dict(config="SDXL", clip="SDXLClipModel", context=2048, pooled=1280,
                 # ComfyUI splits open_clip's fused in_proj back into q/k/v: q is its first third
                 clip_key=("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                           "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")),
}
# Loader messages that mean a tensor was not where ComfyUI looks for it. Two are normal for
# downloaded checkpoints too: "clip missing" of only the keys every saver drops (logit scale,
# CLIP-L's text projection; logged at debug level, so that message counts from warning level up),
# and SDXL's "clip unexpected" CLIP-L position ids (the official file and ComfyUI's saver have them).
MISMATCH = ("unet missing", "unet unexpected", "clip missing", "clip unexpected", "Missing VAE keys",
            "Leftover VAE keys")
EXPECTED_UNEXPECTED = "clip unexpected ['clip_l.transformer.text_model.embeddings.position_ids']"


def mismatch(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if message.startswith("clip missing"):
        return record.levelno >= logging.WARNING
    return message.startswith(MISMATCH) and not message.startswith(EXPECTED_UNEXPECTED)


def report(figures: dict) -> None:
    line = json.dumps(figures)
    print(f"\nREALSIZE {line}")
    if os.environ.get("SPARSE_ATOMS_REALSIZE_REPORT"):
        with open(os.environ["SPARSE_ATOMS_REALSIZE_REPORT"], "a") as stream:
            stream.write(line + "\n")


def wanted(arch: str):
    if arch not in ARCHS:
        pytest.skip(f"{arch} not in SPARSE_ATOMS_REALSIZE_ARCHS={','.join(ARCHS)}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch)``: the path of a full-size fp16 random checkpoint, generated once."""
    folder = os.environ.get("SPARSE_ATOMS_REALSIZE_DIR") or str(tmp_path_factory.mktemp("checkpoints"))
    made = {}

    def get(arch: str) -> str:
        path = os.path.join(folder, f"random_{arch}_fp16_seed0.safetensors")
        if arch not in made and not os.path.exists(path):
            result = subprocess.run([sys.executable, TOOL, "--arch", arch, "--out", path, "--dtype", "fp16"],
                                    env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH),
                                    capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
            summary = json.loads(result.stdout.strip().splitlines()[-1])
            report({"step": "random_checkpoint", **summary})
        made[arch] = path
        return path

    return get


# Parameter counts of the released checkpoints: UNet, text encoder(s) (SDXL's with the CLIP-L
# position ids and CLIP-G logit scale its saver adds), VAE.
RELEASED = {"sd15": {"unet": 859_520_964, "text encoders": 123_060_480, "vae": 83_653_863},
            "sdxl": {"unet": 2_567_463_684, "text encoders": 817_720_398, "vae": 83_653_863}}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_layout_has_the_released_models_sizes(arch):
    """Built on the meta device in seconds; ``layout`` itself fails unless ComfyUI detects ``arch``
    with the config the UNet was built from."""
    state = random_checkpoint.layout(arch, torch.float16)
    counts = {}
    for key, value in state.items():
        counts[random_checkpoint._component(key)] = counts.get(random_checkpoint._component(key), 0) + value.numel()
    assert counts == RELEASED[arch]
    prefixes = {"sd15": ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model."),
                "sdxl": ("model.diffusion_model.", "conditioner.embedders.0.transformer.text_model.",
                         "conditioner.embedders.1.model.", "first_stage_model.")}[arch]
    assert all(key.startswith(prefixes) for key in state)
    assert all(prefix and any(key.startswith(prefix) for key in state) for prefix in prefixes)


def test_values_are_fan_in_scaled_and_seeded_per_key():
    meta = torch.device("meta")
    kernel = torch.empty(256, 64, 3, 3, device=meta)
    first = random_checkpoint.random_tensor("a.weight", kernel, torch.float16, seed=0)
    assert first.dtype == torch.float16 and first.shape == kernel.shape
    assert abs(first.float().std().item() * (64 * 9) ** 0.5 - 1) < 0.02  # N(0, 1 / fan_in)
    assert torch.equal(first, random_checkpoint.random_tensor("a.weight", kernel, torch.float16, seed=0))
    assert not torch.equal(first, random_checkpoint.random_tensor("a.weight", kernel, torch.float16, seed=1))
    assert not torch.equal(first, random_checkpoint.random_tensor("b.weight", kernel, torch.float16, seed=0))
    vector = torch.empty(64, device=meta)
    assert torch.equal(random_checkpoint.random_tensor("norm.weight", vector, torch.bfloat16, 0),
                       torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(random_checkpoint.random_tensor("norm.bias", vector, torch.float32, 0), torch.zeros(64))
    ids = torch.arange(77).expand(1, -1)  # a saver's constant keeps its values
    assert torch.equal(random_checkpoint.random_tensor("position_ids", ids, torch.float16, 0), ids)


def test_streaming_writer_round_trip_and_refusals(tmp_path):
    meta = torch.device("meta")
    state = {"half": torch.empty(3, 4, dtype=torch.float16, device=meta),
             "brain": torch.empty(5, dtype=torch.bfloat16, device=meta),
             "ids": torch.arange(7).view(1, 7),
             "full": torch.empty(2, 2, 3, device=meta)}
    values = {k: v if v.device != meta else torch.randn(v.shape).to(v.dtype) for k, v in state.items()}
    path = tmp_path / "a.safetensors"
    size = random_checkpoint.write_streaming(str(path), state, lambda key, like: values[key], {"seed": "3"})
    assert size == path.stat().st_size
    with safe_open(path, framework="pt") as stored:
        assert stored.metadata() == {"seed": "3"} and sorted(stored.keys()) == sorted(state)
        for key, value in values.items():
            assert torch.equal(stored.get_tensor(key), value), key

    with pytest.raises(FileExistsError, match="--overwrite"):
        random_checkpoint.write_streaming(str(path), state, lambda key, like: values[key], {})
    wrong = {**values, "full": torch.zeros(3, 2, 2)}
    with pytest.raises(RuntimeError, match=r"full: made torch.float32 \(3, 2, 2\), the header says"):
        random_checkpoint.write_streaming(str(tmp_path / "b.safetensors"), state, lambda k, like: wrong[k], {})
    assert os.listdir(tmp_path) == ["a.safetensors"]  # nothing half-written left behind


def test_bad_arguments_and_missing_comfyui_are_named(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of .*got 'sd3'"):
        random_checkpoint.write_checkpoint("sd3", str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="dtype must be one of .*got 'fp8'"):
        random_checkpoint.write_checkpoint("sd15", str(tmp_path / "x.safetensors"), "fp8")
    bare = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")}
    for extra, message in (({}, "ComfyUI not found: set COMFYUI_PATH"),
                           ({"COMFYUI_PATH": str(tmp_path)}, "is not a ComfyUI checkout")):
        result = subprocess.run([sys.executable, TOOL, "--arch", "sd15", "--out", str(tmp_path / "x.safetensors")],
                                env={**bare, **extra}, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.realsize
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_random_checkpoint_loads_like_a_downloaded_one(checkpoint, caplog, arch):
    """What CheckpointLoaderSimple calls, with the UNet kept in the file's fp16 (so every weight
    compares exactly and SDXL fits): detected as ``arch``, every tensor where ComfyUI looks for
    it, the text encoder(s) and the VAE work."""
    wanted(arch)
    expected = EXPECTED[arch]
    path = checkpoint(arch)
    caplog.set_level(logging.DEBUG)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=True, output_clip=True, model_options={"dtype": torch.float16},
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
    try:
        assert clip is not None and vae is not None, "ComfyUI found no text encoder or no VAE in the file"
        assert type(model.model.model_config).__name__ == expected["config"]
        assert model.model.model_type == comfy.model_base.ModelType.EPS
        assert type(clip.cond_stage_model).__name__ == expected["clip"]
        mismatches = [r.getMessage()[:300] for r in caplog.records if mismatch(r)]
        assert not mismatches, mismatches

        unet = model.model.diffusion_model.state_dict()
        prefix = "model.diffusion_model."
        with safe_open(path, framework="pt") as stored:
            unet_keys = [k for k in stored.keys() if k.startswith(prefix)]
            assert len(unet_keys) == len(unet)
            for key in unet_keys:
                assert torch.equal(unet[key[len(prefix):]].cpu(), stored.get_tensor(key)), key
            file_key, clip_key = expected["clip_key"]
            clip_weight = clip.cond_stage_model.state_dict()[clip_key].cpu()
            assert torch.equal(clip_weight.half(), stored.get_tensor(file_key)[: clip_weight.shape[0]])
            vae_weight = vae.first_stage_model.state_dict()["decoder.conv_in.weight"].cpu()
            assert torch.equal(vae_weight.half(), stored.get_tensor("first_stage_model.decoder.conv_in.weight"))

        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of sks dog"), return_pooled=True)
            image = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
            latent = vae.encode(image)
        assert cond.shape == (1, 77, expected["context"]) and pooled.shape == (1, expected["pooled"])
        assert image.shape == (1, 64, 64, 3) and latent.shape == (1, 4, 8, 8)
        for name, tensor in (("cond", cond), ("pooled", pooled), ("image", image), ("latent", latent)):
            assert torch.isfinite(tensor).all() and tensor.float().std() > 0, name
    finally:
        del model, clip, vae
        mm.unload_all_models()
        mm.soft_empty_cache()


def small_run(graph: dict) -> dict:
    """The shipped graph at ``PX`` pixels with 2 training and 2 sampling steps."""
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=PX, height=PX)
        elif node["class_type"] in ("SparseAtoms_TrainConcept", "KSampler"):
            inputs["steps"] = 2
        elif node["class_type"] == "SparseAtoms_LoadTrainingImages":
            inputs["max_size"] = PX
    return graph


def write_inputs(folder: pathlib.Path, graph: dict) -> None:
    """The user's images: smooth random colour fields of ``PX`` pixels."""
    generator = np.random.default_rng(0)

    def picture():
        coarse = generator.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize((PX, PX), Image.Resampling.BICUBIC)

    for node in graph.values():
        if node["class_type"] == "SparseAtoms_LoadTrainingImages":
            (folder / node["inputs"]["folder"]).mkdir(parents=True)
            for i in range(2):
                picture().save(folder / node["inputs"]["folder"] / f"{i}.png")
            (folder / node["inputs"]["folder"] / "1.txt").write_text("a photo of sks dog, grass")
        elif node["class_type"] == "LoadImage":
            folder.mkdir(parents=True, exist_ok=True)
            picture().save(folder / node["inputs"]["image"])


def peak_rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as stream:
        line = next(line for line in stream if line.startswith("VmHWM:"))
    return int(line.split()[1]) // 1024


def comfy_base(tmp_path, graphs, arch, checkpoint) -> pathlib.Path:
    """A ComfyUI base folder for ``graphs``: their checkpoints linked to the random one of
    ``arch``, the user's input images written."""
    base = tmp_path / "comfy"
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for graph in graphs:
        link = checkpoints / graph["1"]["inputs"]["ckpt_name"]
        if not link.exists():
            link.symlink_to(checkpoint(arch))
        write_inputs(base / "input", graph)
    return base


def server_args() -> list[str]:
    return os.environ.get("SPARSE_ATOMS_REALSIZE_SERVER_ARGS", "").split()


def check_run(server, entry, base, peak, figures) -> None:
    """The graph succeeded; report its time and memory; it saved one ``PX`` image with content."""
    assert "execution_success" in server.messages(entry), server.log_tail()
    times = {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"]}
    report({**figures, "px": PX, "sample_steps": 2, "server_args": server_args(),
            "graph_seconds": round((times["execution_success"] - times["execution_start"]) / 1000, 1),
            "server_peak_rss_mib": peak})
    images = [np.asarray(Image.open(base / "output" / image.get("subfolder", "") / image["filename"]))
              for output in entry["outputs"].values() for image in output.get("images", [])
              if image["type"] == "output"]
    assert len(images) == 1 and images[0].shape == (PX, PX, 3) and images[0].std() > 0


@pytest.mark.realsize
@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_workflow_runs_end_to_end(checkpoint, node_classes, tmp_path, caplog, name):
    arch = WORKFLOWS[name]
    wanted(arch)
    graph = small_run(json.loads((API / f"{name}.json").read_text()))
    base = comfy_base(tmp_path, [graph], arch, checkpoint)
    server = ComfyServer(COMFYUI_PATH, base=str(base), extra_args=server_args()).start()
    try:
        entry = server.run(graph, timeout=3 * 3600)
        peak = peak_rss_mib(server.process.pid)
    finally:
        server.stop()
    check_run(server, entry, base, peak, {"workflow": name, "train_steps": 2})
    if any(node["class_type"] == "SparseAtoms_ToLoRA" for node in graph.values()):
        lora_equals_apply(node_classes, base, graph["1"]["inputs"]["ckpt_name"], caplog)


@pytest.mark.realsize
def test_sdxl_composition_runs_on_atoms_the_concept_workflow_wrote(checkpoint, tmp_path):
    """sdxl_concept writes the atoms sdxl_composition loads; the composition's second file (a
    style the user trained) is a copy of them here. Both graphs through one real server."""
    wanted("sdxl")
    concept, composition = (small_run(json.loads((API / f"{name}.json").read_text()))
                            for name in ("sdxl_concept", "sdxl_composition"))
    base = comfy_base(tmp_path, [concept, composition], "sdxl", checkpoint)
    server = ComfyServer(COMFYUI_PATH, base=str(base), extra_args=server_args()).start()
    try:
        first = server.run(concept, timeout=3 * 3600)
        assert "execution_success" in server.messages(first), server.log_tail()
        folder = base / "models" / "sparse_atoms"
        written = folder / composition["2"]["inputs"]["atoms_name"]
        assert written.is_file(), sorted(folder.rglob("*"))
        (folder / composition["3"]["inputs"]["atoms_name"]).write_bytes(written.read_bytes())
        entry = server.run(composition, timeout=3 * 3600)
        peak = peak_rss_mib(server.process.pid)
    finally:
        server.stop()
    check_run(server, entry, base, peak, {"workflow": "sdxl_composition"})


def patched_weights(patcher, keys):
    """The weights a sampler would use: load the patcher, read them, unload."""
    mm.unload_all_models()
    mm.load_models_gpu([patcher], force_full_load=True)
    state = patcher.model.state_dict()
    weights = {k: state[k].detach().to("cpu", copy=True) for k in keys}
    mm.unload_all_models()
    return weights


def lora_equals_apply(node_classes, base, ckpt_name, caplog):
    """The workflow's LoRA file through the stock CheckpointLoaderSimple + LoraLoader gives the
    weights Apply gives from its atoms file, on every adapted layer of the real UNet."""
    atoms_files = sorted((base / "models" / "sparse_atoms").rglob("*.safetensors"))
    lora_files = sorted((base / "models" / "loras").rglob("*.safetensors"))
    assert len(atoms_files) == 1 and len(lora_files) == 1, (atoms_files, lora_files)
    atoms = sc.load_atoms(atoms_files[0])
    assert atoms.n_active > 0 and all(np.isfinite(atoms.info.training["losses"]))
    active = [f"{key}.weight" for key, layer in atoms.layers.items() if bool((layer.coefficients != 0).any())]
    added = [("checkpoints", str(base / "models" / "checkpoints")), ("loras", str(base / "models" / "loras"))]
    for folder, path in added:
        folder_paths.add_model_folder_path(folder, path)
    caplog.set_level(logging.WARNING)
    try:
        with torch.inference_mode():
            model, clip, _ = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)
            lora_name = str(lora_files[0].relative_to(base / "models" / "loras"))
            via_lora, _ = comfy_nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 1.0)
        assert sorted(k for k in via_lora.patches if isinstance(k, str)) == sorted(active)
        not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
        assert not not_loaded, not_loaded[:5]
        applied = run_node(node_classes["SparseAtoms_Apply"], model=model, sparse_atoms=atoms,
                           strength=1.0, density=1.0)[0]
        base_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.model.state_dict().items()
                        if k in active}
        got, expected = patched_weights(via_lora, active), patched_weights(applied, active)
        changed = 0
        for key in active:
            # the same sum rounded to the stored dtype (fp16 on a GPU) may land one step apart
            rtol = max(1e-5, 2 * torch.finfo(expected[key].dtype).eps)
            assert torch.allclose(got[key], expected[key], rtol=rtol, atol=1e-6), key
            changed += not torch.equal(expected[key], base_weights[key])
        assert changed == len(active), f"only {changed} of {len(active)} adapted weights changed"
    finally:
        for folder, path in added:
            folder_paths.folder_names_and_paths[folder][0].remove(path)
        mm.unload_all_models()
