"""What every data source shares: the spec base class, field helpers, file checks, dtypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import DataError, Source

Arrays = dict[str, np.ndarray]


class DataSource(BaseModel):
    """Base of every data spec: ``load`` turns the spec into named arrays."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Which data source.")  # each source narrows it to a Literal
    seed: int | None = Field(
        None, description="Seed for this data only; by default the run's seed is used.")

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:  # pragma: no cover
        raise NotImplementedError


def source_field(name: str) -> Any:
    return Field(name, description=f"Which data source; '{name}' here.")


def samples_field(default: int = 1000) -> Any:
    return Field(default, ge=1, description="Number of samples to generate.")


def length_field(default: int, what: str = "Sequence length (time steps).") -> Any:
    return Field(default, ge=1, description=what)


def path_field(what: str = "File path; relative paths are resolved against the spec's folder.",
               default: Any = ...) -> Any:
    return Field(default, description=what)


def resolve(base_dir: Path, path: str | Path) -> Path:
    """``path`` against ``base_dir`` (the spec's folder), checked to exist."""
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path(base_dir) / p
    if not p.exists():
        raise DataError(f"no such file: {p}",
                        help="check the path; relative paths are resolved against the "
                             f"spec's folder ({base_dir})")
    return p


def fail(path: Path | str, message: str, line: int | None = None,
         help: str | None = None) -> DataError:
    """A DataError located at ``path`` (and ``line``); ``raise fail(...)``."""
    return DataError(message, source=Source(file=str(path), line=line), help=help)


def standard_dtype(a: np.ndarray) -> np.ndarray:
    """Floats become float32, integers and booleans int32; anything else is refused."""
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    if a.dtype.kind in "iub":
        return a.astype(np.int32, copy=False)
    raise DataError(f"arrays of dtype {a.dtype} are not supported",
                    help="store numbers (floats or integers)")


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
