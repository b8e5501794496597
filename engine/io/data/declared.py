"""Array files whose headers declare their sizes (.npy, .npz, .safetensors), read so that a
damaged or hostile header is refused with its figure before anything is allocated.

A .npy header names a shape and a dtype, every member of a .npz archive has a .npy header
of its own (its zip entry's size says nothing of it), and a safetensors header is JSON
that lists each tensor's dtype, shape and byte range. NumPy and the safetensors library
trust these: a header declaring 10^12 values is a MemoryError, metadata nested 100,000
levels a RecursionError. Here every declared size is summed and checked against the data
cap (:func:`~dlgraph.engine.io.data.base.check_budget`) first, and every failure is one
located :class:`DataError`.

>>> arrays = read_npy_file("data.npz")                          # doctest: +SKIP
>>> arrays, header = read_safetensors_file(Path("weights.safetensors"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

from dlgraph.engine.io.data.base import check_budget, check_regular, fail

DAMAGED = "its header declares more data than can be loaded: a damaged or hostile file"


# ------------------------------------------------------------------ NumPy .npy / .npz


def _npy_header(f, path: Path, member: str | None = None) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from the .npy header at the start of ``f``."""
    what = f"array '{member}' of the archive" if member else "the file"
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
                (3, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unknown .npy version {version}")
        shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, zipfile.BadZipFile) as e:
        raise fail(path, f"{what} is not a NumPy .npy array ({e})",
                   help="save arrays of numbers with np.save / np.savez") from None
    if any(d < 0 for d in shape):
        raise fail(path, f"{what} declares the shape {list(shape)}",
                   help="the file is damaged; save it again")
    return tuple(shape), dtype


def npy_sizes(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """Name -> (shape, dtype) of each array a .npy file (one, named '') or .npz archive
    declares, read from the headers only; the declared bytes are checked against the cap."""
    check_regular(path)
    found: dict[str, tuple[tuple, np.dtype]] = {}
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():         # NumPy reads any member with the magic
                    with z.open(info) as f:
                        name = info.filename.removesuffix(".npy")
                        found[name] = _npy_header(f, path, info.filename)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError,
                NotImplementedError):
            raise fail(path, "the .npz archive is damaged", help="save it again") from None
    else:
        with open(path, "rb") as f:
            found[""] = _npy_header(f, path)
    total = sum(math.prod(s) * d.itemsize for s, d in found.values())
    if "" in found:
        what = f"the array of shape {list(found[''][0])}"
    else:
        shapes = ", ".join(f"{k} {list(s)} {d}" for k, (s, d) in found.items())
        what = f"the arrays of this archive ({shapes[:200]})"
    check_budget(what, total, path, DAMAGED)
    return found


def read_npy_file(path: Path):
    """``np.load`` of a .npy (an array) or .npz (the archive) whose headers were checked by
    :func:`npy_sizes` first; a located DataError for anything unreadable."""
    path = Path(path)
    npy_sizes(path)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise fail(path, "not a NumPy .npy or .npz file, or it holds Python objects "
                         f"({e})", help="save arrays of numbers with np.save / np.savez") \
            from None


def npz_member(archive, name: str, path: Path) -> np.ndarray:
    """One array of an open .npz archive (its header already checked), errors located."""
    try:
        return archive[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise fail(path, f"array '{name}' of the archive cannot be read ({e})",
                   help="the file is damaged or cut short; save it again") from None


# ------------------------------------------------------------------ safetensors

#: safetensors dtype -> numpy dtype; BF16 has none in NumPy and is widened to float32
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                      "U8": "u1", "BOOL": "?", "BF16": "<u2"}
#: the largest safetensors header read (the format's own readers stop at 100 MB)
MAX_HEADER_BYTES = 100 * 2**20


def _bad(where: str, why: str, help: str = "the file may be truncated or damaged; use "
                                           "another weights file"):
    return fail(where, f"not a readable safetensors file: {why}", help=help)


#: nesting a header may have: a safetensors header is 3 deep, dlgraph's metadata about 4
MAX_JSON_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(text: bytes) -> int:
    """How deep JSON ``text`` nests, counted on its brackets outside strings (so that
    nothing recurses on a hostile header)."""
    raw = np.frombuffer(_STRING.sub(b"", text), np.uint8)
    step = (raw == ord("[")).astype(np.int64) + (raw == ord("{")) - (raw == ord("]")) \
        - (raw == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def _header_json(text: bytes, where: str):
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise _bad(where, f"its header nests {depth:,} levels deep (at most "
                          f"{MAX_JSON_DEPTH} are read)",
                   help="a damaged or hostile file; use another weights file")
    try:
        return json.loads(text)
    except RecursionError:
        raise _bad(where, "its header is nested too deeply",
                   help="a damaged or hostile file; use another weights file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(where, f"its header is not JSON ({e})",
                   help="the file may be truncated; use another checkpoint") from None


def safetensors_header(data: bytes | memoryview, where: str, size: int | None = None) -> dict:
    """The header of a safetensors file (``data`` holds at least its first 8 + n bytes;
    ``size``: the whole file's), every tensor's dtype, shape and byte range checked
    against each other and the file, and the declared total against the cap."""
    size = len(data) if size is None else size
    if size < 8:
        raise _bad(where, "it is shorter than its 8-byte header size",
                   help="the file may be truncated; use another checkpoint")
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise _bad(where, f"its header declares {n:,} bytes, the file "
                          f"has {size - 8:,} after the size", help="use another weights file")
    header = _header_json(bytes(data[8:8 + n]), where)
    if not isinstance(header, dict):
        raise _bad(where, "its header is not a JSON object")
    total, body = 0, size - 8 - n
    for name, t in header.items():
        if name != "__metadata__":
            total += _tensor_bytes(name, t, where, body)
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if body != max(ends, default=0):      # what no tensor claims is never read into memory
        raise _bad(where, f"its tensors end at byte {max(ends, default=0):,} of the data, "
                          f"the file holds {body:,}")
    check_budget("the tensors of this file", total, where, DAMAGED)
    return header


def _tensor_bytes(name: str, t, where: str, body: int) -> int:
    """The bytes tensor ``name`` declares, checked against its dtype, shape and range."""
    ok = isinstance(t, dict) and isinstance(t.get("shape"), list) and \
        all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"]) \
        and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2 and \
        all(isinstance(o, int) and not isinstance(o, bool) for o in t["data_offsets"])
    if not ok:
        raise _bad(where, f"tensor '{name}' has no valid shape and data_offsets",
                   help="the file is damaged; use another weights file")
    if t.get("dtype") not in SAFETENSORS_DTYPES:
        raise fail(where, f"tensor '{name}' has the dtype {t.get('dtype')!r}, which dlgraph "
                          "does not read", help="known dtypes: "
                                                + ", ".join(SAFETENSORS_DTYPES))
    begin, end = t["data_offsets"]
    need = math.prod(t["shape"]) * np.dtype(SAFETENSORS_DTYPES[t["dtype"]]).itemsize
    if not 0 <= begin <= end <= body or end - begin != need:
        raise _bad(where, f"tensor '{name}' declares shape {t['shape'][:8]} {t['dtype']} "
                          f"({need:,} bytes) at bytes {begin:,}-{end:,} of {body:,}",
                   help="the file is damaged or cut short; use another weights file")
    return need


def read_safetensors(data: bytes | memoryview, where: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the header of a safetensors file's bytes; BF16 tensors are widened to
    float32 (NumPy has no bfloat16), and a line on stderr says so."""
    header = safetensors_header(data, where)
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    arrays, widened = {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[t["dtype"]])
        a = np.frombuffer(data, dtype, offset=start + begin, count=(end - begin) //
                          dtype.itemsize).reshape(t["shape"]) if end > begin else \
            np.zeros(t["shape"], dtype)
        if t["dtype"] == "BF16":            # bfloat16 is the top half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
            widened.append(name)
        arrays[name] = a.copy()
    if widened:
        print(f"warning: {where}: read {len(widened)} bfloat16 tensor"
              f"{'s' * (len(widened) > 1)} as float32 ({', '.join(widened[:4])}"
              f"{', ...' if len(widened) > 4 else ''})", file=sys.stderr)
    return arrays, header


def read_safetensors_file(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """:func:`read_safetensors` of a file, its header checked before the body is read."""
    safetensors_shapes(path)
    return read_safetensors(Path(path).read_bytes(), str(path))


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a safetensors file, from its header alone (nothing else is
    read): what `validate` checks `init_from:` against."""
    path = Path(path)
    size = check_regular(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = safetensors_header(head + f.read(min(n, MAX_HEADER_BYTES)), str(path), size)
    return {k: list(t["shape"]) for k, t in header.items() if k != "__metadata__"}


def metadata_json(header: dict, key: str, where: str):
    """The JSON value stored as text under ``__metadata__[key]`` (None when absent)."""
    meta = header.get("__metadata__")
    text = meta.get(key) if isinstance(meta, dict) else None
    if text is None:
        return None
    try:
        if json_depth(text.encode("utf-8", "replace")) > MAX_JSON_DEPTH:
            raise ValueError("nested too deeply")
        return json.loads(text)
    except (RecursionError, ValueError, TypeError, AttributeError):
        raise fail(where, f"the file's {key} metadata is damaged",
                   help="use another checkpoint, or the weights.safetensors of the run") \
            from None


__all__ = ["DAMAGED", "MAX_HEADER_BYTES", "SAFETENSORS_DTYPES", "metadata_json", "npy_sizes",
           "npz_member", "read_npy_file", "read_safetensors", "read_safetensors_file",
           "safetensors_header", "safetensors_shapes"]
