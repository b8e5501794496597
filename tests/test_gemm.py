"""Matrix products on the host's BLAS (engine/compile/gemm.py): a kernel is replaced only
when running it on random inputs shows it computes a product (with a bias, a relu, a
relu's mask or a residual sum after it) in one layout, and the replacement then computes
what the kernel computed; anything else keeps its kernel. Checked against numpy in float64
and against the same model with the replacement switched off (DLGRAPH_BLAS=0)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import dlgraph
from dlgraph.engine.compile import gemm

M, K, N = 16, 24, 20            # 7,680 multiply-adds: above gemm.MIN_MACS
RNG = np.random.default_rng(7)


def kernel(fn, sizes):
    """A stand-in for a compiled kernel: ``fn(out, *ins)`` on float32 arrays at the
    addresses it is run on (what the door's kernels do)."""
    def run(addrs):
        views = [gemm._view(a, s) for a, s in zip(addrs, sizes, strict=True)]
        fn(*views)
    return run


def layouts():
    """(name, sizes, fn) for every layout of a product and every epilogue a kernel may
    carry, written as tinygrad's kernels compute them (float32, row-major buffers)."""
    for a_t, b_t, out_t, swap in itertools.product((False, True), repeat=4):
        def product(a, b, a_t=a_t, b_t=b_t, out_t=out_t):
            x = a.reshape(K, M).T if a_t else a.reshape(M, K)
            y = b.reshape(N, K).T if b_t else b.reshape(K, N)
            p = x.astype(np.float64) @ y
            return p.T if out_t else p                     # as stored in memory

        shape = (N, M) if out_t else (M, N)
        name = f"a{'T' if a_t else ''}b{'T' if b_t else ''}{' outT' if out_t else ''}" \
               f"{' swapped' if swap else ''}"

        def order(a, b, swap=swap):
            return (b, a) if swap else (a, b)
        sizes = (M * N, *order(M * K, K * N))
        yield name, sizes, lambda o, *ins, p=product, order=order: \
            o.__setitem__(slice(None), p(*order(*ins)).ravel())
        yield name + " +bias relu", (*sizes, shape[1]), \
            lambda o, i0, i1, e, p=product, order=order: o.__setitem__(
                slice(None), np.maximum(p(*order(i0, i1)) + e[None, :], 0).ravel())
        yield name + " +row bias", (*sizes, shape[0]), \
            lambda o, i0, i1, e, p=product, order=order: o.__setitem__(
                slice(None), (p(*order(i0, i1)) + e[:, None]).ravel())
        yield name + " +bias +residual", (*sizes, shape[1], M * N), \
            lambda o, i0, i1, e, r, p=product, order=order, s=shape: o.__setitem__(
                slice(None), (p(*order(i0, i1)) + e[None, :] + r.reshape(s)).ravel())
        yield name + " relu mask", (*sizes, M * N), \
            lambda o, i0, i1, e, p=product, order=order, s=shape: o.__setitem__(
                slice(None), (p(*order(i0, i1)) * (e.reshape(s) > 0)).ravel())


@pytest.mark.parametrize("name, sizes, fn", list(layouts()), ids=[c[0] for c in layouts()])
def test_every_layout_and_epilogue_is_found_and_computes_what_the_kernel_does(name, sizes, fn):
    found = gemm.find_layout(sizes, kernel(fn, sizes))
    assert found is not None, name
    arrays = [np.zeros(sizes[0], np.float32)] + \
        [RNG.standard_normal(s).astype(np.float32) for s in sizes[1:]]
    want = np.zeros(sizes[0], np.float32)
    fn(want, *arrays[1:])
    gemm.matmul_call([a.ctypes.data for a in arrays], sizes, found, arrays)({})
    np.testing.assert_allclose(arrays[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, sizes, fn", list(layouts()), ids=[c[0] for c in layouts()])
def test_a_product_run_as_two_halves_of_its_rows_is_bit_for_bit_the_whole(
        name, sizes, fn, monkeypatch):
    """A large product may run half on the replay's helper thread (the faster way, timed):
    either way, every call gives the same bits, so a run does not depend on timing."""
    from dlgraph.engine.compile.chunks import Chunked
    found = gemm.find_layout(sizes, kernel(fn, sizes))
    arrays = [np.zeros(sizes[0], np.float32)] + \
        [RNG.standard_normal(s).astype(np.float32) for s in sizes[1:]]
    addrs = [a.ctypes.data for a in arrays]
    whole = gemm.matmul_call(addrs, sizes, found, arrays)
    assert not isinstance(whole, Chunked)            # too small to be split by default
    monkeypatch.setattr(gemm, "SPLIT_MACS", 0)
    split = gemm.matmul_call(addrs, sizes, found, arrays)
    assert isinstance(split, Chunked), name
    for _ in range(2 * Chunked.TRIALS + 2):          # both ways tried, then the chosen one
        arrays[0][:] = 0
        split({})
        got = arrays[0].copy()
        arrays[0][:] = 0
        whole({})
        assert got.tobytes() == arrays[0].tobytes(), name
    assert split.split is not None


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("what, sizes, fn", [
    ("a gelu after the product", (M * N, M * K, K * N),
     lambda o, a, b: o.__setitem__(slice(None), _gelu(a.reshape(M, K) @ b.reshape(K, N))
                                   .ravel())),
    ("a constant added", (M * N, M * K, K * N),
     lambda o, a, b: o.__setitem__(slice(None), (a.reshape(M, K) @ b.reshape(K, N) + 1)
                                   .ravel())),
    ("half its output written", (M * N, M * K, K * N),
     lambda o, a, b: o.__setitem__(slice(0, M * N // 2), (a.reshape(M, K) @ b.reshape(K, N))
                                   .ravel()[:M * N // 2])),
    ("a product with its last row masked", (M * N, M * K, K * N),
     lambda o, a, b: o.__setitem__(slice(None), ((a.reshape(M, K) @ b.reshape(K, N))
                                                 * (np.arange(M) < M - 1)[:, None]).ravel())),
    ("an elementwise product", (M * N, M * N, M * N),
     lambda o, a, b: o.__setitem__(slice(None), a * b)),
    ("a product of a slice", (M * N, 2 * M * K, K * N),
     lambda o, a, b: o.__setitem__(slice(None), (a[:M * K].reshape(M, K) @ b.reshape(K, N))
                                   .ravel())),
    ("a dot product: one number is no evidence", (1, 16384, 16384),
     lambda o, a, b: o.__setitem__(0, a @ b)),
    ("a product off by a part in a thousand", (M * N, M * K, K * N),
     lambda o, a, b: o.__setitem__(slice(None), (a.reshape(M, K) @ b.reshape(K, N) * 1.001)
                                   .ravel())),
    ("too small to gain", (4 * 4, 4 * 8, 8 * 4),
     lambda o, a, b: o.__setitem__(slice(None), (a.reshape(4, 8) @ b.reshape(8, 4)).ravel())),
])
def test_anything_else_keeps_its_kernel(what, sizes, fn):
    assert gemm.find_layout(sizes, kernel(fn, sizes)) is None, what


LONG = 10_816                   # a convolution's weight gradient: batch 64 x 13 x 13 windows


def _sequential(a, b, m, n, scale=1.0):
    """A product [m, LONG] @ [LONG, n] summed one term after another in float32, as a
    generated kernel's loop does (numpy's own sums are pairwise, far more exact)."""
    terms = a.reshape(LONG, m).T[:, :, None] * b.reshape(LONG, n)[None, :, :]
    return np.cumsum(terms, axis=1, dtype=np.float32)[:, -1, :] * np.float32(scale)


@pytest.mark.parametrize("scale, found", [(1.0, True), (1.001, False)])
def test_a_long_sequential_float32_sum_is_a_product_and_one_off_by_a_part_in_a_thousand_not(
        scale, found):
    m, n = 12, 8
    sizes = (m * n, LONG * m, LONG * n)
    fn = lambda o, a, b: o.__setitem__(slice(None), _sequential(a, b, m, n, scale).ravel())  # noqa: E731
    assert (gemm.find_layout(sizes, kernel(fn, sizes)) is not None) is found


class _Store:
    """The kernel cache's signed store as the probe sees it: load(name), store(name, bytes)."""

    def __init__(self):
        self.entries: dict[str, bytes] = {}

    def load(self, name):
        return self.entries.get(name)

    def store(self, name, blob):
        self.entries[name] = blob


def test_whether_halves_are_exact_is_remembered_with_the_kernel(monkeypatch):
    """Checking that a product's halves are the whole one runs two products on scratch
    arrays; a later process (the same kernel, sizes and layout) reads the answer instead,
    and an entry that is no answer is checked again."""
    name, sizes, fn = next(iter(layouts()))
    layout = gemm.find_layout(sizes, kernel(fn, sizes))
    checks, real = [], gemm._halves_exact
    monkeypatch.setattr(gemm, "_halves_exact", lambda *a: checks.append(1) or real(*a))
    store = _Store()
    first = gemm.remembered_halves(sizes, layout, b"kernel code", store)
    assert first is True and len(checks) == 1 and len(store.entries) == 1
    assert gemm.remembered_halves(sizes, layout, b"kernel code", store) is True
    assert len(checks) == 1
    gemm.remembered_halves(sizes, layout, b"other code", store)
    assert len(checks) == 2
    key = next(iter(store.entries))
    store.entries[key] = b"maybe"
    assert gemm.remembered_halves(sizes, layout, b"kernel code", store) is True
    assert len(checks) == 3 and store.entries[key] == b"true"
    assert gemm.remembered_halves(sizes, layout, None, store) is True and len(checks) == 4


def test_a_finding_is_remembered_with_the_kernel_and_a_damaged_one_is_found_again():
    name, sizes, fn = next(iter(layouts()))
    runs = []

    def run(addrs):
        runs.append(1)
        kernel(fn, sizes)(addrs)
    store = _Store()
    first = gemm.remembered_layout(sizes, run, b"kernel code", store)
    assert first is not None and len(runs) == 1 and len(store.entries) == 1
    assert gemm.remembered_layout(sizes, run, b"kernel code", store) == first
    assert len(runs) == 1                               # the next process runs nothing
    gemm.remembered_layout(sizes, run, b"other code", store)
    assert len(runs) == 2                               # another kernel is its own entry
    key = next(iter(store.entries))
    for damaged in (b"[0, 1, 2]", b"not json", b'[1, 2, 3, 4, 5, false, false, false, [], "relu"]'):
        store.entries[key] = damaged
        assert gemm.remembered_layout(sizes, run, b"kernel code", store) == first
    assert len(runs) == 5
    not_product = (M * N, M * N, M * N)
    elementwise = kernel(lambda o, a, b: o.__setitem__(slice(None), a * b), not_product)
    assert gemm.remembered_layout(not_product, elementwise, b"mul", store) is None
    assert gemm.remembered_layout(not_product, lambda a: 1 / 0, b"mul", store) is None


CONV = """\
dlgraph: 1
name: blas-cnn
inputs:
  x: {shape: [batch, 3, 12, 12]}
  y: {shape: [batch], dtype: int32}
nodes:
  c1: {op: conv2d, in: x, out: 8, kernel: 3, activation: relu}
  c2: {op: conv2d, in: c1, out: 16, kernel: 3, padding: 1, stride: 2, activation: relu}
  flat: {op: flatten, in: c2}
  logits: {op: linear, in: flat, out: 10}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 64}
  batch: 32
  objective: loss
  optimizer: {type: adam, lr: 0.01}
"""


def test_convolutions_train_on_blas_as_they_do_on_kernels(tmp_path, monkeypatch, counted):
    """A convolution is its patches times its weight: the forward product, the weight's
    gradient (a sum over every window of the batch) and the patches' gradient run on the
    BLAS, and five steps give the weights that the generated kernels give."""
    p = tmp_path / "cnn.yaml"
    p.write_text(CONV)
    g = dlgraph.load(p)
    data = {"x": RNG.standard_normal((64, 3, 12, 12)).astype(np.float32),
            "y": RNG.integers(0, 10, 64).astype(np.int32)}
    _, _, layouts = _on_and_off(g, data, tmp_path, monkeypatch, counted)
    ks = {layout[3] for layout in layouts}
    assert {27, 72, 32 * 10 * 10, 32 * 5 * 5, 16} <= ks, ks   # c1, c2: forward, weights; c2 patches


SPEC = """\
dlgraph: 1
name: blas-mlp
inputs:
  x: {shape: [batch, 48]}
  y: {shape: [batch], dtype: int32}
nodes:
  h1: {op: linear, in: x, out: 64, activation: relu}
  h2: {op: linear, in: h1, out: 64, activation: relu}
  logits: {op: linear, in: h2, out: 10}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 64}
  batch: 32
  objective: loss
  optimizer: {type: sgd, lr: 0.1}
"""


@pytest.fixture
def counted(monkeypatch):
    made: list = []
    real = gemm.matmul_call

    def counting(*args):
        made.append(args[2])
        return real(*args)
    monkeypatch.setattr(gemm, "matmul_call", counting)
    return made


def test_a_compiled_model_runs_its_layers_on_blas_and_matches_numpy(tmp_path, counted):
    g = dlgraph.load(_write(tmp_path))
    model = dlgraph.compile(g, seed=3, cache=False)
    x = RNG.standard_normal((32, 48)).astype(np.float32)
    for _ in range(3):                  # the replay is planned once the program is captured
        got = model(x=x)["logits"]
    assert len(counted) >= 2            # the two relu layers at least: product, bias, relu
    w = {k: v.numpy().astype(np.float64) for k, v in model.params.items()}
    h = x.astype(np.float64)
    for layer, act in (("h1", True), ("h2", True), ("logits", False)):
        h = h @ w[f"{layer}.weight"].T + w[f"{layer}.bias"]
        h = np.maximum(h, 0) if act else h
    np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-5)


def test_training_on_blas_matches_training_on_kernels(tmp_path, monkeypatch, counted):
    g = dlgraph.load(_write(tmp_path))
    data = {"x": RNG.standard_normal((96, 48)).astype(np.float32),
            "y": RNG.integers(0, 10, 96).astype(np.int32)}
    on, off, layouts = _on_and_off(g, data, tmp_path, monkeypatch, counted)
    assert layouts, "no product ran on the BLAS"
    assert on.metrics["loss"] == pytest.approx(off.metrics["loss"], rel=1e-4)


def _on_and_off(g, data, tmp_path, monkeypatch, counted):
    """Five training steps with products on the BLAS, then with generated kernels only
    (``DLGRAPH_BLAS=0``, where none may run on the BLAS): the same weights. Returns both
    results and the layouts the first run found."""
    on = dlgraph.train(g, out=tmp_path / "on", quiet=True, steps=5, cache=False, data=data)
    layouts = list(counted)
    monkeypatch.setenv("DLGRAPH_BLAS", "0")
    counted.clear()
    off = dlgraph.train(g, out=tmp_path / "off", quiet=True, steps=5, cache=False, data=data)
    assert not counted
    from dlgraph.engine.train.checkpoint import load_tensors
    a = load_tensors(tmp_path / "on" / "weights.safetensors")[0]
    b = load_tensors(tmp_path / "off" / "weights.safetensors")[0]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    return on, off, layouts


def _write(tmp_path):
    p = tmp_path / "blas.yaml"
    p.write_text(SPEC)
    return p


def test_a_product_for_the_blas_is_generated_without_its_sum_unrolled(tmp_path, counted):
    """Code generation unrolled a product's sum (0.2-1.7 s a kernel) that runs only in the
    capturing step: a kernel that may be a product keeps its upcast outputs, not the
    unrolled sum, and still runs on the BLAS and gives numpy's numbers; a reduction that
    cannot be a product (a row's sum of squares) keeps every optimisation tinygrad chose."""
    from tinygrad import Tensor

    from dlgraph.engine.compile import tinygrad_door as door
    g = dlgraph.load(_write(tmp_path))
    model = dlgraph.compile(g, seed=5, cache=False)
    x = RNG.standard_normal((32, 48)).astype(np.float32)
    for _ in range(3):
        got = model(x=x)["logits"]
    assert len(counted) >= 2
    w = {k: v.numpy().astype(np.float64) for k, v in model.params.items()}
    h = np.maximum(x @ w["h1.weight"].T + w["h1.bias"], 0)
    h = np.maximum(h @ w["h2.weight"].T + w["h2.bias"], 0)
    np.testing.assert_allclose(got, h @ w["logits.weight"].T + w["logits.bias"],
                               rtol=1e-4, atol=1e-5)
    sq = Tensor(RNG.standard_normal((128, 36)).astype(np.float32))
    np.testing.assert_allclose((sq * sq).sum(1).numpy(), (sq.numpy() ** 2).sum(1), rtol=1e-5)
    opts = door.generated_opts()
    products = ["r_32_16_4_48", "r_32_16_4_64", "r_32_10_64"]     # h1, h2, logits: forward
    assert all("UNROLL" not in opts[n] for n in products), opts
    assert "UPCAST" in opts["r_32_16_4_48"], opts          # 4 outputs at once, sum rolled
    assert opts["r_128_9_4"] == {"UNROLL"}, opts           # the sum of squares, 4 unrolled
