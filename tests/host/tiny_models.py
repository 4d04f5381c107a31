"""Tiny random-weight instances of real ComfyUI architectures, built from ComfyUI's own classes
(its model configs, model bases and ModelPatcher), with conditioning in ComfyUI's format."""

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models as sm

_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
             num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth_middle=1,
             use_spatial_transformer=True, legacy=False, context_dim=64,
             use_temporal_attention=False, use_temporal_resblock=False)
CONFIGS = {
    "sd15": (sm.SD15, dict(_UNET, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                           adm_in_channels=None, use_linear_in_transformer=False)),
    "sdxl": (sm.SDXL, dict(_UNET, transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                           num_classes="sequential", adm_in_channels=32 + 6 * 256,
                           use_linear_in_transformer=True)),
    "flux": (sm.Flux, dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2,
                           vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
                           num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                           theta=10000, qkv_bias=True, guidance_embed=True)),
    "sd3": (sm.SD3, dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None,
                         adm_in_channels=32, num_patches=32 * 32, pos_embed_max_size=32,
                         pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
                         context_embedder_config={"target": "torch.nn.Linear",
                                                  "params": {"in_features": 64, "out_features": 128}})),
    "pixart": (sm.PixArtSigma, dict(image_model="pixart_sigma", input_size=32, patch_size=2,
                                    in_channels=4, hidden_size=64, depth=1, num_heads=2,
                                    caption_channels=64, model_max_length=8, micro_condition=False)),
}
CHANNELS = {"sd15": 4, "sdxl": 4, "flux": 16, "sd3": 16, "pixart": 4}
ARCHS = ["sd15", "sdxl", "flux", "sd3"]  # what every node test runs on


def build(arch: str, seed: int = 0, **overrides):
    """A ModelPatcher over a tiny ``arch`` model with fan-in scaled random weights; ``overrides``
    change its config (``qk_norm="rms"`` for SD3.5's RMSNorm, say)."""
    config_class, unet_config = CONFIGS[arch]
    config = config_class(dict(unet_config, **overrides))
    if arch in ("sd15", "sdxl"):
        config.unet_config.update(num_heads=2, num_head_channels=-1)
    config.set_inference_dtype(torch.float32, None)
    model = fill_random(config.get_model({}), seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def fill_random(model, seed: int = 0):
    """comfy.ops layers skip initialisation: fill every parameter (fan-in scaled normal weights,
    unit norm gains, zero biases) and zero the buffers left empty (e.g. SD3's pos_embed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif name.endswith(("weight", "scale")):
                p.fill_(1.0)
            else:
                p.zero_()
        for buffer in model.diffusion_model.buffers():
            if buffer.is_floating_point():
                buffer.zero_()
    return model


def conditioning(arch: str, seed: int = 0, tokens: int = 8):
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, 64, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    extra = {"sd15": {}, "sdxl": {"pooled_output": pooled, "width": 64, "height": 64},
             "flux": {"pooled_output": pooled, "guidance": 3.5}, "sd3": {"pooled_output": pooled},
             "pixart": {}}[arch]
    return [[context, extra]]


def latents(arch: str, count: int = 4, seed: int = 0, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(count, CHANNELS[arch], size, size, generator=generator)}
