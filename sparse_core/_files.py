"""Sparse Atoms files: ``.safetensors`` with a validated layout. Never pickle.

Layout (format ``sparse_atoms``, version 1). Per layer key ``K``, four tensors named by
:func:`tensor_name`: ``K:atoms (m, out)``, ``K:readouts (m, in')``, ``K:coefficients (m,)``,
``K:index (m,) int64``. String metadata:

- ``format``, ``format_version``;
- ``layers``: JSON ``[[key, weight_shape], ...]`` in layer order;
- ``fingerprint``: sha256 of the layer names and shapes (:meth:`SparseAtoms.fingerprint`);
- ``architecture``, ``dictionary_method``, ``prompt``: strings; ``training``: a JSON object.

Writes are atomic (a temporary file in the same folder, then ``os.replace``). Loading reads the
whole file, checks the safetensors header itself (sizes, offsets, dtypes) and then every rule of
this layout; anything wrong raises :class:`AtomsFileError` naming the file and the problem, and
nothing is returned half-built.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid

import torch
from safetensors.torch import load as _load_tensors
from safetensors.torch import save as _save_tensors

from ._atoms import AtomLayer, AtomsInfo, SparseAtoms

__all__ = ["AtomsFileError", "FORMAT_NAME", "FORMAT_VERSION", "save_atoms", "load_atoms",
           "atoms_to_bytes", "atoms_from_bytes", "tensor_name", "split_tensor_name"]

FORMAT_NAME = "sparse_atoms"
FORMAT_VERSION = 1
FIELDS = ("atoms", "readouts", "coefficients", "index")
_SEPARATOR = ":"
_MAX_HEADER = 100 * 2**20
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class AtomsFileError(ValueError):
    """A file that is not a valid Sparse Atoms file; the message says which file and why."""


def tensor_name(layer_key: str, field: str) -> str:
    """The one place that names a layer's tensors in a file."""
    return f"{layer_key}{_SEPARATOR}{field}"


def split_tensor_name(name: str) -> tuple[str, str]:
    key, _, field = name.rpartition(_SEPARATOR)
    return key, field


def atoms_to_bytes(atoms: SparseAtoms) -> bytes:
    """The file's bytes (what :func:`save_atoms` writes)."""
    if not isinstance(atoms, SparseAtoms):
        raise TypeError(f"atoms must be SparseAtoms, got {type(atoms).__name__}")
    tensors = {}
    for key, layer in atoms.layers.items():
        if _SEPARATOR in key:
            raise ValueError(f"layer key {key!r} contains {_SEPARATOR!r}, which files reserve")
        for field in FIELDS:
            tensors[tensor_name(key, field)] = getattr(layer, field).detach().cpu().contiguous()
    info = atoms.info
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps([[key, list(layer.weight_shape)] for key, layer in atoms.layers.items()]),
        "fingerprint": atoms.fingerprint(),
        "architecture": str(info.architecture),
        "dictionary_method": str(info.dictionary_method),
        "prompt": str(info.prompt),
        "training": json.dumps(info.training, sort_keys=True),
    }
    return _save_tensors(tensors, metadata=metadata)


def save_atoms(atoms: SparseAtoms, path: str | os.PathLike) -> None:
    """Write ``atoms`` to ``path`` atomically: readers see the old file or the new one."""
    write_atomic(path, atoms_to_bytes(atoms))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    readers see the old file or the new one, never a part; a failed write leaves no file behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A fresh name opened exclusively, not mkstemp: the file gets the usual umask permissions.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_atoms(path: str | os.PathLike, device: torch.device | str = "cpu") -> SparseAtoms:
    """Read and validate a Sparse Atoms file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise AtomsFileError(f"{path}: cannot be read ({error.strerror or error})") from error
    return atoms_from_bytes(data, source=path).to(device)


def atoms_from_bytes(data: bytes, *, source: str = "<bytes>") -> SparseAtoms:
    """Parse and validate a file's bytes; raises :class:`AtomsFileError`."""
    try:
        return _parse(bytes(data))
    except _Invalid as problem:
        raise AtomsFileError(f"{source}: {problem}") from None


class _Invalid(Exception):
    pass


def _parse(data: bytes) -> SparseAtoms:
    header = _read_header(data)
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _Invalid("not a Sparse Atoms file (no string metadata; is it a LoRA or a checkpoint?)")
    if metadata.get("format") != FORMAT_NAME:
        raise _Invalid(f"not a Sparse Atoms file (format={metadata.get('format')!r}, expected "
                       f"{FORMAT_NAME!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise _Invalid(f"unsupported format_version {metadata.get('format_version')!r} "
                       f"(this version reads {FORMAT_VERSION})")
    layers = _layer_list(metadata.get("layers"))
    expected = {tensor_name(key, field) for key, _ in layers for field in FIELDS}
    missing = sorted(expected - header.keys())
    extra = sorted(header.keys() - expected)
    if missing:
        raise _Invalid(f"tensor {missing[0]!r} is missing ({len(missing)} missing)")
    if extra:
        raise _Invalid(f"unexpected tensor {extra[0]!r} ({len(extra)} not described by 'layers')")
    for name, entry in header.items():
        _, field = split_tensor_name(name)
        wanted = "I64" if field == "index" else "a float dtype"
        ok = entry["dtype"] == "I64" if field == "index" else entry["dtype"] in _FLOAT_DTYPES
        if not ok:
            raise _Invalid(f"tensor {name!r} has dtype {entry['dtype']}, expected {wanted}")
    try:
        training = json.loads(metadata.get("training", "{}"))
    except json.JSONDecodeError as error:
        raise _Invalid(f"metadata 'training' is not JSON ({error.msg})") from None
    if not isinstance(training, dict):
        raise _Invalid("metadata 'training' must be a JSON object")
    try:
        tensors = _load_tensors(data)
    except Exception as error:  # the header was checked; this is a last line of defence
        raise _Invalid(f"tensor data could not be decoded ({error})") from None
    built = {}
    for key, shape in layers:
        fields = {field: tensors[tensor_name(key, field)] for field in FIELDS}
        try:
            layer = AtomLayer(**fields, weight_shape=tuple(shape))
        except (TypeError, ValueError) as error:
            raise _Invalid(f"layer {key!r}: {error}") from None
        for field in ("atoms", "readouts", "coefficients"):
            if not bool(torch.isfinite(fields[field]).all()):
                raise _Invalid(f"layer {key!r}: {field} contains NaN or inf")
        index = fields["index"]
        if index.numel() and (int(index.min()) < 0 or index.unique().numel() != index.numel()):
            raise _Invalid(f"layer {key!r}: index must hold distinct non-negative atom ids")
        built[key] = layer
    info = AtomsInfo(metadata.get("architecture", ""), metadata.get("dictionary_method", ""),
                     metadata.get("prompt", ""), training)
    atoms = SparseAtoms(built, info)
    if atoms.fingerprint() != metadata.get("fingerprint"):
        raise _Invalid("fingerprint does not match the layers (the file was altered)")
    return atoms


def _read_header(data: bytes) -> dict:
    """The safetensors header, checked: JSON object, known dtypes, sizes matching shapes, and
    data offsets that tile the data section exactly."""
    if len(data) < 8:
        raise _Invalid(f"too short to be a safetensors file ({len(data)} bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > _MAX_HEADER or 8 + length > len(data):
        raise _Invalid(f"truncated or not safetensors (header claims {length} bytes, file has "
                       f"{len(data) - 8})")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _Invalid("header is not valid JSON (corrupt or not safetensors)") from None
    if not isinstance(header, dict):
        raise _Invalid("header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _Invalid(f"tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
            raise _Invalid(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape
        ):
            raise _Invalid(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(n, int) and not isinstance(n, bool) for n in offsets)):
            raise _Invalid(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype] or begin < 0:
            raise _Invalid(f"tensor {name!r}: data_offsets {offsets} do not fit shape {shape} of {dtype}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _Invalid(f"tensor {name!r}: data does not follow the previous tensor (offset {begin})")
        position = end
    if 8 + length + position != len(data):
        raise _Invalid(f"truncated or padded data section ({len(data) - 8 - length} bytes, header "
                       f"describes {position})")
    return header


def _layer_list(raw) -> list[tuple[str, list[int]]]:
    if not isinstance(raw, str):
        raise _Invalid("metadata 'layers' is missing")
    try:
        layers = json.loads(raw)
    except json.JSONDecodeError as error:
        raise _Invalid(f"metadata 'layers' is not JSON ({error.msg})") from None
    if not isinstance(layers, list):
        raise _Invalid("metadata 'layers' must be a list of [key, weight_shape]")
    seen = set()
    result = []
    for item in layers:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0]
                and isinstance(item[1], list) and len(item[1]) >= 2
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31
                        for n in item[1])):
            raise _Invalid(f"metadata 'layers' has a malformed entry {str(item)[:80]}")
        if item[0] in seen:
            raise _Invalid(f"metadata 'layers' lists {item[0]!r} twice")
        seen.add(item[0])
        result.append((item[0], item[1]))
    return result
