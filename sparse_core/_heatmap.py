"""The importance table and its heat-map picture: layers (rows) x atoms (columns, most important
first), colour = importance on a log scale. The Atom Mask Editor widget draws the same table with
the same palette, so a saved image tells the same story as the widget.
"""

from __future__ import annotations

import math
import re

import torch

from ._atoms import SparseAtoms

__all__ = ["PALETTE", "importance_table", "importance_heatmap", "short_layer_name"]

# Viridis at five stops; colours between stops are interpolated linearly (the widget does too).
PALETTE = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
BACKGROUND = (24, 24, 24)  # zero importance
_OFF_DIM = 0.25  # masked-off atoms keep a quarter of their colour


def short_layer_name(key: str) -> str:
    """A layer key without the ``diffusion_model.`` prefix, with long block paths kept whole."""
    return re.sub(r"^diffusion_model\.", "", key)


def _group(key: str) -> str:
    """The block a layer belongs to, for grouping rows (``blocks.3``, ``input_blocks.4.1``...)."""
    parts = short_layer_name(key).split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: digits[-1] + 1]) if digits else parts[0]


def importance_table(atoms: SparseAtoms, kept: dict[str, set[int]] | None = None) -> dict:
    """A JSON-ready table: per layer its key, label, group, and its atoms sorted by importance
    (ids and values), with ``kept`` flags (atom ids still in the mask; all when ``kept`` is None).
    """
    rows, positive = [], []
    for number, (key, layer) in enumerate(atoms.layers.items()):
        importance = layer.importance().detach().double().cpu()
        order = torch.sort(-importance, stable=True).indices
        ids = layer.index.cpu()[order].tolist()
        values = importance[order].tolist()
        positive += [v for v in values if v > 0]
        keep = kept.get(key) if kept is not None else None
        rows.append({
            "key": key, "label": f"L{number}", "name": short_layer_name(key), "group": _group(key),
            "atoms": ids, "importance": values,
            "kept": [True] * len(ids) if keep is None else [i in keep for i in ids],
        })
    return {
        "fingerprint": atoms.fingerprint(),
        "layers": rows,
        "max": max(positive, default=0.0),
        "min": min(positive, default=0.0),
        "total": float(sum(positive)),
        "palette": PALETTE,
    }


def colours(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """RGB ``(..., 3)`` float for importances ``values (...)``: log scale between ``low`` and
    ``high`` through :data:`PALETTE`; zero importance gets :data:`BACKGROUND`."""
    palette = torch.tensor(PALETTE, dtype=torch.float64)
    values = values.double()
    if high > low > 0:
        t = (values.clamp_min(low).log10() - math.log10(low)) / (math.log10(high) - math.log10(low))
    else:
        t = torch.ones_like(values)
    position = t.clamp(0, 1) * (len(PALETTE) - 1)
    index = position.floor().long().clamp(max=len(PALETTE) - 2)
    fraction = (position - index)[..., None]
    rgb = palette[index] * (1 - fraction) + palette[index + 1] * fraction
    return torch.where((values > 0)[..., None], rgb, torch.tensor(BACKGROUND, dtype=torch.float64))


def importance_heatmap(table: dict, *, max_width: int = 1024, max_height: int = 1024) -> torch.Tensor:
    """The table as an RGB image ``(H, W, 3)`` uint8: one cell per atom, rows = layers, most
    important atoms on the left; masked-off atoms dimmed."""
    rows = table["layers"]
    columns = max((len(r["atoms"]) for r in rows), default=0) or 1
    values = torch.zeros(max(1, len(rows)), columns, dtype=torch.float64)
    kept = torch.ones(max(1, len(rows)), columns, dtype=torch.bool)
    for r, row in enumerate(rows):
        values[r, : len(row["importance"])] = torch.tensor(row["importance"], dtype=torch.float64)
        kept[r, : len(row["kept"])] = torch.tensor(row["kept"], dtype=torch.bool)
    rgb = colours(values, table["min"], table["max"])
    rgb = torch.where(kept[..., None], rgb, rgb * _OFF_DIM)
    cell_w = max(1, min(16, max_width // columns))
    cell_h = max(1, min(16, max_height // max(1, len(rows))))
    image = rgb.repeat_interleave(cell_h, 0).repeat_interleave(cell_w, 1)
    return image.round().clamp(0, 255).to(torch.uint8)
