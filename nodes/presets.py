"""Layer presets per denoiser family (pure Python: no ComfyUI import; tests/test_presets_masks.py
tests them without ComfyUI).

A preset is a regular expression searched in layer keys (``diffusion_model.<module path>``). The
family is recognised from the diffusion model's class name; anything unknown falls back to the
generic DiT names, and a custom regex always works.

"cross-attention k/v" adapts only how the prompt is read (the projections applied to text tokens):
the layers that bind a new word to a concept while leaving other prompts alone. In joint-attention
models (SD3's MMDiT, Flux, Qwen-Image) those are the text stream's projections; where q, k and v
share one fused matrix (``qkv``) the whole fused matrix is adapted.
"""

from __future__ import annotations

import re

from digits.presets import PRESETS as DIGITS_PRESETS

PRESET_NAMES = ["cross-attention k/v", "cross-attention", "self+cross attention", "attention + MLP",
                "custom regex"]

_UNET_ATTN = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_GENERIC_ATTN = (r"(attn\d?|attention|self_attn|cross_attn|cross_attention)\."
                 r"(to_q|to_k|to_v|to_out\.0|q|k|v|o|qkv|proj|out|q_linear|kv_linear|q_proj|k_proj|"
                 r"v_proj|o_proj)$")

PRESETS: dict[str, dict[str, str]] = {
    "unet": {  # SD1.x, SD2.x, SDXL (openaimodel.UNetModel)
        "cross-attention k/v": r"transformer_blocks\.\d+\.attn2\.to_[kv]$",
        "cross-attention": r"transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)$",
        "self+cross attention": _UNET_ATTN,
        "attention + MLP": rf"({_UNET_ATTN}|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$)",
    },
    "mmdit": {  # SD3 / SD3.5
        "cross-attention k/v": r"context_block\.attn\.qkv$",
        "cross-attention": r"context_block\.attn\.(qkv|proj)$",
        "self+cross attention": r"(x_block|context_block)\.attn2?\.(qkv|proj)$",
        "attention + MLP": r"(x_block|context_block)\.(attn2?\.(qkv|proj)|mlp\.fc[12])$",
    },
    "flux": {  # Flux, Chroma
        "cross-attention k/v": r"double_blocks\.\d+\.txt_attn\.qkv$",
        "cross-attention": r"double_blocks\.\d+\.txt_attn\.(qkv|proj)$",
        "self+cross attention": r"(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear1)$",
        "attention + MLP": (r"(double_blocks\.\d+\.((img|txt)_attn\.(qkv|proj)|(img|txt)_mlp\.[02])|"
                            r"single_blocks\.\d+\.linear[12])$"),
    },
    "pixart": {
        "cross-attention k/v": r"cross_attn\.kv_linear$",
        "cross-attention": r"cross_attn\.(q_linear|kv_linear|proj)$",
        "self+cross attention": r"(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj))$",
        "attention + MLP": r"(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.fc[12])$",
    },
    "hunyuan_dit": {
        "cross-attention k/v": r"attn2\.kv_proj$",
        "cross-attention": r"attn2\.(q_proj|kv_proj|out_proj)$",
        "self+cross attention": r"(attn1\.(Wqkv|out_proj)|attn2\.(q_proj|kv_proj|out_proj))$",
        "attention + MLP": r"(attn1\.(Wqkv|out_proj)|attn2\.(q_proj|kv_proj|out_proj)|mlp\.fc[12])$",
    },
    "wan": {
        "cross-attention k/v": r"cross_attn\.[kv]$",
        "cross-attention": r"cross_attn\.[qkvo]$",
        "self+cross attention": r"(self_attn|cross_attn)\.[qkvo]$",
        "attention + MLP": r"((self_attn|cross_attn)\.[qkvo]|ffn\.[02])$",
    },
    "qwen_image": {
        "cross-attention k/v": r"attn\.add_[kv]_proj$",
        "cross-attention": r"attn\.(add_[qkv]_proj|to_add_out)$",
        "self+cross attention": r"attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)$",
        "attention + MLP": r"(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|mlp\.(net\.0\.proj|net\.2))$",
    },
    "digits": DIGITS_PRESETS,  # the shipped digits model: the demo's own definition
    "dit": {  # anything else: common DiT names
        "cross-attention k/v": (r"(attn2|cross_attn|cross_attention)\."
                                r"(to_k|to_v|k|v|kv|kv_linear|k_proj|v_proj|kv_proj)$"),
        "cross-attention": r"(attn2|cross_attn|cross_attention)\.[^.]+$",
        "self+cross attention": _GENERIC_ATTN,
        "attention + MLP": rf"({_GENERIC_ATTN}|(mlp|ff|ffn|feed_forward)\.[^.]+$|ff\.net\.(0\.proj|2)$)",
    },
}

_CLASS_FAMILY = {
    "UNetModel": "unet", "MMDiT": "mmdit", "OpenAISignatureMMDITWrapper": "mmdit", "Flux": "flux",
    "Chroma": "flux", "PixArtMS": "pixart", "HunYuanDiT": "hunyuan_dit", "WanModel": "wan",
    "QwenImageTransformer2DModel": "qwen_image", "DigitsDiT": "digits",
}


def family_of(class_name: str) -> str:
    """The preset family for a diffusion model class name (``dit`` when unknown)."""
    return _CLASS_FAMILY.get(class_name, "dit")


def preset_regex(family: str, preset: str, custom: str = "") -> str:
    """The regex for ``preset`` in ``family``; ``custom regex`` uses ``custom``."""
    if preset == "custom regex":
        if not custom.strip():
            raise ValueError("preset 'custom regex' needs a layer regex (e.g. 'attn2\\.to_[kv]$')")
        return custom
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
    return PRESETS[family][preset]


def select_layers(names: list[str], regex: str, *, family: str, preset: str) -> list[str]:
    """The layer names the regex selects; an invalid regex or an empty selection is an error that
    names the detected family and shows a few layer names to write a regex against."""
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise ValueError(f"layer regex {regex!r} is not a valid regular expression: {error}") from None
    chosen = [name for name in names if pattern.search(name)]
    if not chosen:
        examples = ", ".join(names[: min(6, len(names))])
        raise ValueError(
            f"preset {preset!r} (regex {regex!r}) selects no layer of this model (detected family "
            f"{family!r}, {len(names)} adaptable layers, e.g. {examples}); choose another preset or "
            "write a custom regex"
        )
    return chosen
