"""Proposed changes to dlgraph's lowering, applied inside one process by monkeypatching.

Each function here changes dlgraph the way a proposal in bench/NOTES.md would change
engine/ or ops/, without touching their files, so that the proposal can be measured first:
``bench/analyze.py WORKLOAD dlgraph --experiment NAME`` for one process, or
``bench/run.py --proposals``, which adds a fourth implementation, ``dlgraph+`` (dlgraph with
:data:`PROPOSALS` applied), to the alternating timing rounds. Apply before the spec is
loaded.
"""

from __future__ import annotations

EXPERIMENTS = {}


def experiment(fn):
    EXPERIMENTS[fn.__name__.replace("_", "-")] = fn
    return fn


@experiment
def jit_infer():
    """dlgraph.compile's Model runs its forward in a TinyJit (per input shape)."""
    from tinygrad import Tensor, TinyJit

    from dlgraph.engine.compile import lower

    orig_init = lower.Model.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self._jits = {}

    def call(self, **arrays):
        g = self.graph
        dims = lower.bind(g, arrays)
        key = tuple(sorted((k, v.shape) for k, v in arrays.items()))
        names = [n for n in self._eval.order if g[n].role == "input"]
        if key not in self._jits:
            def run(*xs, dims=dims, names=names):
                outs = self._eval(lower.Ctx(training=False, dims=dims),
                                  dict(zip(names, xs, strict=True)), self.params)
                return [o.contiguous() for o in outs]
            self._jits[key] = TinyJit(run)
        feeds = [lower.to_tensor(arrays[n], g.inputs[n].dtype) for n in names]
        outs = self._jits[key](*feeds)
        return {name: t.numpy() for name, t in zip(self.outputs, outs, strict=True)}

    lower.Model.__init__, lower.Model.__call__ = init, call
    del Tensor


def _patch_load(fix):
    import dlgraph
    orig = dlgraph.load

    def load(*a, **k):
        g = orig(*a, **k)
        fix(g)
        return g
    dlgraph.load = load


@experiment
def cut_step_inputs():
    """Recurrent scans also cut each step's slice of the hoisted input projection (the
    `take` of x @ W_ih + b_ih at step t), so every step's cell kernel reads a buffer at
    offset 0 and all steps share one compiled kernel instead of one per step."""
    import re

    def fix(g):
        for nid, n in g.nodes.items():
            if re.search(r"/l\d+r?t\d+/take/squeeze$", nid):
                n.cut = True
    _patch_load(fix)


@experiment
def cut_step_matmul():
    """Recurrent scans cut each step's recurrent projection h @ W_hh^T + b_hh, so the
    matmul kernel of every step reads only h (a cut buffer) and W_hh: the same kernel for
    all steps, compiled once; the step's slice of the input projection is then read by
    elementwise gate kernels, which are cheap to compile."""
    import re

    def fix(g):
        for nid, n in g.nodes.items():
            if re.search(r"/l\d+r?t\d+/add$", nid) and n.op == "add":
                n.cut = True
    _patch_load(fix)


@experiment
def matmul_vjp_flat():
    """The VJP of x [..., n, k] @ w [k, m] (a batched input times an unbatched weight, as in
    every linear layer over a sequence) computes the weight's gradient as one reduction
    sum(x[..., n, k, 1] * g[..., n, 1, m]) over all leading axes at once, instead of a
    batched matmul whose batch axis reduce_to then sums away in a second reduction:
    tinygrad merges the adjacent reduce axes into one contiguous loop. (A reshape to
    [-1, k] would do the same but dlgraph refuses to merge the named batch dim.)"""
    import dataclasses

    from dlgraph.ops import REGISTRY
    from dlgraph.ops.linalg import swap_last

    old = REGISTRY["matmul"]

    def vjp(b, n, g):
        x, w = n.inputs
        tx, tw = b.type(x), b.type(w)
        if tw.rank != 2 or tx.rank <= 2:
            return old.vjp(b, n, g)
        lead = list(range(tx.rank - 1))            # batch axes and rows: one reduction
        dw = b.emit("sum", b.emit("mul", b.emit("unsqueeze", x, axis=-1),
                                  b.emit("unsqueeze", g, axis=-2)), axes=lead)
        return [b.emit("matmul", g, swap_last(b, w)), dw]

    REGISTRY["matmul"] = dataclasses.replace(old, vjp=vjp)


@experiment
def cut_input_proj():
    """Recurrent scans cut the hoisted input projection x @ W_ih^T + b_ih; the reverse
    pass then realises its cotangent (the sum of the per-step slices' zero-padded
    cotangents) on its own, instead of fusing that sum into the weight-gradient reduction."""
    import re

    def fix(g):
        for nid, n in g.nodes.items():
            if re.search(r"/input_proj_l\d+(_reverse)?$", nid):
                n.cut = True
    _patch_load(fix)


@experiment
def conv_as_mul_sum():
    """conv2d (groups=1) expands the way tinygrad's Tensor.conv2d computes: sliding windows
    [N, C, OH, OW, KH, KW] viewed as [N, 1, OH, OW, C, KH, KW], times the weight viewed as
    [1, O, 1, 1, C, KH, KW], summed over the last three axes -> [N, O, OH, OW]; no
    im2col matmul and no transposes of the output, so the backward reductions run over
    contiguous N, OH, OW."""
    import dataclasses

    from dlgraph.ops import REGISTRY
    from dlgraph.ops.nn import _activate, _features, _pad2d
    from dlgraph.ops.shape import _pair

    old = REGISTRY["conv2d"]

    def expand(b, a, x):
        if a.groups != 1:
            return old.expand(b, a, x)
        c = _features(b, x, 1, "channel")
        kh, kw = _pair(a.kernel)
        w = b.param("weight", (a.out, c, kh, kw), "he_uniform")
        win = b.emit("windows", _pad2d(b, x, a.padding), kernel=[kh, kw], stride=a.stride,
                     dilation=a.dilation)                               # [N, C, OH, OW, KH, KW]
        n, _, oh, ow, _, _ = b.shape(win)
        win = b.emit("reshape", win, shape=[n, 1, c, oh, ow, kh, kw])
        win = b.emit("transpose", win, axes=[0, 1, 3, 4, 2, 5, 6])      # [N, 1, OH, OW, C, ..]
        wr = b.emit("reshape", w, shape=[1, a.out, 1, 1, c, kh, kw])
        y = b.emit("sum", b.emit("mul", win, wr), axes=[4, 5, 6])       # [N, O, OH, OW]
        if a.bias:
            bias = b.param("bias", (a.out,), "zeros")
            y = b.emit("add", y, b.emit("reshape", bias, shape=[a.out, 1, 1]))
        return _activate(b, a, y)

    REGISTRY["conv2d"] = dataclasses.replace(old, expand=expand)


@experiment
def windows_grad_as_pool_adjoint():
    """The forward rule of `windows_grad` (the VJP of `windows`) computes the adjoint of
    tinygrad's own `_pool` (the movement ops behind `windows`) with tinygrad's gradient of
    <_pool(z), g> in z, instead of adding kh*kw shifted, zero-padded copies of g."""
    import dataclasses

    from tinygrad import Tensor

    from dlgraph.ops import REGISTRY
    from dlgraph.ops.shape import _pair

    def fwd(c, a, g, x):
        z = Tensor.zeros(*x.shape, dtype=g.dtype)
        y = z._pool(_pair(a.kernel), _pair(a.stride), _pair(a.dilation))
        return (y * g).sum().gradient(z)[0]

    REGISTRY["windows_grad"] = dataclasses.replace(REGISTRY["windows_grad"], forward=fwd)


@experiment
def cut_conv_out():
    """Cut each conv2d's output and pre-activation, so that in the backward pass their
    cotangents (the reverse pass copies `cut` to them) are realised once, not recomputed
    inside the weight-gradient reduction for every output weight."""
    def fix(g):
        for sid, nd in (g.spec.nodes.items() if g.spec else []):
            if nd.op in ("conv2d", "conv1d"):
                nid = g.aliases[sid]
                g.nodes[nid].cut = True
                for i in g.nodes[nid].inputs:
                    if g.nodes[i].role == "forward" and g.nodes[i].op not in ("param",):
                        g.nodes[i].cut = True
    _patch_load(fix)


@experiment
def capture_first():
    """PhaseStep realises the optimizer's state up front and lets TinyJit capture on the
    first call (jit.cnt = 1), so the step is scheduled once, not twice (TinyJit's default
    runs the first call un-captured and schedules everything again on the second)."""
    from tinygrad import Tensor
    from tinygrad.nn.state import get_state_dict

    from dlgraph.engine.train import loop as train
    orig = train.PhaseStep.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        Tensor.realize(*get_state_dict(self.opt).values())
        self.jit.cnt = 1
    train.PhaseStep.__init__ = init


@experiment
def no_cut():
    """Ignore every `cut` mark (kernel boundaries left to tinygrad)."""
    from dlgraph.engine.compile import lower
    orig = lower.Evaluator.__init__

    def init(self, graph, targets):
        orig(self, graph, targets)
        for n in graph.nodes.values():
            n.cut = False
    lower.Evaluator.__init__ = init


#: the proposals `bench/run.py --proposals` applies for ``dlgraph+``: none pending, the five
#: measured here ("cut-step-matmul", "capture-first", "cut-conv-out", "conv-as-mul-sum",
#: "matmul-vjp-flat") are now part of engine/ and ops/
PROPOSALS: tuple[str, ...] = ()


def apply(names) -> None:
    for n in names:
        EXPERIMENTS[n]()
