"""rnn, lstm and gru as ONNX's RNN, LSTM and GRU operators, one per layer.

dlgraph (like PyTorch) runs batch-first with gates stacked i, f, g, o (LSTM) and r, z, n
(GRU); ONNX stacks i, o, f, c and z, r, h, wants ``linear_before_reset=1`` for PyTorch's
GRU and keeps weights as [directions, gates * hidden, inputs]. onnxruntime's CPU kernels
refuse ``layout=1`` (batch-first), so sequences are transposed to time-major around them.
"""

from __future__ import annotations

import numpy as np

from dlgraph.engine.io.onnx.layers import Layer

ONNX_OP = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
TO_ONNX = {"rnn": [0], "lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}
"""For each ONNX gate block, the PyTorch block it comes from."""


def reorder(kind: str, m: np.ndarray, to_onnx: bool = True) -> np.ndarray:
    """Permute the gate blocks (axis 0) of a PyTorch weight or bias into ONNX's order,
    or back with ``to_onnx=False``."""
    blocks = np.split(m, GATES[kind], axis=0)
    order = TO_ONNX[kind] if to_onnx else list(np.argsort(TO_ONNX[kind]))
    return np.concatenate([blocks[k] for k in order], axis=0)


def _weights(lay: Layer, kind: str, layer: int, dirs: int):
    w_, r_, b_ = [], [], []
    for d in range(dirs):
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        w_.append(reorder(kind, lay.p(f"weight_ih{sfx}")))
        r_.append(reorder(kind, lay.p(f"weight_hh{sfx}")))
        b_.append(np.concatenate([reorder(kind, lay.p(f"bias_ih{sfx}")),
                                  reorder(kind, lay.p(f"bias_hh{sfx}"))]))
    return (lay.init(f"onnx_W_l{layer}", np.stack(w_)), lay.init(f"onnx_R_l{layer}", np.stack(r_)),
            lay.init(f"onnx_B_l{layer}", np.stack(b_)))


def _initial(lay: Layer, k: int, layer: int, dirs: int) -> str:
    """Rows of the k-th initial state (h0 or c0) that belong to one layer, or '' if none."""
    if len(lay.ins) <= 1 + k:
        return ""
    w = lay.w
    return w.op("Slice", lay.ins[1 + k], w.const([layer * dirs]), w.const([(layer + 1) * dirs]),
                w.const([0]))


def _batch_major(w, y: str) -> str:
    """ONNX's Y [T, dirs, B, H] as dlgraph's [B, T, dirs * H]."""
    return w.op("Reshape", w.op("Transpose", y, perm=[2, 0, 1, 3]), w.const([0, 0, -1]))


def _last(w, y_h: str) -> str:
    """ONNX's Y_h [dirs, B, H] as dlgraph's [B, dirs * H]."""
    return w.op("Reshape", w.op("Transpose", y_h, perm=[1, 0, 2]), w.const([0, -1]))


def _lengths(w, mask: str) -> str:
    """ONNX's sequence_lens [B] int32 from a `mask:` of 1s then 0s per sequence."""
    return w.op("Cast", w.op("ReduceSum", mask, w.const([1]), keepdims=0), to=6)


def recurrent(kind: str):
    def rule(lay: Layer):
        a, w = lay.attrs, lay.w
        dirs = 2 if a.bidirectional else 1
        extra = {"linear_before_reset": 1} if kind == "gru" else {}
        seq = w.op("Transpose", lay.ins[0], perm=[1, 0, 2],
                   out=f"{lay.sid}/time_major")                       # [T, B, F]
        n_out = 3 if kind == "lstm" else 2
        lengths = _lengths(w, lay.refs["mask"]) if "mask" in lay.refs else ""
        for layer in range(a.layers):
            W, R, B = _weights(lay, kind, layer, dirs)
            states = [_initial(lay, 0, layer, dirs)]
            if kind == "lstm":
                states.append(_initial(lay, 1, layer, dirs))
            ins = [seq, W, R, B, lengths, *states]
            while ins[-1] == "":
                ins.pop()
            outs = w.op(ONNX_OP[kind], *ins, outputs=n_out, hidden_size=a.hidden,
                        direction="bidirectional" if dirs == 2 else "forward",
                        out=f"{lay.sid}/{ONNX_OP[kind]}_l{layer}", **extra)
            y = outs[0]
            if layer < a.layers - 1:                                 # [T, B, dirs * H]
                seq = w.op("Reshape", w.op("Transpose", y, perm=[0, 2, 1, 3]),
                           w.const([0, 0, -1]))
        res = {"out": _batch_major(w, y), "h": _last(w, outs[1])}
        if kind == "lstm":
            res["c"] = _last(w, outs[2])
        return res
    return rule
