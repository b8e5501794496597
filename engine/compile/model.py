"""The inference model: a compiled graph called with numpy arrays, giving numpy outputs."""

from __future__ import annotations

import numpy as np
from tinygrad import Tensor

from dlgraph.engine.compile import tinygrad_door as door
from dlgraph.engine.compile.cache import ProgramCache
from dlgraph.engine.compile.interpret import init_params, input_dims
from dlgraph.engine.compile.lower import lower
from dlgraph.engine.errors import ShapeError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data.ids import check_ids
from dlgraph.engine.spec.init import random_inputs


class Model:
    """A compiled graph: call it with numpy arrays, get numpy outputs.

    >>> import dlgraph, numpy as np                                     # doctest: +SKIP
    >>> m = dlgraph.compile(dlgraph.load("graphs/mlp.yaml"))            # doctest: +SKIP
    >>> m(x=np.zeros((4, 2), np.float32))["logits"].shape               # doctest: +SKIP
    (4, 3)
    """

    def __init__(self, graph: Graph, params: dict[str, Tensor] | None = None, seed: int = 0,
                 cache: ProgramCache | None = None, progress=None):
        self.graph = graph
        self.outputs = list(graph.outputs)
        computed = [graph.outputs[o] for o in self.outputs if graph.outputs[o] not in graph.inputs]
        with door.LOCK:      # a model may be made in any thread (tinygrad runs here)
            self.params = params if params is not None else init_params(graph, seed)
            self._program = lower(graph, computed, params=self.params, cache=cache)
        self.input_names = self._program.input_names  # what a call must be given
        self._program.progress = progress       # callable(str): what it compiles, as it does
        self._program.label = "the inference program"

    def __call__(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        g = self.graph
        unknown = [n for n in arrays if n not in g.inputs]
        if unknown:
            raise ShapeError(f"unknown input{'s' * (len(unknown) > 1)}: {', '.join(unknown)}",
                             help=f"inputs: {', '.join(g.inputs)}")
        arrays = {k: _array(k, v, g.inputs[k].dtype) for k, v in arrays.items()}
        missing = [n for n in self.input_names if n not in arrays]
        if missing:
            raise ShapeError(f"missing input{'s' * (len(missing) > 1)}: {', '.join(missing)}",
                             help=f"inputs: {', '.join(g.inputs)}")
        dims = input_dims(g, arrays)
        check_ids(g, arrays)      # a label past the classes would be a silent zero row
        outs = self._program.arrays({n: arrays[n] for n in self.input_names}, dims)
        got = dict(zip(self._program.targets, outs, strict=True))
        return {name: got[nid] if nid in got else np.asarray(arrays[nid])
                for name, nid in g.outputs.items()}

    def reserve(self, **lengths: int) -> None:
        """Compile for sequences up to these lengths at the first call (``time=64``), where
        the spec declares no ``dims:`` maximum; longer ones still work (and compile again)."""
        self._program.lengths.reserve(lengths)

    def random_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return random_inputs(self.graph, batch, seed)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: door.read(v) for k, v in self.params.items()}


def _array(name: str, value, dtype: str) -> np.ndarray:
    """An input as a numpy array (lists welcome); numbers only, whole for int inputs."""
    a = np.asarray(value)
    if a.dtype.kind not in "biuf":
        raise ShapeError(f"input '{name}' holds {a.dtype} values, not numbers",
                         help="pass numbers (a numpy array or nested lists)")
    if dtype != "float32" and a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        raise ShapeError(f"input '{name}' is {dtype} but holds fractions",
                         help="pass whole numbers (labels, token ids)")
    return a
