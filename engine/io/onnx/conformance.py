"""ONNX's own backend tests run through dlgraph: import, compile, compare.

Two sources, both shipped with the onnx wheel and written by no one here:

- the node cases of ``onnx.backend.test.case.node.collect_testcases`` (one operator each,
  with inputs and expected outputs in memory);
- the model folders ``onnx/backend/test/data/{pytorch-converted, pytorch-operator, simple,
  light}`` (``model.onnx`` and ``test_data_set_*/{input,output}_*.pb``).

A case *passes* when its model imports and dlgraph's outputs match the expected ones within
the case's tolerances; it is *unsupported* when the import refuses it (an operator, an
attribute or a dtype dlgraph does not have), and *failed* otherwise. dlgraph layers own
their weights and shapes are static, so when a case does not import as it is and gives
weights or shape arguments as graph inputs (``LSTM``'s W, R, B; ``Slice``'s bounds;
``ReduceSum``'s axes), the runner bakes every input after the first into initializers
and says so.

``DlgraphBackend`` exposes the same path as an ``onnx.backend.base.Backend``, so ONNX's
``BackendTest`` can drive it too. Run ``python -m dlgraph.engine.io.onnx.conformance`` (or
``make onnx-conformance``) to write docs/onnx.md.
"""

from __future__ import annotations

import re
import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.io.onnx.formats import require_onnx

DATA_GROUPS = ("pytorch-converted", "pytorch-operator", "simple", "light")
NP = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}


@dataclass
class Case:
    name: str
    group: str                       # 'node' or a data folder
    model: object                    # ModelProto
    data: list                       # [(inputs, expected outputs)], lists of arrays
    rtol: float = 1e-3
    atol: float = 1e-7


@dataclass
class Result:
    name: str
    group: str
    operator: str
    status: str                      # passed | failed | unsupported
    detail: str = ""


def node_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases
    with np.errstate(all="ignore"):
        cases = collect_testcases(None)
    return [Case(c.name, "node", c.model, [(list(i), list(o)) for i, o in c.data_sets or []],
                 c.rtol, c.atol) for c in cases if "_expanded" not in c.name]


def data_cases(groups=DATA_GROUPS) -> list[Case]:
    import onnx
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    out = []
    for group in groups:
        for folder in sorted((root / group).glob("*/")):
            if not (folder / "model.onnx").is_file():
                continue
            data = [(_read(ds, "input"), _read(ds, "output"))
                    for ds in sorted(folder.glob("test_data_set_*"))]
            out.append(Case(folder.name, group, onnx.load(str(folder / "model.onnx")), data))
    return out


def _read(folder: Path, kind: str) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper
    files = sorted(folder.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    return [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in files]


def operator_of(case: Case) -> str:
    """The operator a case tests: the node whose type names the case, else the first."""
    types = [n.op_type for n in case.model.graph.node]
    snake = lambda t: re.sub(r"(?<!^)(?=[A-Z])", "_", t).lower()
    name = case.name.removeprefix("test_").lower()
    for t in sorted(set(types), key=len, reverse=True):
        if name.startswith(t.lower()) or name.startswith(snake(t)):
            return t
    return types[0] if types else "?"


def bake(model, inputs: list, keep: int = 1):
    """A copy of `model` whose graph inputs after the first `keep` are initializers."""
    from onnx import numpy_helper
    m = type(model)()
    m.CopyFrom(model)
    real = [vi for vi in m.graph.input if vi.name not in {t.name for t in m.graph.initializer}]
    for vi, value in list(zip(real, inputs, strict=False))[keep:]:
        if vi.name:
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
    names = {t.name for t in m.graph.initializer}
    kept = [vi for vi in m.graph.input if vi.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(kept)
    return m


# -- running ---------------------------------------------------------------------------------
def compile_proto(model):
    """A dlgraph Model of an ONNX ModelProto (imported in memory), and its Importer."""
    from tinygrad import Tensor

    from dlgraph.engine.compile.model import Model
    from dlgraph.engine.io.onnx.importer import import_proto, prepare_model
    _, weights, g, imp = import_proto(prepare_model(model), "conformance")
    return Model(g, {k: Tensor(v).realize() for k, v in weights.items()}), imp


def run_model(model, imp, arrays: list) -> list[np.ndarray]:
    """Outputs in ONNX's order for inputs in ONNX's order."""
    g = model.graph
    feed = {}
    for name, a in zip(imp.input_ids, arrays, strict=False):
        nid = imp.input_ids[name]
        feed[nid] = np.asarray(a).astype(NP[g.inputs[nid].dtype])
    return list(model(**feed).values())


WIDE = {"float64", "uint8", "int8", "uint16", "int16", "uint32", "uint64", "float16",
        "bfloat16", "complex64", "complex128", "object", "str"}


def _dtype_problem(case: Case) -> str | None:
    for inputs, outputs in case.data[:1]:
        for a in list(inputs) + list(outputs):
            a = np.asarray(a) if isinstance(a, np.generic) else a    # a scalar is a tensor
            if not isinstance(a, np.ndarray):
                return f"{type(a).__name__} values (dlgraph has tensors only)"
            dt = a.dtype
            if dt.name in WIDE or dt.kind in "USO":
                return f"dtype {dt.name} (dlgraph has float32, int32 and bool)"
    return None


def _prepare(case: Case):
    """(model, importer, baked?) for a case; a DlgraphError says why it cannot import."""
    try:
        return (*compile_proto(case.model), False)
    except DlgraphError as e:
        if len(case.model.graph.input) < 2:
            raise
        first = str(e)
    try:
        return (*compile_proto(bake(case.model, case.data[0][0])), True)
    except DlgraphError:
        raise DlgraphError(first) from None


def _compare(case: Case, got: list, expected: list) -> str | None:
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for k, (a, e) in enumerate(zip(got, expected, strict=True)):
        e = np.asarray(e)
        if a.shape != e.shape:
            return f"output {k}: shape {list(a.shape)}, expected {list(e.shape)}"
        if e.dtype.kind in "biu":
            if not np.array_equal(a.astype(np.int64), e.astype(np.int64)):
                return f"output {k}: values differ"
        elif not np.allclose(a, e, rtol=case.rtol, atol=case.atol, equal_nan=True):
            err = float(np.nanmax(np.abs(a.astype(np.float64) - e)))
            return f"output {k}: max abs error {err:.3g} (rtol {case.rtol}, atol {case.atol})"
    return None


def _alarm(signum, frame):
    raise TimeoutError


def run_case(case: Case, limit_s: int = 120) -> Result:
    op = operator_of(case)
    res = lambda status, detail="": Result(case.name, case.group, op, status, detail)
    if not case.data:
        return res("unsupported", "no test data")
    why = _dtype_problem(case)
    if why:
        return res("unsupported", why)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        try:
            model, imp, baked = _prepare(case)
        except DlgraphError as e:
            return res("unsupported", str(e).splitlines()[0])
        for inputs, expected in case.data[:1] if baked else case.data:
            bad = _compare(case, run_model(model, imp, inputs[:1] if baked else inputs),
                           expected)
            if bad:
                return res("failed", bad)
        return res("passed", "inputs after the first baked as initializers" if baked else "")
    except TimeoutError:
        return res("failed", f"took over {limit_s} s")
    except Exception as e:  # a case dlgraph imports but cannot run is a failure to report
        return res("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- the report ------------------------------------------------------------------------------
def run_all(groups=("node",) + DATA_GROUPS, pattern: str | None = None, limit_s: int = 120,
            progress=None) -> list[Result]:
    """Run every case of the groups (names matching `pattern`, a regex, when given)."""
    require_onnx("The ONNX conformance runner")
    cases = (node_cases() if "node" in groups else []) + \
        data_cases([g for g in groups if g != "node"])
    out = []
    for case in cases:
        if pattern and not re.search(pattern, case.name):
            continue
        out.append(run_case(case, limit_s))
        if progress:
            progress(out[-1])
    return out


def report(results: list[Result], command: str) -> str:
    """docs/onnx.md: totals, a table per operator (node cases), one row per model."""
    nodes = [r for r in results if r.group == "node"]
    models = [r for r in results if r.group != "node"]
    per_op: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in nodes:
        per_op[r.operator][r.status] += 1
    count = lambda rs, st: sum(r.status == st for r in rs)
    lines = ["# ONNX conformance", "",
             f"Generated by `{command}` over the backend test data shipped with the onnx "
             "wheel: the node cases of `onnx.backend.test.case.node` (the `_expanded` "
             "variants left out) and the model folders of `onnx/backend/test/data`.", "",
             "A case passes when it imports and dlgraph's outputs match within the case's "
             "tolerances; *unsupported*: the import refuses it (the reason is given); "
             "*failed*: it imports but does not run or match. Where a case does not import as "
             "it is, every input after the first (weights, axes, bounds) is baked into an "
             "initializer and the case says so: dlgraph layers own their weights and its "
             "shapes are static. The `light` folder ships no inputs and is not run.", "",
             "| cases | passed | failed | unsupported |", "|---|---|---|---|"]
    for label, rs in (("node", nodes), ("models", models)):
        lines.append(f"| {label} ({len(rs)}) | {count(rs, 'passed')} | {count(rs, 'failed')} "
                     f"| {count(rs, 'unsupported')} |")
    lines += ["", "## Operators (node cases)", "",
              "| operator | passed | failed | unsupported |", "|---|---|---|---|"]
    for op in sorted(per_op):
        c = per_op[op]
        lines.append(f"| {op} | {c['passed']} | {c['failed']} | {c['unsupported']} |")
    lines += _tables() + _details(results)
    return "\n".join(lines) + "\n"


def _tables() -> list[str]:
    """What export and import cover, generated from their tables."""
    from dlgraph.engine.io.onnx.export import LAYERS
    from dlgraph.engine.io.onnx.importer import RULES
    from dlgraph.engine.io.onnx.prims import PRIMITIVES
    return ["", "## What dlgraph exports and imports", "",
            "Export writes these spec layers as ONNX operators of their own (from the spec "
            "node): " + ", ".join(f"`{k}`" for k in sorted(LAYERS)) + "; and these "
            "primitives one by one: " + ", ".join(f"`{k}`" for k in sorted(PRIMITIVES)) +
            ". Layers inside modules, at any depth, are written the same way (a ResNet "
            "written with modules has a Conv per conv2d). A `scan` over a module of the spec "
            "is one ONNX `Scan` (batch-first, its body the module's layers and primitives "
            "reading the weights from the outer graph; a state read at every step is a Scan "
            "output, a state read at the end its final value). Layers nested in another "
            "composite (the norms, attention and softmax of a transformer block) are written "
            "as their primitives. A spec that needs a primitive ONNX has no operator for "
            "stops with one error naming them all; nothing is written.", "",
            "Import reads these ONNX operators: " + ", ".join(f"`{k}`" for k in sorted(RULES)) +
            ". Gemm, MatMul (+ Add), Conv, ConvTranspose, BatchNormalization, "
            "LayerNormalization, Gather of a table, LSTM, GRU and RNN with constant weights "
            "become layers (linear, conv2d/conv1d, conv_transpose2d, batch_norm, layer_norm, "
            "embedding, lstm, gru, rnn), with a following activation folded in; shape "
            "arithmetic is read from ONNX's shape inference and followed symbolically "
            "(`batch * 4`, slices of shapes, PyTorch's `expand(batch, -1, -1)`). Convolutions "
            "and pools take uneven pads (`padding: [top, bottom, left, right]`), SAME_UPPER "
            "(`padding: same`) and SAME_LOWER (written out), `ceil_mode` and "
            "`count_include_pad`; 1-D pools are 2-D pools of a [N, C, 1, L] view. HardSwish, "
            "HardSigmoid, Selu, exact Gelu and Erf become dlgraph's ops of those names; PRelu, "
            "Clip, Celu, ThresholdedRelu, Softsign, Mish, Sum, Mean, Split, Tile, "
            "InstanceNormalization (a layer_norm without affine, then the scale), LRN (shifted "
            "slices of the squares summed) and Pad by reflect, edge or wrap (slices "
            "concatenated; a negative pad crops) a few primitives each. A bool graph "
            "input (a padding mask) becomes an int32 input, fed as 0/1, cast to bool.", "",
            "Before anything is read into an array, every size the file declares "
            "(initializers, Constant nodes, graph inputs and outputs, values shape inference "
            "derives, in subgraphs too) is held against this machine's memory, stored bytes "
            "against declared dims, and float64 values against float32's range; a refusal "
            "names the .onnx file and the tensor. Values that fit are read as float32.", ""] \
        + _patterns()


def _patterns() -> list[str]:
    """The patterns import folds back into layers, and what stays primitive."""
    return ["Patterns folded back into one layer, where they are unambiguous:", "",
            "- `layer_norm`: ReduceMean, Sub, Pow (or Mul), ReduceMean, Add eps, Sqrt, Div "
            "[, Mul weight, Add bias] over trailing axes, each step read only by the next "
            "(PyTorch below opset 17; dlgraph's own nested norms).",
            "- `softmax`: Exp(x - ReduceMax x) / ReduceSum over one axis.",
            "- `gelu` with `approximate: none`: Div by sqrt(2), Erf, Add 1, Mul x, Mul 0.5 "
            "(PyTorch's exact GELU below opset 20).",
            "- `multi_head_attention`: self-attention written out (one projection to 3E "
            "features split into q, k, v; heads split by Reshape/Transpose; "
            "Softmax(q k^T s) v; heads merged; a projection to E), when nothing else reads "
            "the nodes in between and the candidate layer reproduces them on a random input "
            "in float64 (heads, batch- or time-first input and output are found that way). "
            "An additive constant mask before the Softmax (PyTorch's src_mask, a causal "
            "mask) becomes the layer's mask input. PyTorch's TransformerEncoderLayer (opset "
            "14 or 17, batch_first or not) imports as 7 nodes.",
            "- `scan` over a module: ONNX Scan with one scan input, running forwards, "
            "whose scan outputs read downstream copy one state and whose body reads only "
            "constants of the outer graph; the body becomes a module under `modules:`.",
            "- `attention`: ONNX Attention (opset 23) without a cache, grouped heads, "
            "softcap or sliding window (3-D inputs are split into heads around it).", "",
            "What stays primitive: attention with a Where mask, a mask computed at run "
            "time or two sources (cross-attention), a scale other than 1/sqrt(d), attention "
            "whose weights are read elsewhere, norms over leading axes or whose "
            "intermediates are read elsewhere. "
            "Reshapes that fold a named dim into another (PyTorch's batch * heads) are "
            "followed as regrouped views of a tensor and never written; an operator that "
            "needs such a value itself is refused, naming the merged dims."]


def _details(results: list[Result]) -> list[str]:
    lines = ["", "## Models", "", "| folder | model | status | detail |", "|---|---|---|---|"]
    lines += [f"| {r.group} | {r.name} | {r.status} | {_cell(r.detail)} |"
              for r in results if r.group != "node"]
    lines += ["", "## Failed node cases", ""]
    lines += [f"- `{r.name}` ({r.operator}): {_cell(r.detail)}" for r in results
              if r.group == "node" and r.status == "failed"] or ["none"]
    lines += ["", "## Unsupported node cases", ""]
    lines += [f"- `{r.name}` ({r.operator}): {_cell(r.detail)}" for r in results
              if r.group == "node" and r.status == "unsupported"] or ["none"]
    return lines


def _cell(text: str, n: int = 160) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[:n - 1] + "…"


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Run ONNX's backend test data through dlgraph.")
    p.add_argument("-o", "--out", default="docs/onnx.md", help="report to write")
    p.add_argument("-k", "--filter", help="only cases whose name matches this regex")
    p.add_argument("--groups", default="node," + ",".join(DATA_GROUPS))
    p.add_argument("--limit", type=int, default=120, help="seconds per case")
    a = p.parse_args(argv)
    results = run_all(tuple(a.groups.split(",")), a.filter, a.limit,
                      progress=lambda r: print(f"{r.status:12} {r.group:18} {r.name} "
                                               f"{r.detail[:100]}", flush=True))
    Path(a.out).write_text(report(results, "make onnx-conformance"))
    print(f"wrote {a.out}: " + ", ".join(f"{s} {sum(r.status == s for r in results)}" for s in
                                         ("passed", "failed", "unsupported")))
    return 0


# -- ONNX's Backend interface ----------------------------------------------------------------
def backend():
    """dlgraph as an ``onnx.backend.base.Backend`` class, for ONNX's ``BackendTest``.

    >>> rep = backend().prepare(onnx.load("model.onnx"))                 # doctest: +SKIP
    >>> outputs = rep.run([x])                                           # doctest: +SKIP
    """
    from onnx.backend.base import Backend, BackendRep

    class DlgraphRep(BackendRep):
        def __init__(self, model):
            self.model, self.imp = compile_proto(model)

        def run(self, inputs, **kwargs):
            arrays = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
            return tuple(run_model(self.model, self.imp, arrays))

    class DlgraphBackend(Backend):
        @classmethod
        def prepare(cls, model, device="CPU", **kwargs):
            super().prepare(model, device, **kwargs)
            return DlgraphRep(model)

        @classmethod
        def run_model(cls, model, inputs, device="CPU", **kwargs):
            return cls.prepare(model, device).run(inputs)

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device.upper() == "CPU"

    return DlgraphBackend


if __name__ == "__main__":
    raise SystemExit(main())
