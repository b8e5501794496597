"""What every data source shares: the spec base class, field helpers, file checks, dtypes."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlgraph.engine.errors import DataError, Source

Arrays = dict[str, np.ndarray]

#: The most bytes the arrays of one data spec (and a generator's float64 scratch) may take.
MAX_DATA_BYTES = 4 * 2**30
#: The largest CSV or text file read (parsed in Python: ~27x its size in memory, ~0.5 s a MB).
MAX_TEXT_BYTES = 64 * 2**20


SOURCE_TABLE: dict[str, type[DataSource]] = {}
"""source name -> its model: every subclass of :class:`DataSource` that names its source
(``source: Literal["name"] = source_field("name")``) enters it by being defined."""


class DataSource(BaseModel):
    """Base of every data spec: ``load`` turns the spec into named arrays."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.model_fields["source"].default
        if isinstance(name, str):
            if name in SOURCE_TABLE:
                raise RuntimeError(f"data source '{name}' defined twice")
            SOURCE_TABLE[name] = cls

    example: ClassVar[tuple[dict, dict] | None] = None
    """A generated source's test, in its record: spec fields, and the shape of each array
    it gives for ``samples: 60`` (tests/test_data.py runs every one). None: it reads a file."""

    source: str = Field(description="Which data source.")  # each source narrows it to a Literal
    seed: int | None = Field(
        None, description="Seed for this data only; by default the run's seed is used.")

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:  # pragma: no cover
        raise NotImplementedError

    def scratch_bytes(self) -> float:
        """About the most memory ``load`` needs, known before it runs (0: a file's own size
        decides, checked as it is read)."""
        return 0.0


def source_field(name: str) -> Any:
    return Field(name, description=f"Which data source; '{name}' here.")


def samples_field(default: int = 1000) -> Any:
    return Field(default, ge=1, description="Number of samples to generate.")


def length_field(default: int, what: str = "Sequence length (time steps).") -> Any:
    return Field(default, ge=1, description=what)


def path_field(what: str = "File path; relative paths are resolved against the spec's folder.",
               default: Any = ...) -> Any:
    return Field(default, description=what)


def standardize_field() -> Any:
    return Field(False, description=(
        "Standardise features to mean 0 and std 1: true for the array x, or a list of the "
        "source's array names. Mean and std come from the training split only, per feature "
        "(each position after the sample axis; a constant one is only centred), are saved "
        "in the run directory (standardize.json) and applied by `evaluate` and `predict`."))


def standardized(spec: DataSource) -> list[str]:
    """The arrays ``spec`` asks to standardise (its ``standardize`` field: true means x)."""
    value = getattr(spec, "standardize", False)
    return ["x"] if value is True else list(value or [])


def resolve(base_dir: Path, path: str | Path, *, folder: bool = False) -> Path:
    """``path`` against ``base_dir`` (the spec's folder), checked to be a regular file (or a
    folder, where ``folder`` allows it): a FIFO or device would block or never end."""
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path(base_dir) / p
    try:
        mode = p.stat().st_mode
    except (OSError, ValueError):
        raise DataError(f"no such file: {p}",
                        help="check the path; relative paths are resolved against the "
                             f"spec's folder ({base_dir})") from None
    if stat.S_ISDIR(mode) and not folder:
        raise fail(p, "this is a folder, not a data file", help="name a file inside it")
    if not stat.S_ISDIR(mode):
        check_regular(p, mode)
    return p


def check_regular(path: Path, mode: int | None = None, limit: int | None = None) -> int:
    """The size of ``path``; DataError for a FIFO, device or socket, or a file over ``limit``."""
    st_mode = path.stat().st_mode if mode is None else mode
    if not stat.S_ISREG(st_mode):
        raise fail(path, "not a regular file (a pipe, device or socket is never read)",
                   help="point the data spec at a file")
    size = path.stat().st_size
    if limit is not None and size > limit:
        raise fail(path, f"the file has {size_text(size)}; at most {size_text(limit)} of "
                         "this format are read", help="convert large data to .npy")
    return size


def size_text(n: float) -> str:
    """``n`` bytes in words: '512 B', '3.2 MiB', '1.5 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def check_budget(what: str, nbytes: float, where: Path | str | None = None,
                 help: str = "use fewer samples or shorter samples") -> None:
    """Refuse data of ``nbytes`` (an estimate, before anything is allocated) over the cap:
    :data:`MAX_DATA_BYTES`, or half the machine's memory where that is less."""
    cap = data_cap()
    if not math.isfinite(nbytes) or nbytes > cap:
        figure = size_text(nbytes) if math.isfinite(nbytes) else "an unbounded amount"
        raise DataError(f"{what} would take {figure} of memory; at most "
                        f"{size_text(cap)} of data are loaded",
                        source=Source(file=str(where)) if where else None, help=help)


def data_cap() -> int:
    """The most bytes of data loaded here: :data:`MAX_DATA_BYTES`, or half the physical
    memory on a smaller machine (the arrays are copied at least once on the way in)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MAX_DATA_BYTES
    return min(MAX_DATA_BYTES, memory // 2)


def fail(path: Path | str, message: str, line: int | None = None,
         help: str | None = None) -> DataError:
    """A DataError located at ``path`` (and ``line``); ``raise fail(...)``."""
    return DataError(message, source=Source(file=str(path), line=line), help=help)


def standard_dtype(a: np.ndarray) -> np.ndarray:
    """Floats become float32, integers and booleans int32; anything else is refused."""
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    if a.dtype.kind in "iub":
        if a.size and a.dtype.kind != "b" and (a.max() > 2**31 - 1 or a.min() < -2**31):
            raise DataError(f"integers up to {a.max()} do not fit int32",
                            help="store integer data (labels, token ids) as int32")
        return a.astype(np.int32, copy=False)
    raise DataError(f"arrays of dtype {a.dtype} are not supported",
                    help="store numbers (floats or integers)")


def check_finite(arrays: Arrays, where: str) -> None:
    """NaN or infinity in float data poisons every loss it touches; name the array and row."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            row = int(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(1))[0])
            value = a.reshape(len(a), -1)[row][~np.isfinite(a.reshape(len(a), -1)[row])][0]
            raise DataError(f"row {row} of '{name}' holds {value}", source=Source(file=where),
                            help="fill in or drop the rows with missing values")


def check_lengths(arrays: Arrays, where: str | None = None) -> int:
    """The common first dimension of ``arrays``; DataError naming the culprits otherwise."""
    source = Source(file=where) if where else None
    if not arrays:
        raise DataError("the data has no arrays", source=source)
    for name, a in arrays.items():
        if a.ndim == 0:
            raise DataError(f"array '{name}' is a scalar; it needs a sample axis",
                            source=source)
    (first, a), *rest = arrays.items()
    for name, b in rest:
        if len(b) != len(a):
            raise DataError(
                f"arrays have different lengths: '{first}' has {len(a)} samples, "
                f"'{name}' has {len(b)}", source=source,
                help="every array needs the same first (sample) dimension")
    return len(a)
