"""Fold imported self-attention back into one ``multi_head_attention`` node.

Exporters write attention as primitives: an input projection to 3E features, its q, k and
v parts split into heads by reshapes and transposes, ``softmax(q k^T * scale) v``, the heads
merged again and an output projection. After the import (:mod:`.import_views` follows the
reshapes) the spec holds these as primitives. This pass finds each ``softmax`` between two
``matmul``s whose operands come, through movement nodes and scalings only, from one
``linear`` of 3E features, and whose result reaches a ``linear`` of E features the same way.

A match is folded only where it is unambiguous: the nodes in between are read by nothing
else, and the candidate ``multi_head_attention`` (heads from the reshapes seen, batch-first
or time-first input and output) gives the same numbers as the primitives it replaces, on a
random input in float64. An additive constant mask before the softmax (PyTorch's
``attn_mask``, a causal mask say) becomes the layer's mask input; a ``where`` mask,
cross-attention and dropout stay primitive.
"""

from __future__ import annotations

import numpy as np

from dlgraph.engine.io.onnx.import_base import Importer

MOVES = {"transpose", "reshape", "take", "slice", "squeeze", "unsqueeze", "mul"}


def _ins(nd) -> list[str]:
    i = nd.get("in", [])
    return [i] if isinstance(i, str) else list(i)


def _readers(nodes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for nid, nd in nodes.items():
        for r in _ins(nd):
            out.setdefault(r.split(".")[0], []).append(nid)
    return out


def _scalar_mul(nodes, nd) -> str | None:
    """The tensor side of a multiplication by a scalar const, else None."""
    ins = _ins(nd)
    consts = [r for r in ins if nodes.get(r, {}).get("op") == "const"]
    return next((r for r in ins if r not in consts), None) if len(consts) == 1 else None


def _up(nodes, ref: str, seen: set[str]) -> str | None:
    """Follow `ref` up through movement nodes to the linear it comes from."""
    while ref in nodes and nodes[ref]["op"] in MOVES:
        seen.add(ref)
        nd = nodes[ref]
        if nd["op"] == "mul":
            ref = _scalar_mul(nodes, nd)
            seen.update(r for r in _ins(nd) if r != ref)
            if ref is None:
                return None
        else:
            ref = _ins(nd)[0]
    return ref if nodes.get(ref, {}).get("op") == "linear" else None


def _down(nodes, readers, ref: str, seen: set[str]) -> str | None:
    """Follow the only reader of `ref` down through movement nodes to a linear."""
    while True:
        rs = readers.get(ref, [])
        if len(rs) != 1:
            return None
        ref = rs[0]
        op = nodes[ref]["op"]
        if op == "linear":
            return ref
        if op not in ("transpose", "reshape", "squeeze", "unsqueeze"):
            return None
        seen.add(ref)


def _mask(nodes, ref: str) -> tuple[str, str | None, set[str]]:
    """The scores before an additive constant mask (PyTorch's attn_mask): (scores, mask)."""
    nd = nodes.get(ref, {})
    if nd.get("op") == "add":
        a, b = _ins(nd)
        for s, m in ((a, b), (b, a)):
            if nodes.get(m, {}).get("op") == "param" and nodes.get(s, {}).get("op") == "matmul":
                return s, m, {ref}
    return ref, None, set()


def _match(nodes, readers, sid: str):
    """(L, O, the nodes between them, an additive mask or None) around softmax `sid`."""
    m1, mask, extra = _mask(nodes, _ins(nodes[sid])[0])
    rs = readers.get(sid, [])
    if nodes[sid].get("axis", -1) != -1 or nodes.get(m1, {}).get("op") != "matmul" or \
            len(rs) != 1 or nodes[rs[0]]["op"] != "matmul" or _ins(nodes[rs[0]])[0] != sid:
        return None
    m2 = rs[0]
    seen = {sid, m1, m2} | extra
    tops = {_up(nodes, r, seen) for r in _ins(nodes[m1]) + _ins(nodes[m2])[1:]}
    if len(tops) != 1 or None in tops:
        return None
    lin = tops.pop()
    out = _down(nodes, readers, m2, seen)
    if out is None or nodes[lin].get("activation") or nodes[out].get("activation"):
        return None
    if nodes[lin]["out"] % 3 or nodes[out]["out"] != nodes[lin]["out"] // 3:
        return None
    inner = seen | {lin}
    if any(r not in inner and r != out for n in inner for r in readers.get(n, [])):
        return None
    return lin, out, seen, mask


# -- checking a candidate in float64 ----------------------------------------------------------
def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _eval(imp: Importer, nd, nid: str, xs: list, dims: dict):
    a, op = nd, nd["op"]
    if op == "linear":
        y = xs[0] @ imp.weights[f"{nid}.weight"].astype(np.float64).T
        return y + imp.weights[f"{nid}.bias"] if f"{nid}.bias" in imp.weights else y
    shape = [dims.get(d, d) for d in a.get("shape", [])]
    table = {
        "reshape": lambda: xs[0].reshape(shape),
        "transpose": lambda: np.transpose(xs[0], a.get("axes")),
        "take": lambda: np.take(xs[0], a["index"], axis=a["axis"]),
        "slice": lambda: np.take(xs[0], range(a["start"], a.get("stop") or
                                              xs[0].shape[a["axis"]]), axis=a["axis"]),
        "squeeze": lambda: np.squeeze(xs[0], a["axis"]),
        "unsqueeze": lambda: np.expand_dims(xs[0], a["axis"]),
        "mul": lambda: xs[0] * xs[1], "matmul": lambda: xs[0] @ xs[1],
        "add": lambda: xs[0] + xs[1],
        "softmax": lambda: _softmax(xs[0], a.get("axis", -1)),
        "const": lambda: np.float64(a["value"]),
    }
    return table[op]()


def _run(imp, order, x_ref, x, dims, mask=None):
    vals = {x_ref: x, **({mask: imp.weights[mask].astype(np.float64)} if mask else {})}
    for nid in order:
        nd = imp.nodes[nid]
        vals[nid] = _eval(imp, nd, nid, [vals[r] for r in _ins(nd)], dims)
    return vals


def _reference(w_in, b_in, w_out, b_out, x, heads, mask=0.0):
    """PyTorch's nn.MultiheadAttention (batch first, float mask added), in float64."""
    b, t, e = x.shape
    q, k, v = np.split(x @ w_in.T + b_in, 3, axis=-1)
    split = lambda z: z.reshape(b, t, heads, e // heads).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    o = _softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(e // heads) + mask) @ v
    return o.transpose(0, 2, 1, 3).reshape(b, t, e) @ w_out.T + b_out


def _params(imp, lin, out):
    w = lambda k: imp.weights.get(k)
    p = {"in_proj_weight": w(f"{lin}.weight"), "in_proj_bias": w(f"{lin}.bias"),
         "out_proj.weight": w(f"{out}.weight"), "out_proj.bias": w(f"{out}.bias")}
    if (p["in_proj_bias"] is None) != (p["out_proj.bias"] is None):
        return None
    return {k: v for k, v in p.items() if v is not None}


def _candidate(imp, graph, lin, out, seen, mask):
    """(heads, input time-first, output time-first, weights) that reproduce the
    primitives."""
    x_ref = imp.nodes[lin]["in"]
    shape = graph.inputs[x_ref].shape if x_ref in graph.inputs else \
        graph[graph.resolve(x_ref)].type.shape
    names = sorted({d for d in shape if isinstance(d, str)})
    dims = {d: k + 2 for k, d in enumerate(names)}
    p = _params(imp, lin, out)
    if p is None or len(shape) != 3:
        return None
    x = np.random.default_rng(0).standard_normal([dims.get(d, d) for d in shape])
    order = [n for n in imp.nodes if n in seen or n in (lin, out)]
    try:
        got = _run(imp, order, x_ref, x, dims, mask)[out]
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    e = imp.nodes[out]["out"]
    heads = {1} | {d for n in order if imp.nodes[n]["op"] == "reshape"
                   for d in imp.nodes[n]["shape"] if isinstance(d, int) and 0 < d <= e
                   and e % d == 0}
    zero = np.zeros(e)
    f64 = {k: v.astype(np.float64) for k, v in p.items()}
    for h in sorted(heads):
        for t_in in (False, True):
            xb = x.transpose(1, 0, 2) if t_in else x
            try:
                ref = _reference(f64["in_proj_weight"], f64.get("in_proj_bias", 0 * zero.repeat(
                    3)), f64["out_proj.weight"], f64.get("out_proj.bias", zero), xb, h,
                    imp.weights[mask].astype(np.float64) if mask else 0.0)
            except ValueError:                  # a mask that does not fit this layout
                continue
            for t_out in (False, True):
                want = ref.transpose(1, 0, 2) if t_out else ref
                if want.shape == got.shape and np.allclose(got, want, rtol=1e-5, atol=1e-8):
                    return h, t_in, t_out, p
    return None


def _replace(imp, lin, out, seen, mask, found, outputs: list[str]) -> None:
    heads, t_in, t_out, p = found
    x = imp.nodes[lin]["in"]
    origins = [o for n in imp.nodes if n in seen | {lin, out} for o in imp.origin.get(n, [])]
    new = {}
    nid = out if out in outputs and not t_out else lin
    if t_in:
        x = f"{nid}_batch_first"
        new[x] = ({"op": "transpose", "in": imp.nodes[lin]["in"], "axes": [1, 0, 2]}, [])
    fields = {"op": "multi_head_attention", "in": [x, x, mask] if mask else x, "heads": heads}
    if "in_proj_bias" not in p:
        fields["bias"] = False
    new[nid] = (fields, origins[:2] + (["..."] if len(origins) > 3 else []) + origins[-1:])
    last = nid
    if t_out:
        last = out if out in outputs else f"{nid}_time_first"
        new[last] = ({"op": "transpose", "in": nid, "axes": [1, 0, 2]}, [])
    gone = tuple(f"{n}." for n in seen | {lin, out})
    for k in [k for k in imp.weights if k.startswith(gone) or k in seen]:
        del imp.weights[k]
    imp.weights.update({f"{nid}.{k}": np.ascontiguousarray(v, np.float32) for k, v in p.items()})
    nodes = {}
    for k, nd in imp.nodes.items():
        if k == out:
            nodes.update({n: f for n, (f, _) in new.items()})
        elif k not in seen and k not in (lin, out):
            nodes[k] = nd
    swap = lambda r: last + r[len(out):] if r.split(".")[0] == out else r
    for k, nd in nodes.items():
        if "in" in nd and k not in new:
            nd["in"] = swap(nd["in"]) if isinstance(nd["in"], str) else [swap(r) for r in nd["in"]]
    imp.nodes = nodes
    imp.origin.update({n: o for n, (_, o) in new.items()})
    outputs[:] = [swap(r) for r in outputs]


def fold_attention(imp: Importer, graph, outputs: list[str]) -> int:
    """Fold every unambiguous self-attention of the imported spec; returns how many.
    ``graph``: the spec loaded as it stands (for the shapes); ``outputs``: the spec's
    outputs, updated where a folded node takes the place of one."""
    done = 0
    while True:
        readers = _readers(imp.nodes)
        for sid in [n for n, nd in imp.nodes.items() if nd["op"] == "softmax"]:
            m = _match(imp.nodes, readers, sid)
            found = None if m is None else _candidate(imp, graph, *m)
            if found is not None:
                _replace(imp, *m, found, outputs)
                done += 1
                break
        else:
            return done
