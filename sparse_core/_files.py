"""Sparse Atoms files: ``.safetensors`` with a validated layout. Never pickle.

Layout (format ``sparse_atoms``, version 2; version 1 files are read too). Per layer key ``K``,
tensors named by :func:`tensor_name`: ``K:atoms (m, out)``, ``K:readouts (m, in')``,
``K:coefficients (m,)``, ``K:index (m,) int64`` and, optionally (version 2), ``K:effect (m,)
float32``: each atom's measured effect (finite, >= 0), for every atom of the layer or for none.
String metadata:

- ``format``, ``format_version``;
- ``layers``: JSON ``[[key, weight_shape], ...]`` in layer order;
- ``fingerprint``: sha256 of the layer names and shapes (:meth:`SparseAtoms.fingerprint`);
- ``architecture``, ``dictionary_method``, ``prompt``: strings; ``training``: a JSON object;
- ``effects`` (version 2): a JSON object, how the stored effects were measured.

A version-1 file has no effects; its atoms rank by weight norm.

Writes are atomic and never replace an existing file unless asked (:mod:`._atomic_write`).

Loading (:func:`load_atoms`) reads regular files only, and judges a file by its header before its
body: the 8-byte header length, the JSON header (sizes, dtypes, offsets that tile exactly the
real file size) and every rule of this layout are checked before the tensor data is read.
Anything wrong raises :class:`AtomsFileError` naming the file and the problem, never quoting the
file's raw bytes, and nothing is returned half-built.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import save as _save_tensors

from ._atomic_write import exists_error, write_atomic
from ._atoms import AtomLayer, AtomsInfo, SparseAtoms

__all__ = ["AtomsFileError", "FORMAT_NAME", "FORMAT_VERSION", "save_atoms", "load_atoms",
           "atoms_to_bytes", "atoms_from_bytes", "tensor_name", "split_tensor_name"]

FORMAT_NAME = "sparse_atoms"
FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")
FIELDS = ("atoms", "readouts", "coefficients", "index")
EFFECT = "effect"  # the optional fifth tensor of a layer (version 2)
_SEPARATOR = ":"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# The dtypes this layout allows. Data is little-endian, as torch's native order on every
# platform it ships for, so torch.frombuffer reads it as is.
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class AtomsFileError(ValueError):
    """A file that is not a valid Sparse Atoms file; the message says which file and why."""


def tensor_name(layer_key: str, field: str) -> str:
    """The one place that names a layer's tensors in a file."""
    return f"{layer_key}{_SEPARATOR}{field}"


def split_tensor_name(name: str) -> tuple[str, str]:
    key, _, field = name.rpartition(_SEPARATOR)
    return key, field


# -- writing -----------------------------------------------------------------------------------

def atoms_to_bytes(atoms: SparseAtoms) -> bytes:
    """The file's bytes (what :func:`save_atoms` writes).

    Raises ``ValueError`` for what a file cannot hold or :func:`load_atoms` would refuse: NaN or
    inf (naming the layer and field), negative effects, layer keys with ``:`` or that are not
    valid Unicode; ``TypeError`` for ``training``/``effects`` that are not JSON objects. Lone
    surrogates in the text fields (a prompt sent as ``"\\ud800"``) are stored as U+FFFD.
    """
    if not isinstance(atoms, SparseAtoms):
        raise TypeError(f"atoms must be SparseAtoms, got {type(atoms).__name__}")
    tensors = {}
    for key, layer in atoms.layers.items():
        if _SEPARATOR in key:
            raise ValueError(f"layer key {key!r} contains {_SEPARATOR!r}, which files reserve")
        if _LONE_SURROGATE.search(key):
            raise ValueError(f"layer key {key!r} is not valid Unicode (a lone surrogate); a file "
                             "cannot name its tensors with it")
        for field in FIELDS:
            value = getattr(layer, field).detach().cpu().contiguous()
            if field != "index" and not bool(torch.isfinite(value).all()):
                raise ValueError(f"layer {key!r}: {field} contains NaN or inf; not saved (such a "
                                 "file could not be loaded)")
            tensors[tensor_name(key, field)] = value
        if layer.effect is not None:
            effect = layer.effect.detach().cpu().float().contiguous()
            if not bool(torch.isfinite(effect).all()) or bool((effect < 0).any()):
                raise ValueError(f"layer {key!r}: effect must be finite and >= 0 (as float32); "
                                 f"got values from {float(effect.min())} to {float(effect.max())}")
            tensors[tensor_name(key, EFFECT)] = effect
    info = atoms.info
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps([[key, list(layer.weight_shape)] for key, layer in atoms.layers.items()]),
        "fingerprint": atoms.fingerprint(),
        "architecture": _text(info.architecture),
        "dictionary_method": _text(info.dictionary_method),
        "prompt": _text(info.prompt),
        "training": _json_text("info.training", info.training),
        "effects": _json_text("info.effects", info.effects),
    }
    return _save_tensors(tensors, metadata=metadata)


def _text(value) -> str:
    """``str(value)`` with lone surrogates (not encodable as UTF-8) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", str(value))


def _json_text(name: str, value) -> str:
    """A JSON object as text (ASCII: non-ASCII and lone surrogates are escaped, losslessly)."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict (saved as a JSON object), got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must hold JSON values only: {error}") from None


def save_atoms(atoms: SparseAtoms, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``atoms`` to ``path`` atomically: readers see no file, the old file or the new one.

    An existing ``path`` is never replaced unless ``overwrite=True``: ``FileExistsError`` names it
    (also when the file appears while this one is written).
    """
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)
    write_atomic(path, atoms_to_bytes(atoms), overwrite=overwrite)


# -- reading -----------------------------------------------------------------------------------

def load_atoms(path: str | os.PathLike, device: torch.device | str = "cpu") -> SparseAtoms:
    """Read and validate a Sparse Atoms file (regular files only; the header is judged before
    the body is read). Raises :class:`AtomsFileError` naming the file and the problem."""
    path = os.fspath(path)
    try:
        found = os.stat(path)
    except OSError as error:
        raise AtomsFileError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not stat.S_ISREG(found.st_mode):
        raise AtomsFileError(f"{path}: not a regular file ({_kind(found.st_mode)}); only files "
                             "are read")
    # Non-blocking, in case the path became a FIFO since the stat: opening one would wait for a
    # writer. Reads of regular files are unaffected.
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise AtomsFileError(f"{path}: cannot be read ({error.strerror or error})") from error
    with open(descriptor, "rb") as stream:
        opened = os.fstat(descriptor)
        if not stat.S_ISREG(opened.st_mode):
            raise AtomsFileError(f"{path}: not a regular file ({_kind(opened.st_mode)}); only "
                                 "files are read")
        try:
            atoms = _read_stream(stream, opened.st_size)
        except _Invalid as problem:
            raise AtomsFileError(f"{path}: {problem}") from None
        except OSError as error:
            raise AtomsFileError(f"{path}: cannot be read ({error.strerror or error})") from error
    return atoms.to(device)


def atoms_from_bytes(data: bytes, *, source: str = "<bytes>") -> SparseAtoms:
    """Parse and validate a file's bytes; raises :class:`AtomsFileError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    try:
        length = _header_length(bytes(view[:8]), len(view))
        layout = _layout(_read_header(bytes(view[8 : 8 + length]), length, len(view)))
        return _build(layout, view[8 + length :])
    except _Invalid as problem:
        raise AtomsFileError(f"{source}: {problem}") from None


class _Invalid(Exception):
    pass


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR,
             "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _read_stream(stream, size: int) -> SparseAtoms:
    """Header, then layout checks, then the body: nothing past the header is read from a file
    that fails them."""
    length = _header_length(_read_exactly(stream, min(8, size)), size)
    layout = _layout(_read_header(_read_exactly(stream, length), length, size))
    return _build(layout, _read_exactly(stream, size - 8 - length))


def _read_exactly(stream, count: int) -> bytearray:
    buffer = bytearray(count)
    view, done = memoryview(buffer), 0
    while done < count:
        got = stream.readinto(view[done:])
        if not got:
            raise _Invalid(f"the file shrank while being read ({done} of {count} bytes)")
        done += got
    return buffer


def _show(value, limit: int = 60) -> str:
    """A header-derived value for a message, clipped."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _header_length(first: bytes, size: int) -> int:
    if size < 8:
        raise _Invalid(f"too short to be a safetensors file ({size} bytes)")
    (length,) = struct.unpack("<Q", first)
    if length > _MAX_HEADER or 8 + length > size:
        # (the claimed length is not shown: it is the file's first 8 bytes)
        raise _Invalid(f"truncated or not safetensors (the header length in its first 8 bytes "
                       f"does not fit the file's {size} bytes)")
    return length


def _read_header(raw: bytes, length: int, size: int) -> dict:
    """The safetensors header, checked: JSON object, known dtypes, sizes matching shapes, and
    data offsets that tile the data section (the rest of a ``size``-byte file) exactly."""
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _Invalid("header is not valid JSON (corrupt or not safetensors)") from None
    if not isinstance(header, dict):
        raise _Invalid("header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _Invalid(f"tensor {_show(name)} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
            raise _Invalid(f"tensor {_show(name)} has unknown dtype {_show(dtype)}")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape
        ):
            raise _Invalid(f"tensor {_show(name)} has an invalid shape {_show(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(n, int) and not isinstance(n, bool) for n in offsets)):
            raise _Invalid(f"tensor {_show(name)} has invalid data_offsets {_show(offsets)}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype] or begin < 0:
            raise _Invalid(f"tensor {_show(name)}: data_offsets {_show(offsets)} do not fit shape "
                           f"{_show(shape)} of {dtype}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _Invalid(f"tensor {_show(name)}: data does not follow the previous tensor "
                           f"(offset {begin})")
        position = end
    if 8 + length + position != size:
        raise _Invalid(f"truncated or padded data section ({size - 8 - length} bytes, header "
                       f"describes {position})")
    return header


@dataclass
class _Layout:
    """A header that passed every rule of the layout: what :func:`_build` needs."""

    entries: dict  # tensor name -> {"dtype", "shape", "data_offsets"}
    layers: list  # [(key, weight_shape)]
    metadata: dict
    training: dict
    effects: dict


def _layout(header: dict) -> _Layout:
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _Invalid("not a Sparse Atoms file (no string metadata; is it a LoRA or a checkpoint?)")
    if metadata.get("format") != FORMAT_NAME:
        raise _Invalid(f"not a Sparse Atoms file (format={_show(metadata.get('format'))}, "
                       f"expected {FORMAT_NAME!r})")
    version = metadata.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise _Invalid(f"unsupported format_version {_show(version)} (this version reads "
                       f"{', '.join(_READABLE_VERSIONS)})")
    layers = _layer_list(metadata.get("layers"))
    expected = {tensor_name(key, field) for key, _ in layers for field in FIELDS}
    optional = {tensor_name(key, EFFECT) for key, _ in layers} if version != "1" else set()
    missing = sorted(expected - header.keys())
    extra = sorted(header.keys() - expected - optional)
    if missing:
        raise _Invalid(f"tensor {_show(missing[0])} is missing ({len(missing)} missing)")
    if extra:
        raise _Invalid(f"unexpected tensor {_show(extra[0])} ({len(extra)} not described by "
                       "'layers')")
    for name, entry in header.items():
        _, field = split_tensor_name(name)
        wanted = "I64" if field == "index" else "a float dtype"
        ok = entry["dtype"] == "I64" if field == "index" else entry["dtype"] in _FLOAT_DTYPES
        if not ok:
            raise _Invalid(f"tensor {_show(name)} has dtype {entry['dtype']}, expected {wanted}")
    training = _json_object(metadata, "training")
    effects = _json_object(metadata, "effects") if version != "1" else {}
    return _Layout(header, layers, metadata, training, effects)


def _json_object(metadata: dict, name: str) -> dict:
    try:
        value = json.loads(metadata.get(name, "{}"))
    except (json.JSONDecodeError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise _Invalid(f"metadata {name!r} is not JSON ({reason})") from None
    if not isinstance(value, dict):
        raise _Invalid(f"metadata {name!r} must be a JSON object")
    return value


def _tensor(entry: dict, body) -> torch.Tensor:
    """One tensor from the data section (copied out of it, so the section can be freed)."""
    dtype, shape = _TORCH_DTYPES[entry["dtype"]], entry["shape"]
    begin, end = entry["data_offsets"]
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(body[begin:end]), dtype=dtype).reshape(shape)


def _build(layout: _Layout, body) -> SparseAtoms:
    built = {}
    for key, shape in layout.layers:
        fields = {field: _tensor(layout.entries[tensor_name(key, field)], body) for field in FIELDS}
        effect_entry = layout.entries.get(tensor_name(key, EFFECT))
        effect = None if effect_entry is None else _tensor(effect_entry, body)
        try:
            layer = AtomLayer(**fields, weight_shape=tuple(shape), effect=effect)
        except (TypeError, ValueError) as error:
            raise _Invalid(f"layer {_show(key)}: {error}") from None
        if effect is not None and not bool(torch.isfinite(effect.float()).all()):
            raise _Invalid(f"layer {_show(key)}: effect does not fit float32 (the largest is "
                           f"{float(effect.max()):.3g}; effects are held in float32)")
        index = fields["index"]
        if index.numel() and (int(index.min()) < 0 or index.unique().numel() != index.numel()):
            raise _Invalid(f"layer {_show(key)}: index must hold distinct non-negative atom ids")
        built[key] = layer
    metadata = layout.metadata
    info = AtomsInfo(metadata.get("architecture", ""), metadata.get("dictionary_method", ""),
                     metadata.get("prompt", ""), layout.training, layout.effects)
    atoms = SparseAtoms(built, info)
    if atoms.fingerprint() != metadata.get("fingerprint"):
        raise _Invalid("fingerprint does not match the layers (the file was altered)")
    return atoms


def _layer_list(raw) -> list[tuple[str, list[int]]]:
    if not isinstance(raw, str):
        raise _Invalid("metadata 'layers' is missing")
    try:
        layers = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise _Invalid("metadata 'layers' is not JSON") from None
    if not isinstance(layers, list):
        raise _Invalid("metadata 'layers' must be a list of [key, weight_shape]")
    seen = set()
    result = []
    for item in layers:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0]
                and isinstance(item[1], list) and len(item[1]) >= 2
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31
                        for n in item[1])):
            raise _Invalid(f"metadata 'layers' has a malformed entry {_show(item)}")
        if _LONE_SURROGATE.search(item[0]):
            raise _Invalid(f"metadata 'layers' has a key that is not valid Unicode {_show(item[0])}")
        if item[0] in seen:
            raise _Invalid(f"metadata 'layers' lists {_show(item[0])} twice")
        seen.add(item[0])
        result.append((item[0], item[1]))
    return result
