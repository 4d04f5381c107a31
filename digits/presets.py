"""Layer presets of the digits model: regular expressions searched in its layer keys
(``diffusion_model.blocks.<i>.attn1.to_q`` ...; ``attn1`` is self-attention, ``attn2``
cross-attention, ``mlp.0`` / ``mlp.2`` the MLP).

The one definition: the demo and benchmarks (:mod:`digits.concept`) and the ComfyUI node's
``digits`` family (``nodes/presets.py``) both read it, so a preset selects the same layers in
both. Pure Python (no torch), importable without ComfyUI.
"""

PRESETS = {
    "cross-attention k/v": r"attn2\.to_[kv]$",
    "cross-attention": r"attn2\.to_(q|k|v|out)$",
    "self+cross attention": r"attn[12]\.to_(q|k|v|out)$",
    "attention + MLP": r"(attn[12]\.to_(q|k|v|out)|mlp\.[02])$",
}
