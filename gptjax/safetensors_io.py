"""Streaming safetensors I/O: read tensor by tensor from a memory map, write without building the file in RAM.

The `safetensors` package loads or serialises whole files at once; a gpt2-xl checkpoint is 6.2 GB, so gptjax
reads through `mmap`, copies one tensor out, and drops that tensor's pages again (`MADV_DONTNEED`), which keeps
peak memory near the size of the result. The format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
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
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
# What any GPT-2 needs, with room to spare: gpt2-xl has 48 layers x 12 tensors + 4 = 580 tensors (+ 48 mask
# buffers in older transformers files, + one scale per matmul weight in an int8 checkpoint) and a header of
# about 70 KB. Beyond these a file is corrupt or hostile: refused before the header is read (size) or built
# into Python objects (count), since a 100 MB header of 1.6M empty tensors took 1.5 GB and half a minute.
MAX_HEADER_BYTES = 16 * 2**20
MAX_TENSORS = 4096
_MAX_RANK = 32

Header = tuple[dict[str, dict], dict[str, str], int]  # (tensor entries, metadata, byte offset of the data)


def read_header(path: str) -> Header:
    """(tensor entries, metadata, byte offset of the data) of a safetensors file, validated as strictly as
    the reference implementation: known dtypes, sane shapes, offsets that tile the data section exactly."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise GptjaxError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise GptjaxError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
        if n > MAX_HEADER_BYTES:
            raise GptjaxError(f"{path}: a safetensors header of {n} bytes exceeds gptjax's limit of "
                              f"{MAX_HEADER_BYTES} (a GPT-2's is under 100 KB)")
        header = _parse_json(path, f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GptjaxError(f"{path}: __metadata__ must map strings to strings")
    for name, entry in header.items():
        _check_entry(path, name, entry)
    _check_tiling(path, header, size - 8 - n)
    return header, metadata, 8 + n


def _parse_json(path: str, blob: bytes) -> dict:
    def no_duplicates(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise GptjaxError(f"{path}: the header names a tensor twice")
        return dict(pairs)

    # every tensor entry spells "dtype" (an escaped spelling slips past this count; the check after parsing
    # catches it, bounded by MAX_HEADER_BYTES): refuse a huge table before building its dicts
    _check_count(path, blob.count(b'"dtype"'))
    try:
        header = json.loads(blob, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, GptjaxError):
            raise
        raise GptjaxError(f"{path} is not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise GptjaxError(f"{path} is not a safetensors file (header is not a JSON object)")
    _check_count(path, len(header) - ("__metadata__" in header))
    return header


def _check_count(path: str, count: int) -> None:
    if count > MAX_TENSORS:
        raise GptjaxError(f"{path}: the header lists {count} tensors; gptjax reads at most {MAX_TENSORS} "
                          "(gpt2-xl has 580)")


def _check_entry(path: str, name: str, entry: object) -> None:
    if isinstance(entry, dict) and "dtype" in entry and not isinstance(entry["dtype"], str):
        raise GptjaxError(f"{path}: tensor {name!r} has dtype {str(entry['dtype'])[:100]}; a dtype must be a "
                          f"string, one of {sorted(DTYPES)}")
    if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES:
        raise GptjaxError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which gptjax does not read "
                          f"(readable: {sorted(DTYPES)})")
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (0, 0)
    ok = isinstance(entry, dict) and "dtype" in entry
    ok = ok and isinstance(shape, list) and len(shape) <= _MAX_RANK and all(
        type(s) is int and 0 <= s < 2**48 for s in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    if ok:
        begin, end = offsets
        ok = 0 <= begin <= end and end - begin == math.prod(shape) * DTYPES[entry["dtype"]].itemsize
    if not ok:
        raise GptjaxError(f"{path}: tensor {name!r} has a malformed header entry {str(entry)[:200]}")


def _check_tiling(path: str, header: dict[str, dict], data_size: int) -> None:
    """Tensors must cover the data section back to back: no gaps, overlaps, aliases or trailing bytes."""
    position = 0
    for name, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin != position:
            raise GptjaxError(f"{path}: tensor {name!r} starts at byte {begin}, expected {position} "
                              "(tensors must not overlap or leave gaps)")
        position = end
    if position != data_size:
        raise GptjaxError(f"{path}: the tensors cover {position} bytes but the data section has {data_size}")


def iter_tensors(path: str, convert: Callable[[str, np.ndarray], np.ndarray], header: Header | None = None
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, convert(name, view)) in file order; `convert` must copy out of the read-only view. `header`:
    read_header(path) if the caller already has it (each header is parsed once)."""
    entries, _, data_start = header or read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
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
    tensors = {name: _little_endian(a) for name, a in tensors.items()}
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


def _little_endian(a: np.ndarray) -> np.ndarray:
    """safetensors stores little-endian bytes; swap big-endian arrays (a no-op for native ones)."""
    return a.astype(a.dtype.newbyteorder("<"), copy=False) if a.dtype.byteorder == ">" else a
