"""The Atom Mask Editor's mask: a JSON string saved in the workflow (pure Python, CI-tested).

Format (``version`` 1)::

    {"version": 1, "fingerprint": "<SparseAtoms.fingerprint()>", "off": {"<layer key>": [atom ids]}}

``off`` lists the atoms switched off; an empty string means no atom is switched off. The
fingerprint ties the mask to the atoms' layers: a mask made for other atoms is refused with a
clear message instead of silently switching off the wrong atoms. The editor's density keeps the
top ``ceil(density * N)`` atoms by importance; the mask then removes the atoms switched off.
"""

from __future__ import annotations

import json

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
        raise MaskError(f"mask is not valid JSON ({error.msg} at character {error.pos}); clear "
                        "the mask field to keep every atom") from None
    if not isinstance(data, dict) or data.get("version") != MASK_VERSION:
        raise MaskError(f"mask must be a version-{MASK_VERSION} object with 'fingerprint' and 'off'")
    fingerprint = atoms.fingerprint()
    if data.get("fingerprint") != fingerprint:
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


def mask_text(atoms: sc.SparseAtoms, off: dict[str, set[int]]) -> str:
    """The canonical mask string for ``off`` (what the widget writes)."""
    listing = {key: sorted(ids) for key, ids in off.items() if ids}
    return json.dumps({"version": MASK_VERSION, "fingerprint": atoms.fingerprint(), "off": listing},
                      sort_keys=True)


def keep_masks(atoms: sc.SparseAtoms, off: dict[str, set[int]], density: float,
               per_layer: bool = False) -> dict[str, torch.Tensor]:
    """Per layer, the atoms kept: among the top ``ceil(density * N)`` and not switched off."""
    masks = atoms.density_mask(density, per_layer=per_layer)
    for key, ids in off.items():
        index = atoms[key].index.cpu()
        masks[key] &= ~torch.isin(index, torch.tensor(sorted(ids), dtype=index.dtype))
    return masks
