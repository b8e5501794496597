"""The one registry of ops: every rule of an op side by side in one record.

A *primitive* op has ``infer`` (types in, type out), ``forward`` (tinygrad in, tinygrad
out) and ``vjp`` (emits the backward nodes). A *composite* op has ``expand`` instead: it
emits primitives (and parameters) through the builder and needs no other rule, since its
shape, forward and gradient follow from what it expands to.

Every op of a spec also carries its tests: a numpy float64 ``reference`` of what it means,
and ``examples`` (forward) and ``grad_examples`` (gradient) in the plain data of
:mod:`dlgraph.ops.examples`, which the registry-wide tests turn into one-op specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, create_model

from dlgraph.engine.spec.base import NodeSpec
from dlgraph.ops.examples import INPUTS, Example

NO_GRAD = "no-grad"
"""``vjp=NO_GRAD``: the op's output carries no gradient (comparisons, argmax, one-hot)."""
PICK = "pick"
"""``vjp=PICK``: the cotangent goes to one output of a multi-output node (see ``loop``)."""


@dataclass(frozen=True)
class OpDef:
    name: str
    attrs: type[NodeSpec]
    doc: str
    family: str
    inputs: tuple[str, ...]          # input names; a last name ending in '*': zero or more
    infer: Callable | None = None    # (attrs, *TType) -> TType
    forward: Callable | None = None  # (ctx, attrs, *Tensor) -> Tensor
    vjp: Callable | str | None = None  # (builder, node, cotangent id) -> [id | None per input]
    expand: Callable | None = None   # (builder, attrs, *ids) -> id | {name: id}
    outputs: tuple[str, ...] = ("out",)  # named outputs of a composite; the first is default
    internal: bool = False           # made by the engine (loop, pick), not written in specs
    multi: bool = False              # several outputs, read through `pick`; vjp gets a list
    reference: Callable | None = None  # (attrs, xs, ctx) -> numpy float64 array (None: random)
    examples: tuple[Example, ...] = ()       # forward tests, held against `reference`
    grad_examples: tuple[Example, ...] = ()  # gradient tests (differentiable ops)
    runtime: tuple[str, ...] = ()    # float attrs read from a buffer (ctx.value): new values
                                     # reuse compiled programs; zero vs not still shapes them

    @property
    def composite(self) -> bool:
        return self.expand is not None

    @property
    def differentiable(self) -> bool:
        return self.composite or self.vjp != NO_GRAD

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].endswith("*")

    def arity_ok(self, n: int) -> bool:
        return n >= len(self.inputs) - 1 if self.variadic else n == len(self.inputs)

    def signature(self) -> str:
        return ", ".join(self.inputs)

    def fields(self) -> dict[str, Any]:
        """The op's own fields (not op/in/doc), as pydantic FieldInfo."""
        return {k: f for k, f in self.attrs.model_fields.items() if k not in ("op", "in_", "doc")}


REGISTRY: dict[str, OpDef] = {}
"""The ops a spec may name."""

ALIASES: dict[str, tuple[str, str]] = {
    # Keras and PyTorch layer names -> (dlgraph's op, where the name comes from); looked up
    # without case or underscores, so `Dense`, `dense` and `DENSE` all point at linear
    "dense": ("linear", "Keras' Dense"), "fullyconnected": ("linear", "a fully connected layer"),
    "conv2d": ("conv2d", "Conv2D"), "conv1d": ("conv1d", "Conv1D"),
    "conv2dtranspose": ("conv_transpose2d", "Keras' Conv2DTranspose"),
    "convtranspose2d": ("conv_transpose2d", "PyTorch's ConvTranspose2d"),
    "lstm": ("lstm", "LSTM"), "gru": ("gru", "GRU"), "simplernn": ("rnn", "Keras' SimpleRNN"),
    "rnn": ("rnn", "RNN"), "embedding": ("embedding", "Embedding"),
    "batchnormalization": ("batch_norm", "Keras' BatchNormalization"),
    "batchnorm1d": ("batch_norm", "PyTorch's BatchNorm1d"),
    "batchnorm2d": ("batch_norm", "PyTorch's BatchNorm2d"),
    "layernormalization": ("layer_norm", "Keras' LayerNormalization"),
    "layernorm": ("layer_norm", "PyTorch's LayerNorm"),
    "maxpooling2d": ("max_pool2d", "Keras' MaxPooling2D"),
    "maxpool2d": ("max_pool2d", "PyTorch's MaxPool2d"),
    "averagepooling2d": ("avg_pool2d", "Keras' AveragePooling2D"),
    "avgpool2d": ("avg_pool2d", "PyTorch's AvgPool2d"),
    "globalaveragepooling2d": ("global_avg_pool", "Keras' GlobalAveragePooling2D"),
    "adaptiveavgpool2d": ("global_avg_pool", "PyTorch's AdaptiveAvgPool2d(1)"),
    "multiheadattention": ("multi_head_attention", "MultiHeadAttention"),
    "transformerencoderlayer": ("transformer_encoder_block",
                                "PyTorch's TransformerEncoderLayer"),
    "transformerdecoderlayer": ("transformer_decoder_block",
                                "PyTorch's TransformerDecoderLayer"),
    "concatenate": ("concat", "Keras' Concatenate"), "cat": ("concat", "torch.cat"),
    "multiply": ("mul", "Keras' Multiply"), "subtract": ("sub", "Keras' Subtract"),
    "permute": ("transpose", "Permute"), "matmul": ("matmul", "MatMul"),
    "leakyrelu": ("leaky_relu", "LeakyReLU"), "logsoftmax": ("log_softmax", "LogSoftmax"),
    "swish": ("silu", "Keras' swish"), "hardswish": ("hard_swish", "Hardswish"),
    "hardsigmoid": ("hard_sigmoid", "Hardsigmoid"), "gaussianerrorlinearunit": ("gelu", "GELU"),
    "mseloss": ("mse", "PyTorch's MSELoss"), "meansquarederror": ("mse", "Keras' "
                                                                  "MeanSquaredError"),
    "l1loss": ("l1", "PyTorch's L1Loss"), "huberloss": ("huber", "PyTorch's HuberLoss"),
    "crossentropyloss": ("cross_entropy", "PyTorch's CrossEntropyLoss"),
    "categoricalcrossentropy": ("cross_entropy", "Keras' CategoricalCrossentropy"),
    "sparsecategoricalcrossentropy": ("cross_entropy",
                                      "Keras' SparseCategoricalCrossentropy"),
    "nllloss": ("nll", "PyTorch's NLLLoss"),
    "bceloss": ("binary_cross_entropy", "PyTorch's BCELoss"),
    "binarycrossentropy": ("binary_cross_entropy", "Keras' BinaryCrossentropy"),
}
"""Names people bring from Keras and PyTorch, for the help of an unknown op (checked
against the registry by tests/test_ops.py)."""


def op_suggestion(name: str, others=()) -> str | None:
    """The help line for an unknown op: dlgraph's name for a Keras or PyTorch layer, else the
    closest name among the ops and ``others`` (a spec's modules).

    >>> op_suggestion("Dense")
    "Keras' Dense is dlgraph's 'linear' (`dlgraph ops linear` describes it)"
    """
    from dlgraph.engine.errors import suggest
    hit = ALIASES.get(name.lower().replace("_", ""))
    if hit is not None:
        op, origin = hit
        return f"{origin} is dlgraph's '{op}' (`dlgraph ops {op}` describes it)"
    return suggest(name, list(REGISTRY) + sorted(others))
OPS: dict[str, OpDef] = {}
"""Every op a graph may hold: REGISTRY plus the engine's internal ones (loop, pick)."""
EXAMPLE_IDS: dict[str, set[str]] = {"examples": set(), "grad_examples": set()}
"""The test ids of every registered example, by kind (an id names one test)."""


def attrs(name: str, base: type[NodeSpec] = NodeSpec, doc: str = "", **fields) -> type[NodeSpec]:
    """The spec model of an op: ``op: Literal[name]`` plus its fields.

    ``fields`` maps a name to ``(type, default)`` or ``(type, Field(...))``.
    """
    model = create_model(
        "".join(p.capitalize() for p in name.split("_")) + "Node",
        __base__=base, __doc__=doc or None,
        op=(Literal[name], Field(description=f"`{name}`")),  # type: ignore[valid-type]
        **fields)
    return model


def register(name: str, *, doc: str, family: str, inputs: tuple[str, ...] | str,
             attrs_model: type[NodeSpec] | None = None, **rules) -> OpDef:
    """Register an op, checking that its record is complete and its examples fit it.

    ``reference`` is ``(attrs, xs, ctx) -> array``: the op's output in numpy float64 from
    its validated attributes, its input arrays (float64, int or bool) and ``ctx`` with ``p``
    (the layer's parameters by local name), ``params`` (all), ``training`` and ``dims``.

    >>> sorted(REGISTRY)[:2]  # doctest: +SKIP
    ['abs', 'add']
    """
    if isinstance(inputs, str):
        inputs = tuple(s.strip() for s in inputs.split(",") if s.strip())
    for kind in EXAMPLE_IDS:
        rules[kind] = tuple(rules.get(kind, ()))
    model = attrs_model or attrs(name, doc=doc)
    d = OpDef(name=name, attrs=model, doc=doc, family=family, inputs=inputs, **rules)
    if name in OPS:
        raise RuntimeError(f"op '{name}' registered twice")
    if model.model_fields["op"].annotation != Literal[name]:
        raise RuntimeError(f"op '{name}': its model's `op` is not Literal['{name}']")
    if d.composite:
        if d.infer or d.forward or d.vjp:
            raise RuntimeError(f"composite op '{name}' must not have infer/forward/vjp")
    elif not (d.infer and d.forward and d.vjp):
        missing = [r for r in ("infer", "forward", "vjp") if not getattr(d, r)]
        raise RuntimeError(f"primitive op '{name}' lacks {', '.join(missing)}")
    ids = {kind: _check_examples(d, kind) for kind in EXAMPLE_IDS}
    for kind, new in ids.items():
        EXAMPLE_IDS[kind].update(new)
    if not d.internal:
        REGISTRY[name] = d
    OPS[name] = d
    return d


def _check_examples(d: OpDef, kind: str) -> set[str]:
    """The ids of an op's examples of one kind, checked: inputs that fit its signature,
    attributes its model accepts, ids not taken; a reference to hold them against."""
    examples = getattr(d, kind)
    if examples and d.reference is None:
        raise RuntimeError(f"op '{d.name}' has {kind} but no reference")
    if kind == "grad_examples" and examples and not d.differentiable:
        raise RuntimeError(f"op '{d.name}' has no gradient, but grad_examples")
    if d.reference is not None and not callable(d.reference):
        raise RuntimeError(f"op '{d.name}': its reference is not callable")
    ids: set[str] = set()
    for ex in examples:
        eid = getattr(ex, "id", "") or d.name
        if not isinstance(ex, Example) or not all(isinstance(i, INPUTS) for i in ex.ins):
            raise RuntimeError(f"op '{d.name}': example '{eid}' is not an Example of "
                               "Float/Int/Bool inputs (dlgraph.ops.examples)")
        if not d.arity_ok(len(ex.ins)):
            raise RuntimeError(f"op '{d.name}': example '{eid}' has {len(ex.ins)} inputs "
                               f"for ({d.signature()})")
        if eid in ids or eid in EXAMPLE_IDS[kind]:
            raise RuntimeError(f"op '{d.name}': two {kind} are called '{eid}'")
        try:
            d.attrs.model_validate({"op": d.name, **ex.attrs})
        except ValueError as e:
            raise RuntimeError(f"op '{d.name}': example '{eid}' has bad attributes: {e}") \
                from None
        ids.add(eid)
    return ids
