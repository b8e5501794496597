"""Losses: composites that reduce to a scalar mean over the batch."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.types import fmt
from dlgraph.ops import reference as R
from dlgraph.ops.examples import E, F, Int
from dlgraph.ops.registry import attrs, register

FAMILY = "loss"


def _same_shape(b, p, t):
    if b.shape(p) != b.shape(t):
        raise ShapeError(f"prediction {fmt(b.shape(p))} and target {fmt(b.shape(t))} differ",
                         help="make the target the prediction's shape")


def _mse(b, a, p, t):
    _same_shape(b, p, t)
    d = b.emit("sub", p, t)
    return b.emit("mean", b.emit("mul", d, d))


def _l1(b, a, p, t):
    _same_shape(b, p, t)
    return b.emit("mean", b.emit("abs", b.emit("sub", p, t)))


def _huber(b, a, p, t):
    _same_shape(b, p, t)
    d = b.emit("abs", b.emit("sub", p, t))
    quad = b.emit("mul", b.const(0.5), b.emit("mul", d, d))
    lin = b.emit("mul", b.const(a.delta), b.emit("sub", d, b.const(0.5 * a.delta)))
    return b.emit("mean", b.emit("where", b.emit("less_equal", d, b.const(a.delta)), quad, lin))


def _labels(b, logits, labels):
    lt, yt = b.type(logits), b.type(labels)
    if yt.dtype != "int32":
        raise ShapeError(f"labels must be int32 class ids, got {yt.dtype}",
                         help="declare the labels input with `dtype: int32`")
    if lt.shape[:-1] != yt.shape:
        raise ShapeError(f"logits {fmt(lt.shape)} and labels {fmt(yt.shape)} do not fit",
                         help="labels have the logits' shape without the class axis")
    c = lt.shape[-1]
    if isinstance(c, str):
        raise ShapeError(f"the class axis of {fmt(lt.shape)} must be a size")
    return c


def _nll_of(b, logp, labels, c, smoothing=0.0, ignore=None):
    target = b.emit("one_hot", labels, depth=c)
    if smoothing:
        target = b.emit("add", b.emit("mul", target, b.const(1 - smoothing)),
                        b.const(smoothing / c))
    per = b.emit("sum", b.emit("mul", target, logp), axes=-1)
    if ignore is None:
        return b.emit("neg", b.emit("mean", per))
    # PyTorch's ignore_index: those rows count for nothing, the mean is over the others
    keep = b.emit("cast", b.emit("equal", labels, b.const(ignore, "int32")), dtype="float32")
    keep = b.emit("sub", b.const(1.0), keep)
    kept = b.emit("maximum", b.emit("sum", keep), b.const(1.0))
    return b.emit("neg", b.emit("div", b.emit("sum", b.emit("mul", per, keep)), kept))


def _cross_entropy(b, a, logits, labels):
    c = _labels(b, logits, labels)
    return _nll_of(b, b.emit("log_softmax", logits, axis=-1), labels, c, a.label_smoothing,
                   a.ignore_index)


def _nll(b, a, logp, labels):
    return _nll_of(b, logp, labels, _labels(b, logp, labels), ignore=a.ignore_index)


def _bce(b, a, x, t):
    _same_shape(b, x, t)
    # max(x, 0) - x t + log(1 + e^-|x|): stable for large |x|
    loss = b.emit("sub", b.emit("softplus", x), b.emit("mul", x, t))
    return b.emit("mean", loss)


def _picked(logp, labels):
    return np.take_along_axis(logp, labels[..., None].astype(np.int64), -1)[..., 0]


def _cross_entropy_ref(a, xs, c):
    logp = R.log_softmax(xs[0], -1)
    k, s = xs[0].shape[-1], a.label_smoothing
    return -np.mean((1 - s) * _picked(logp, xs[1]) + s / k * logp.sum(-1))


def _huber_ref(a, xs, c):
    d = np.abs(xs[0] - xs[1])
    return np.mean(np.where(d <= a.delta, 0.5 * d * d, a.delta * (d - 0.5 * a.delta)))


PAIR = [F((3, 4)), F((3, 4))]
LOGITS = [F((4, 5)), Int((4,), 5)]
_ignore = (int | None, Field(None, description="a label that counts for nothing (PyTorch's "
                                             "ignore_index, e.g. -100 for padding); every "
                                             "other label must be a class id"))
register("mse", doc="mean squared error", family=FAMILY, inputs="pred, target", expand=_mse,
         reference=lambda a, xs, c: np.mean((xs[0] - xs[1]) ** 2),
         examples=[E(PAIR)], grad_examples=[E(PAIR)])
register("l1", doc="mean absolute error", family=FAMILY, inputs="pred, target", expand=_l1,
         reference=lambda a, xs, c: np.mean(np.abs(xs[0] - xs[1])),
         examples=[E(PAIR)], grad_examples=[E(PAIR)])
register("huber", doc="Huber loss: quadratic below delta, linear above", family=FAMILY,
         inputs="pred, target",
         attrs_model=attrs("huber", delta=(float, Field(1.0, gt=0, description="the knee"))),
         expand=_huber, reference=_huber_ref,
         examples=[E(PAIR), E(PAIR, {"delta": 0.5}, id="huber_delta")],
         grad_examples=[E(PAIR, {"delta": 0.5})])
register("cross_entropy", doc="softmax cross-entropy of logits and int class labels",
         family=FAMILY, inputs="logits, labels",
         attrs_model=attrs("cross_entropy", label_smoothing=(float, Field(
             0.0, ge=0, lt=1, description="mix the one-hot target with uniform")),
             ignore_index=_ignore),
         expand=_cross_entropy, reference=_cross_entropy_ref,
         examples=[E(LOGITS),
                   E(LOGITS, {"label_smoothing": 0.1}, id="cross_entropy_smoothing"),
                   E([F((2, 3, 5)), Int((2, 3), 5)], id="cross_entropy_rank3"),
                   E([F((2, 3), values=[[1000.0, 0.0, -1000.0], [0.0, 500.0, 0.0]]),
                      Int((2,), values=[0, 2])], id="cross_entropy_large")],
         grad_examples=[E(LOGITS, {"label_smoothing": 0.1}, float64=True)])
register("nll", doc="negative log-likelihood of log-probabilities and int labels",
         family=FAMILY, inputs="logprobs, labels",
         attrs_model=attrs("nll", ignore_index=_ignore), expand=_nll,
         reference=lambda a, xs, c: -np.mean(_picked(xs[0], xs[1])),
         examples=[E(LOGITS)], grad_examples=[E(LOGITS)])
register("binary_cross_entropy", doc="sigmoid cross-entropy of logits and 0/1 targets",
         family=FAMILY, inputs="logits, target", expand=_bce,
         reference=lambda a, xs, c: np.mean(R.softplus(xs[0]) - xs[0] * xs[1]),
         examples=[E([F((3, 4)), F((3, 4), "unit")]),
                   E([F((4,), values=[-100.0, -30.0, 30.0, 100.0]),
                      F((4,), values=[1.0, 0.0, 1.0, 0.0])], id="bce_large")],
         grad_examples=[E([F((3, 4)), F((3, 4), "unit")])])
