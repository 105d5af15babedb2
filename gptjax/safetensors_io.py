"""Streaming safetensors I/O: read tensor by tensor from a memory map, write without building the file in RAM.

The `safetensors` package loads or serialises whole files at once; a gpt2-xl checkpoint is 6.2 GB, so gptjax
reads through `mmap`, copies one tensor out, and drops that tensor's pages again (`MADV_DONTNEED`), which keeps
peak memory near the size of the result. The format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import ml_dtypes
import numpy as np

from gptjax.errors import GptjaxError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # a header this large is a corrupt or hostile file, not a model


def read_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, byte offset of the data) of a safetensors file, validated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise GptjaxError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise GptjaxError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise GptjaxError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise GptjaxError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        _check_entry(path, name, entry, size - 8 - n)
    return header, metadata, 8 + n


def _check_entry(path: str, name: str, entry: object, data_size: int) -> None:
    ok = isinstance(entry, dict) and entry.get("dtype") in DTYPES
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (0, 0)
    ok = ok and isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if ok:
        begin, end = offsets
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
        ok = 0 <= begin <= end <= data_size and end - begin == nbytes
    if not ok:
        raise GptjaxError(f"{path}: tensor {name!r} has a malformed header entry {entry!r} "
                          f"(known dtypes: {sorted(DTYPES)})")


def iter_tensors(path: str, convert: Callable[[str, np.ndarray], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, convert(name, view)) in file order; `convert` must copy out of the read-only view."""
    header, _, data_start = read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = (data_start + o for o in entry["data_offsets"])
            dtype = DTYPES[entry["dtype"]]
            view = np.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
            out = convert(name, view.reshape(entry["shape"]))
            del view  # release the export so the map can close; then give its pages back
            _drop_pages(mm, begin, end)
            yield name, out
    finally:
        try:
            mm.close()
        except BufferError:  # a view is still held by an exception's traceback: the GC closes the map
            pass


def _drop_pages(mm: mmap.mmap, begin: int, end: int) -> None:
    start = begin - begin % mmap.PAGESIZE
    if end > start and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def write_safetensors(f: BinaryIO, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write tensors (in the given order) to an open binary file, streaming one tensor at a time."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, a in tensors.items():
        if a.dtype not in _CODES:
            raise GptjaxError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store")
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    f.write(struct.pack("<Q", len(blob)) + blob)
    for a in tensors.values():
        f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
