"""The Atom Mask Editor's mask: a JSON string saved in the workflow (pure Python, CI-tested).

Format (``version`` 1)::

    {"version": 1, "fingerprint": "<SparseAtoms.fingerprint()>", "off": {"<layer key>": [atom ids]}}

``off`` lists the atoms switched off; an empty string means no atom is switched off. The
fingerprint ties the mask to the atoms' layers: a mask made for other atoms is refused with a
clear message instead of silently switching off the wrong atoms. The editor's density keeps the
top ``ceil(density * N)`` atoms by importance; the mask then removes the atoms switched off.
The node's text and picture name the importance in use (measured effect or weight norm).
"""

from __future__ import annotations

import json

import numpy as np
import torch

import sparse_core as sc

MASK_VERSION = 1


class MaskError(ValueError):
    """A mask string that does not fit the atoms it is applied to."""


def parse_mask(text: str, atoms: sc.SparseAtoms) -> dict[str, set[int]]:
    """Atom ids switched off, per layer key (empty when ``text`` is empty)."""
    if not isinstance(text, str):
        raise MaskError(f"mask must be a string, got {type(text).__name__}")
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        near = text[max(0, error.pos - 12): error.pos + 12]
        raise MaskError(f"mask is not valid JSON: {error.msg} at line {error.lineno} column "
                        f"{error.colno} (character {error.pos}, near {near!r}); clear the mask "
                        "field to keep every atom") from None
    if not isinstance(data, dict) or data.get("version") != MASK_VERSION:
        raise MaskError(f"mask must be a version-{MASK_VERSION} object with 'fingerprint' and 'off'")
    if not isinstance(data.get("fingerprint"), str):
        raise MaskError("mask has no 'fingerprint' string (the atoms it was made for); clear the "
                        "mask field to keep every atom")
    fingerprint = atoms.fingerprint()
    if data["fingerprint"] != fingerprint:
        raise MaskError(
            f"this mask was made for other atoms (their layers have fingerprint "
            f"{str(data.get('fingerprint'))[:12]}..., these have {fingerprint[:12]}...); clear the "
            "mask (the editor's 'reset') or connect the atoms it was made for"
        )
    off = data.get("off", {})
    if not isinstance(off, dict):
        raise MaskError("mask 'off' must map layer keys to lists of atom ids")
    result = {}
    for key, ids in off.items():
        if key not in atoms.layers:
            raise MaskError(f"mask switches off atoms of layer {key!r}, which these atoms do not have")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise MaskError(f"mask entry for {key!r} must be a list of integer atom ids")
        known = set(atoms[key].index.tolist())
        unknown = sorted(set(ids) - known)
        if unknown:
            raise MaskError(f"mask switches off atom {atoms.label(key, unknown[0])} ({key!r}), which "
                            "these atoms do not have")
        result[key] = set(ids)
    return result


def keep_masks(atoms: sc.SparseAtoms, off: dict[str, set[int]], density: float,
               per_layer: bool = False) -> dict[str, torch.Tensor]:
    """Per layer, the atoms kept: among the top ``ceil(density * N)`` and not switched off."""
    masks = atoms.density_mask(density, per_layer=per_layer)
    for key, ids in off.items():
        index = atoms[key].index.cpu()
        masks[key] &= ~torch.isin(index, torch.tensor(sorted(ids), dtype=index.dtype))
    return masks


def editor_summary(table: dict) -> str:
    """The node's text: how many atoms are kept and which importance ranks them (the same words
    as the widget's status line and the picture's caption)."""
    flags = [flag for row in table["layers"] for flag in row["kept"]]
    text = f"{sum(flags)} of {len(flags)} atoms kept; {table['ranked_by']}"
    return text + (f" ({table['effects']})" if table["effects"] else "")


def heatmap_picture(table: dict, *, caption_height: int = 16) -> torch.Tensor:
    """The heat-map (:func:`sparse_core.importance_heatmap`) under a caption that names the
    importance in use: uint8 ``(caption_height + H, max(W, caption width), 3)``."""
    from PIL import Image, ImageDraw, ImageFont

    cells = sc.importance_heatmap(table)
    font = ImageFont.load_default()
    caption = table["ranked_by"]
    width = max(cells.shape[1], int(font.getbbox(caption)[2]) + 8)
    canvas = Image.new("RGB", (width, caption_height + cells.shape[0]), (24, 24, 24))
    canvas.paste(Image.fromarray(cells.numpy()), (0, caption_height))
    ImageDraw.Draw(canvas).text((4, 2), caption, fill=(230, 230, 230), font=font)
    return torch.from_numpy(np.asarray(canvas).copy())
