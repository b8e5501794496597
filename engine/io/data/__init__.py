"""The data layer: data specs, loading them into named arrays, splitting and batching.

A data spec is one of the models in :data:`SOURCES`, picked by its ``source`` field::

    data: {source: spirals, samples: 3000, classes: 3}

:func:`load_data` turns a spec into named arrays (``x`` the input, ``y`` the target) that share
their first (sample) dimension; floats are float32, class labels and token ids int32. The keys
and shapes of each source are listed in :mod:`.sources`, :mod:`.files` and :mod:`.text`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from dlgraph.engine.errors import SpecError, suggest
from dlgraph.engine.io.data import files, sources, text  # noqa: F401  (defining a source registers it)
from dlgraph.engine.io.data.base import (
    SOURCE_TABLE,
    Arrays,
    DataSource,
    check_budget,
    check_finite,
    check_lengths,
    standard_dtype,
)
from dlgraph.engine.io.data.batching import DATA, batches, num_batches, rng_for, split
from dlgraph.engine.io.data.sources import gaussian_mixture_centers
from dlgraph.engine.io.data.text import vocabulary

#: source name -> its pydantic model: a source enters the table by being defined (in
#: sources.py, files.py or text.py), so adding one is one class in one file
SOURCES: dict[str, type[DataSource]] = dict(SOURCE_TABLE)
_MODELS = tuple(SOURCES.values())

#: any one data spec, told apart by ``source`` (use as a pydantic field type)
DataSpec = Annotated[Union[_MODELS], Field(discriminator="source")]  # noqa: UP007 (a tuple)

_ADAPTER: TypeAdapter[Any] = TypeAdapter(DataSpec)


def parse_data_spec(obj: Mapping[str, Any] | DataSource) -> DataSource:
    """Validate a plain mapping (e.g. from YAML) into its data model; SpecError if wrong."""
    if isinstance(obj, DataSource):
        return obj
    name = obj.get("source") if isinstance(obj, Mapping) else None
    if isinstance(obj, Mapping) and name not in SOURCES:
        hint = suggest(str(name), SOURCES) if name is not None else None
        raise SpecError(f"unknown data source '{name}'" if name is not None else
                        "the data spec names no `source:`",
                        help=(f"{hint} " if hint else "") + f"sources are: {', '.join(SOURCES)}")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as e:
        problems = "; ".join(
            (".".join(str(p) for p in err["loc"][1:]) or "data") + ": " + err["msg"]
            for err in e.errors())
        raise SpecError(f"bad data spec: {problems}",
                        help=f"sources are: {', '.join(SOURCES)}") from None


def load_data(spec: DataSource | Mapping[str, Any], base_dir: Path | str,
              seed: int) -> Arrays:
    """Named arrays for ``spec``, deterministic for ``seed`` (the spec's own ``seed`` wins).

    Relative file paths are resolved against ``base_dir`` (the spec file's folder).
    """
    spec = parse_data_spec(spec)
    check_budget(f"the '{spec.source}' data", spec.scratch_bytes())
    rng = rng_for(spec.seed if spec.seed is not None else seed, DATA)
    arrays = {k: standard_dtype(np.asarray(v)) for k, v in spec.load(Path(base_dir), rng).items()}
    check_lengths(arrays)
    check_finite(arrays, getattr(spec, "path", None) or spec.source)
    return arrays


__all__ = ["SOURCES", "Arrays", "DataSource", "DataSpec", "batches", "gaussian_mixture_centers",
           "load_data", "num_batches", "parse_data_spec", "split", "vocabulary"]
