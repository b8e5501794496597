"""Data read from files: CSV, NumPy .npy/.npz, MNIST IDX, CIFAR-10 python batches.

Keys, shapes and dtypes (N = rows / samples in the file):

=======  =====================================  ===============================================
source   x                                      y (and others)
=======  =====================================  ===============================================
csv      [N, len(x)] float32                    [N, len(y)] float32, or [N] int32 if label
npy      .npy: [N, ...] under ``key``           .npz: every array by name, or as ``keys`` maps
idx      [N, 1, H, W] float32                   [N] int32
cifar10  [N, 3, 32, 32] float32 in [0, 1]       [N] int32
=======  =====================================  ===============================================

Floating arrays come out float32, integer and boolean arrays int32.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from dlgraph.engine.errors import DataError
from dlgraph.engine.io.data.base import (
    MAX_TEXT_BYTES,
    Arrays,
    DataSource,
    check_budget,
    check_lengths,
    check_regular,
    fail,
    path_field,
    resolve,
    size_text,
    source_field,
    standard_dtype,
    standardize_field,
)
from dlgraph.engine.io.data.declared import DAMAGED, npz_member, read_npy_file


def _did_you_mean(name: str, options: list[str], otherwise: str) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean '{close[0]}'?" if close else otherwise


# ------------------------------------------------------------------ CSV

class Csv(DataSource):
    """Numeric columns of a CSV file: x from the named columns, y from one or more others."""

    source: Literal["csv"] = source_field("csv")
    path: str = path_field()
    x: list[str] = Field(min_length=1, description="Columns that make up the input x.")
    y: str | list[str] | None = Field(
        None, description="Target column(s): one name gives y [N, 1] (or [N] with label), "
                          "a list gives y [N, k]; leave out for no y.")
    label: bool = Field(False, description="y is a class: integers are kept, other values "
                                           "(names) map to 0, 1, ... in sorted order.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="Cell separator.")
    header: bool = Field(True, description="The first row names the columns; without a header "
                                           "columns are named by index: '0', '1', ...")
    standardize: bool | list[str] = standardize_field()

    @model_validator(mode="after")
    def _one_label_column(self) -> Csv:
        if self.label and (self.y is None or (isinstance(self.y, list) and len(self.y) != 1)):
            raise ValueError("label: true needs y to name exactly one column")
        return self

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        path = resolve(base_dir, self.path)
        names, lines, cells = _read_csv(path, self.delimiter, self.header)
        column = {name: i for i, name in enumerate(names)}

        def take(name: str) -> np.ndarray:
            if name not in column:
                hint = "columns are named by their index when header is false" \
                    if not self.header else "use one of the columns listed"
                raise fail(path, f"no column '{name}'; the columns are: {', '.join(names)}",
                           1 if self.header else None, _did_you_mean(name, names, hint))
            return cells[:, column[name]]

        out = {"x": np.stack([_numbers(path, take(c), c, lines) for c in self.x], 1)}
        if self.y is not None:
            ys = [self.y] if isinstance(self.y, str) else self.y
            out["y"] = _labels(take(ys[0])) if self.label else \
                np.stack([_numbers(path, take(c), c, lines) for c in ys], 1)
        return out


def _read_csv(path: Path, delimiter: str, header: bool) -> tuple[list[str], list[int], np.ndarray]:
    """Column names, the line number of each data row, and the cells as a 2-D string array."""
    size = check_regular(path, limit=MAX_TEXT_BYTES)
    # parsed cell by cell in Python: measured 18-27x the file's size at the peak
    check_budget(f"parsing this CSV file ({size_text(size)})", 27.0 * size, path,
                 "convert large data to .npy (np.save), which is read as it lies")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            rows = [(reader.line_num, [c.strip() for c in row])
                    for row in reader if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise fail(path, f"cannot read the file as CSV text ({e})",
                   help="save it as UTF-8 CSV") from None
    if not rows:
        raise fail(path, "the CSV file is empty", help="add a header line and data rows")
    names = rows.pop(0)[1] if header else [str(i) for i in range(len(rows[0][1]))]
    if not rows:
        raise fail(path, "the CSV file has a header but no data rows")
    for line, row in rows:
        if len(row) != len(names):
            cells = f"{len(row)} cell" + ("" if len(row) == 1 else "s")
            raise fail(path, f"this row has {cells}, but there are {len(names)} columns", line,
                       help="every row needs one cell per column")
    return names, [line for line, _ in rows], np.array([row for _, row in rows], dtype=str)


def _numbers(path: Path, cells: np.ndarray, name: str, lines: list[int]) -> np.ndarray:
    try:
        return cells.astype(np.float64)
    except ValueError:
        for row, cell in enumerate(cells):
            try:
                float(cell)
            except ValueError:
                raise fail(path, f"row {row + 1}, column '{name}': '{cell}' is not a number",
                           lines[row], help="x and y columns must hold numbers; for class names "
                                            "in y set label: true") from None
        raise  # pragma: no cover (numpy and float() disagree)


def _labels(cells: np.ndarray) -> np.ndarray:
    """Integer labels as they are; anything else -> index in the sorted unique values."""
    try:
        values = cells.astype(np.float64)
        if np.all(values == np.round(values)):
            return values.astype(np.int32)
    except ValueError:
        pass
    return np.unique(cells, return_inverse=True)[1].astype(np.int32)


# ------------------------------------------------------------------ NumPy

class Npy(DataSource):
    """Arrays from a NumPy file: a .npy array under `key`, or the arrays of a .npz archive."""

    source: Literal["npy"] = source_field("npy")
    path: str = path_field("A .npy or .npz file; relative paths are resolved against the "
                           "spec's folder.")
    key: str = Field("x", description="The name a .npy array gets.")
    keys: dict[str, str] | None = Field(
        None, description="For a .npz archive: output name -> array name in the archive, "
                          "e.g. {x: arr_0, y: labels}. Default: every array by its own name.")
    standardize: bool | list[str] = standardize_field()

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        path = resolve(base_dir, self.path)
        loaded = read_npy_file(path)       # every header's declared size checked first
        if isinstance(loaded, np.ndarray):
            if self.keys is not None:
                raise fail(path, "keys applies to .npz archives; this is a single .npy array",
                           help="use key: NAME to name the array")
            arrays = {self.key: loaded}
        else:
            with loaded:
                found = list(loaded.files)
                wanted = self.keys or {name: name for name in found}
                for name in wanted.values():
                    if name not in found:
                        raise fail(path, f"no array '{name}' in the archive; it holds: "
                                         f"{', '.join(sorted(found))}",
                                   help=_did_you_mean(name, found, "use one of those names"))
                arrays = {out: npz_member(loaded, name, path)
                          for out, name in wanted.items()}
        out = {}
        for name, a in arrays.items():
            try:
                out[name] = standard_dtype(a)
            except DataError as e:
                raise fail(path, f"array '{name}': {e.message}", help=e.help) from None
        check_lengths(out, str(path))
        return out


# ------------------------------------------------------------------ MNIST IDX

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class Idx(DataSource):
    """MNIST-style IDX files (plain or .gz): images x [N, 1, H, W] and labels y [N]."""

    source: Literal["idx"] = source_field("idx")
    images: str = path_field("IDX image file, e.g. train-images-idx3-ubyte(.gz).")
    labels: str = path_field("IDX label file, e.g. train-labels-idx1-ubyte(.gz).")
    normalize: bool = Field(True, description="Scale pixels from 0..255 to [0, 1].")

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        image_path, label_path = resolve(base_dir, self.images), resolve(base_dir, self.labels)
        images, labels = _read_idx(image_path, 3, "image"), _read_idx(label_path, 1, "label")
        if len(images) != len(labels):
            raise fail(label_path, f"there are {len(labels)} labels for {len(images)} images "
                                   f"in {image_path}",
                       help="use the label file that belongs to the image file")
        x = images[:, None].astype(np.float32)
        return {"x": x / 255 if self.normalize else x, "y": labels.astype(np.int32)}


def _read_idx(path: Path, ndim: int, what: str) -> np.ndarray:
    check_regular(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        # Read the header first and then only the bytes it declares (plus one to tell an
        # oversized file): a gzip bomb never inflates further than that.
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            raw = f.read(4 + 4 * ndim)
            expect = 0x0800 | ndim
            if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES or raw[3] != ndim:
                got = f"0x{int.from_bytes(raw[:4], 'big'):08X}" if len(raw) >= 4 else "missing"
                raise fail(path, f"not an IDX {what} file: the magic number is {got}, "
                                 f"expected 0x{expect:08X}",
                           help=f"point '{what}s' at an IDX {what} file (e.g. from MNIST)")
            header, dtype = len(raw), np.dtype(_IDX_TYPES[raw[2]])
            dims = struct.unpack(f">{ndim}I", raw[4:]) if len(raw) == 4 + 4 * ndim else ()
            size = header + math.prod(dims) * dtype.itemsize if dims else header
            check_budget(f"the IDX {what}s of shape {list(dims)}", size, path, DAMAGED)
            raw += f.read(size - header + 1) if dims else f.read(1)
    except (OSError, EOFError, zlib.error):
        raise fail(path, "the gzip data is damaged or cut short",
                   help="download the file again") from None
    if len(raw) != size:
        found = f"{len(raw)}" if len(raw) < size else "more than that"
        raise fail(path, f"{'truncated' if len(raw) < size else 'oversized'} IDX file: "
                         f"expected {size} bytes, found {found}",
                   help="the file is damaged or cut short; download it again")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


# ------------------------------------------------------------------ CIFAR-10

class Cifar10(DataSource):
    """CIFAR-10 python batches: x [N, 3, 32, 32] in [0, 1] and labels y [N]."""

    source: Literal["cifar10"] = source_field("cifar10")
    paths: str | list[str] = Field(description=(
        "Batch files (e.g. [data_batch_1, ..., data_batch_5]), or a folder: then its "
        "data_batch_* files, in order. Relative paths are resolved against the spec's folder."))

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        files = [resolve(base_dir, p, folder=True) for p in
                 ([self.paths] if isinstance(self.paths, str) else self.paths)]
        if len(files) == 1 and files[0].is_dir():
            folder = files[0]
            files = sorted(folder.glob("data_batch_*"))
            if not files:
                raise fail(folder, "the folder has no data_batch_* files",
                           help="point paths at the cifar-10-batches-py folder or list the files")
        check_budget("these CIFAR-10 batches", 5.0 * sum(f.stat().st_size for f in files))
        batches = [_read_cifar_batch(f) for f in files]
        return {"x": np.concatenate([x for x, _ in batches]).astype(np.float32) / 255,
                "y": np.concatenate([y for _, y in batches])}


# What a CIFAR-10 batch may name when it is unpickled: numpy's array reconstructors and the
# latin-1 codec (pickles written by Python 2). Anything else -- os.system, eval, any class --
# is refused before it is called, so a crafted batch file cannot run code.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _Refused(pickle.UnpicklingError):
    """A global that a CIFAR-10 batch never names."""


class _CifarUnpickler(pickle.Unpickler):
    """Admits builtin containers, bytes, str, numbers and numpy arrays; nothing callable."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's signature)
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"it names {module}.{name}, which a CIFAR-10 batch "
                                     "never holds")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    help = "use the python version of CIFAR-10 (cifar-10-python.tar.gz), extracted"
    check_regular(path)
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise fail(path, f"refused to unpickle: {e}",
                   help="only arrays, numbers, strings and containers are read; " + help) \
            from None
    except Exception:
        raise fail(path, "not a CIFAR-10 batch: it cannot be unpickled", help=help) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise fail(path, "not a CIFAR-10 batch: it has no b'data' and b'labels' entries",
                   help=help)
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
        if data.dtype.kind not in "iub" or labels.dtype.kind not in "iub":
            raise ValueError
        labels = labels.astype(np.int32)
    except (ValueError, TypeError, OverflowError):
        raise fail(path, "not a CIFAR-10 batch: data and labels must be integers",
                   help=help) from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(data) != len(labels):
        raise fail(path, f"not a CIFAR-10 batch: data has shape {list(data.shape)} for "
                         f"{len(labels)} labels, expected [{len(labels)}, 3072]", help=help)
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        bad = int(np.flatnonzero((labels < 0) | (labels > 9))[0])
        raise fail(path, f"label {int(labels[bad])} of image {bad} is not a CIFAR-10 class "
                         "(0-9)", help=help)
    return data.reshape(-1, 3, 32, 32), labels
