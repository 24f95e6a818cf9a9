"""Loading checkpoints without a second copy of the weights.

The model is built on the meta device (no memory) and the checkpoint tensors are
assigned directly as its parameters. A tensor that starts on a 64-byte boundary in
the file is a view of a private file mapping (page-cache pages shared by every
process mapping the file); the others, in practice all of a file's (see ALIGNMENT),
are copied once into aligned memory. Either way, processes forked after the load
(prefork workers) share the pages until something writes to them (nothing does at
inference).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch
from torch import nn

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Real headers are a few hundred KB at most; the length field is read from the file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Tensors are read where the file maps them only if they start on a 64-byte boundary (a cache
# line, an AVX-512 vector); a file's data usually does not (8 + header length bytes in), and
# then every vector load of a product straddles two lines: one EPYC core read the 24-layer
# model's 1.2 GB of backbone weights at 12.8 GB/s in place, 18.2 GB/s from aligned copies.
ALIGNMENT = 64


class CheckpointError(ValueError):
    """The checkpoint does not match the model built from the config."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file: views of a private mapping of it where aligned, else copies.

    Nothing is allocated from what the file claims before it is checked against
    the file's size: a corrupt header length or tensor entry is a CheckpointError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > min(file_size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path} is not a safetensors file (header length {header_len} in a {file_size}-byte file)"
                )
            header = json.loads(f.read(header_len))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data_len = file_size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _checked_entry(path, name, info, data_len)
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=8 + header_len + begin)
        if data.data_ptr() % ALIGNMENT:
            data = torch.empty(end - begin, dtype=torch.uint8).copy_(data)
        tensors[name] = data.view(dtype).view(shape)
    return tensors


def _checked_entry(path: Path, name: str, info, data_len: int) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    """dtype, shape and data offsets of one header entry, checked against each other and the file's size."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name} has a malformed header entry")
    dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise CheckpointError(f"{path}: tensor {name} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise CheckpointError(f"{path}: tensor {name} has malformed data offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{path}: tensor {name} has malformed data offsets {offsets!r}")
    if end > data_len:
        raise CheckpointError(f"{path} is truncated (tensor {name} runs past the end of the file)")
    if math.prod(shape) * dtype.itemsize != end - begin:
        raise CheckpointError(f"{path}: tensor {name} of shape {shape} does not fill its {end - begin} bytes")
    return dtype, shape, (begin, end)


def assign_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strictly match `tensors` to the model's state dict and make them its parameters and buffers."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{k} {list(tensors[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the config's architecture ({'; '.join(problems)}); "
            "pass the config that belongs to these weights"
        )
    # A stored dtype other than the model's is converted (a private copy for that tensor).
    converted = {k: t if t.dtype == expected[k].dtype else t.to(expected[k].dtype) for k, t in tensors.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"model tensors not provided by {source}: {', '.join(left[:5])}")


def read_training_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors (`flow_lm.*`, and `mimi.*` when saved) of a training checkpoint (.pt).

    Read with `weights_only=True`: tensors and plain containers only, never code. A run
    that tracks an exponential moving average saves it under "ema"; it covers only the
    trained parameters, so it is laid over "model" (frozen parts, e.g. a distilled
    student's heads, exist only there).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is a safetensors file, not a training checkpoint: pass it as weights")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle, zip and mmap errors all mean "not a loadable checkpoint"
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path} cannot be read as a training checkpoint ({type(exc).__name__}: {reason})") from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, dict) or not model:
        raise CheckpointError(f"training checkpoint {path} holds no 'model' weights")
    ema = payload.get("ema")
    tensors = {**model, **ema} if isinstance(ema, dict) else dict(model)
    tensors = {k: v for k, v in tensors.items() if k.startswith(("flow_lm.", "mimi.")) and isinstance(v, torch.Tensor)}
    if not any(k.startswith("flow_lm.") for k in tensors):
        raise CheckpointError(f"training checkpoint {path} holds no flow_lm.* weights")
    return tensors
