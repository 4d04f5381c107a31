"""Write a full-size random-weight SD1.5 or SDXL checkpoint in the real single-file format.

    COMFYUI_PATH=/path/to/ComfyUI python tools/random_checkpoint.py --arch sd15 --out /tmp/sd15.safetensors
    python tools/random_checkpoint.py --arch sdxl --out /tmp/sdxl.safetensors --dtype bf16 --seed 1

The layout comes from ComfyUI's own classes, exactly as ``comfy.sd.save_checkpoint`` writes it:
the model config (``comfy.supported_models.SD15`` / ``SDXL``) builds the UNet, ``comfy.sd.CLIP``
the text encoder(s) and ``AutoencoderKL`` the VAE, all on the ``meta`` device (shapes, no memory);
the config's ``process_{unet,clip,vae}_state_dict_for_saving`` give the checkpoint's key names
(``model.diffusion_model.*``, ``cond_stage_model.*`` or ``conditioner.embedders.*``,
``first_stage_model.*``). ComfyUI's own detection must then recognise the UNet as ``--arch``.

Values: every matrix and convolution kernel is ``N(0, 1 / fan_in)`` (fan_in = elements per output
row), norm gains are 1 and biases 0, so activations keep unit scale through any depth of
normalised residual blocks and stay finite in fp16. Each tensor is drawn from its own generator
(the key's CRC32 started from ``--seed``), made in the target dtype and streamed to the file, so
memory stays at about one tensor (the largest: SDXL's 49408 x 1280 token embedding) whatever the
model size. The file is written to a temporary name and renamed; an existing file is refused
unless ``--overwrite``. Nothing is downloaded: the tokenizers ship inside ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
import zlib

import torch

# Full UNet configs of the released models, as comfy.model_detection derives them from their weights.
_UNET_COMMON = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4,
                    model_channels=320, use_spatial_transformer=True, legacy=False,
                    use_temporal_attention=False, use_temporal_resblock=False)
UNET_CONFIGS = {
    "sd15": dict(_UNET_COMMON, num_classes=None, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_middle=1, transformer_depth_output=[1] * 9 + [0] * 3,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1),
    "sdxl": dict(_UNET_COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_linear_in_transformer=True, context_dim=2048, num_heads=-1, num_head_channels=64),
}
CONFIG_CLASSES = {"sd15": "SD15", "sdxl": "SDXL"}
# ComfyUI's default SD1.x/SDXL VAE (comfy.sd.VAE picks it for these checkpoints).
VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
DTYPES = {"fp16": ("float16", "F16"), "bf16": ("bfloat16", "BF16"), "fp32": ("float32", "F32")}
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int64": "I64"}


def import_comfy():
    """Put ComfyUI on ``sys.path`` (``COMFYUI_PATH``, else whatever ``PYTHONPATH`` holds) and import
    what the checkpoint is built from, on the CPU (no device is probed or used)."""
    path = os.environ.get("COMFYUI_PATH")
    if path:
        if not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
            raise SystemExit(f"random_checkpoint: COMFYUI_PATH={path!r} is not a ComfyUI checkout "
                             "(no comfy/sd.py in it)")
        if os.path.abspath(path) not in sys.path:
            sys.path.insert(0, os.path.abspath(path))
    try:
        from comfy.cli_args import args
    except ImportError as error:
        raise SystemExit("random_checkpoint: ComfyUI not found: set COMFYUI_PATH to a ComfyUI "
                         f"checkout or put one on PYTHONPATH ({error})") from None
    if "comfy.model_management" not in sys.modules:  # run as a script: no GPU probe, none needed
        args.cpu = True
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    return comfy


def layout(arch: str, dtype) -> dict:
    """``{checkpoint key: tensor}`` of a full ``arch`` checkpoint: ``meta`` tensors (shape and
    dtype only) for weights, real ones for the few constants ComfyUI's savers add (position ids)."""
    comfy = import_comfy()
    config = getattr(comfy.supported_models, CONFIG_CLASSES[arch])(dict(UNET_CONFIGS[arch]))
    config.set_inference_dtype(dtype, None)
    meta = torch.device("meta")
    with meta:
        unet = config.get_model({}).diffusion_model.state_dict()
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(config.clip_target(), model_options={
        "initial_device": meta, "load_device": cpu, "offload_device": cpu, "dtype": dtype})
    state = config.process_unet_state_dict_for_saving(unet)
    _check_detection(comfy, arch, config, state)
    state.update(config.process_clip_state_dict_for_saving(clip.get_sd()))
    state.update(config.process_vae_state_dict_for_saving(vae.state_dict()))
    return state


def _check_detection(comfy, arch, config, state) -> None:
    """ComfyUI's loader must see this UNet as ``arch`` with exactly the config it was built from."""
    prefix = "model.diffusion_model."
    detected = comfy.model_detection.model_config_from_unet(state, prefix)
    if type(detected) is not type(config):
        raise RuntimeError(f"ComfyUI detects the generated {arch} UNet as "
                           f"{type(detected).__name__}, not {type(config).__name__}")
    differ = {k: (v, detected.unet_config.get(k)) for k, v in config.unet_config.items()
              if k != "dtype" and detected.unet_config.get(k) != v}
    if differ:
        raise RuntimeError(f"ComfyUI detects the generated {arch} UNet with another config "
                           f"(ours, detected): {differ}")


def random_tensor(key: str, like, dtype, seed: int):
    """Values for one checkpoint tensor (see the module docstring for the rule)."""
    if like.device.type != "meta":  # a constant a saver added: keep its values
        return like.contiguous()
    if like.ndim >= 2:
        # torch's CPU generator keeps 32 bits of a seed: the key's CRC32 started from the seed
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode(), seed))
        fan_in = like[0].numel()
        values = torch.randn(like.shape, generator=generator)
        return values.mul_(fan_in ** -0.5).to(dtype)
    gain = key.endswith(("weight", "scale"))  # norm gains (and scales) 1, biases 0
    return torch.full(like.shape, 1.0 if gain else 0.0, dtype=dtype)


def write_streaming(path: str, state: dict, make, metadata: dict, overwrite: bool = False) -> int:
    """Write a safetensors file one tensor at a time: ``make(key, like)`` gives each tensor's
    values when its turn comes (shapes and dtypes come from ``state``, ``like`` is its entry
    there). Returns the file size in bytes."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"random_checkpoint: {path} exists; pass --overwrite to replace it")
    header, offset = {"__metadata__": metadata}, 0
    for key, like in state.items():
        name = str(like.dtype).removeprefix("torch.")
        size = like.numel() * like.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[name], "shape": list(like.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as stream:
            stream.write(len(encoded).to_bytes(8, "little") + encoded)
            for key, like in state.items():
                tensor = make(key, like)
                if tensor.dtype != like.dtype or tuple(tensor.shape) != tuple(like.shape):
                    raise RuntimeError(f"{key}: made {tensor.dtype} {tuple(tensor.shape)}, the "
                                       f"header says {like.dtype} {tuple(like.shape)}")
                stream.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return os.path.getsize(path)


def write_checkpoint(arch: str, path: str, dtype_name: str = "fp16", seed: int = 0,
                     overwrite: bool = False) -> dict:
    """Build and write the checkpoint; returns a summary (parameters per component, bytes, seconds)."""
    if arch not in UNET_CONFIGS:
        raise ValueError(f"arch must be one of {sorted(UNET_CONFIGS)}, got {arch!r}")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    start = time.time()
    dtype = getattr(torch, DTYPES[dtype_name][0])
    # Every floating tensor in the requested dtype (the VAE is built in fp32, CLIP's logit scale
    # is an fp32 constant); integer position ids stay int64.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in layout(arch, dtype).items()}
    parameters = {}
    for key, value in state.items():
        parameters[_component(key)] = parameters.get(_component(key), 0) + value.numel()
    metadata = {"sparse_atoms_random_checkpoint": arch, "seed": str(seed), "dtype": dtype_name}
    size = write_streaming(path, state, lambda key, like: random_tensor(key, like, dtype, seed),
                           metadata, overwrite=overwrite)
    return {"arch": arch, "path": path, "dtype": dtype_name, "parameters": parameters,
            "bytes": size, "seconds": round(time.time() - start, 1)}


def _component(key: str) -> str:
    if key.startswith("model.diffusion_model."):
        return "unet"
    return "vae" if key.startswith("first_stage_model.") else "text encoders"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=sorted(UNET_CONFIGS))
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    options = parser.parse_args(argv)
    if not options.out.endswith(".safetensors"):
        parser.error(f"--out must end in .safetensors, got {options.out!r}")
    summary = write_checkpoint(options.arch, options.out, options.dtype, options.seed, options.overwrite)
    if sys.platform != "win32":
        import resource

        summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
