"""Hostile and clumsy input: nothing runs code, nothing escapes its folder, nothing explodes,
and every bad input is a DlgraphError (issue classes A-G)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import evaluate
from tinygrad import Tensor

import dlgraph
from dlgraph.engine.errors import DataError
from dlgraph.engine.graph.autodiff import reverse
from dlgraph.engine.io.data import load_data

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this calls ``os.system`` -- if the unpickler lets it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


# ------------------------------------------------------------------ A. security

@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
def test_cifar_batch_cannot_run_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload(marker)]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="refused to unpickle: it names .*which a CIFAR-10 "
                                        "batch never holds"):
        load_data({"source": "cifar10", "paths": "data_batch_1"}, tmp_path, 0)
    assert not marker.exists()


def test_cifar_batch_of_any_protocol_still_loads(tmp_path):
    data = np.arange(2 * 3072).reshape(2, 3072) % 256
    for protocol in (2, 4, 5):
        (tmp_path / "b").write_bytes(pickle.dumps(
            {b"data": data.astype(np.uint8), b"labels": [3, 9], b"filenames": [b"a", b"b"],
             b"batch_label": b"training batch 1 of 5"}, protocol=protocol))
        d = load_data({"source": "cifar10", "paths": "b"}, tmp_path, 0)
        np.testing.assert_array_equal(d["x"].reshape(2, 3072) * 255, data)
        assert d["y"].tolist() == [3, 9]


def test_cifar_label_out_of_range_is_refused(tmp_path):
    (tmp_path / "b").write_bytes(pickle.dumps(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}))
    with pytest.raises(DataError, match=r"label 10 of image 1 is not a CIFAR-10 class \(0-9\)"):
        load_data({"source": "cifar10", "paths": "b"}, tmp_path, 0)


SPEC = ("dlgraph: 1\nname: t\n{include}inputs:\n  x: {{shape: [2, 3]}}\nnodes:\n"
        "  a: {{op: relu, in: x}}\noutputs: [a]\n")


def write_spec(folder: Path, include: str = "", name: str = "s.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(SPEC.format(include=include))
    return path


def test_include_outside_the_spec_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("modules: {}\nroot:x:0:0:TOPSECRET\n")
    for inc in ["../secret.yaml", str(secret)]:
        spec = write_spec(tmp_path / "proj", f"include: [{inc}]\n")
        with pytest.raises(dlgraph.SpecError) as info:
            dlgraph.load(spec)
        assert str(info.value) == (
            f"{spec}:3: included file {inc} is outside the spec's folder ({spec.parent})\n"
            "  help: include files below the spec's folder, or add their folder to "
            "DLGRAPH_INCLUDE_PATH")
        assert "TOPSECRET" not in str(info.value)


def test_include_through_a_symlink_out_of_the_tree_is_refused(tmp_path):
    (tmp_path / "outside.yaml").write_text("modules: {}\n")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    with pytest.raises(dlgraph.SpecError, match="is outside the spec's folder"):
        dlgraph.load(write_spec(proj, "include: [link.yaml]\n"))


def test_include_root_opt_in(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "blocks.yaml").write_text(
        "modules:\n  act:\n    inputs: [h]\n    nodes:\n      r: {op: relu, in: h}\n"
        "    outputs: [r]\n")
    spec = write_spec(tmp_path / "proj", f"include: [{shared / 'blocks.yaml'}]\n")
    with pytest.raises(dlgraph.SpecError, match="outside the spec's folder"):
        dlgraph.load(spec)
    monkeypatch.setenv("DLGRAPH_INCLUDE_PATH", str(shared))
    dlgraph.validate(spec)


@pytest.mark.parametrize("include, message", [
    ("include: 7\n", "`include:` is a list of spec file paths, not 7"),
    ("include: blocks.yaml\n", "`include:` is a list of spec file paths, not 'blocks.yaml'"),
    ("include: [notes.txt]\n", "included file notes.txt is not a .yaml, .yml or .json spec"),
    ("include: [bin.yaml]\n", "included file bin.yaml: a byte that is not UTF-8 at column 3; "
                              "this is not a spec file"),
    ("include: [sub]\n", "included file sub is not a .yaml, .yml or .json spec"),
])
def test_bad_include_is_a_located_error(tmp_path, include, message):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bin.yaml").write_bytes(b"ab\xff\xfe\x00SECRET")
    (tmp_path / "sub").mkdir()
    spec = write_spec(tmp_path, include)
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(spec)
    assert str(info.value).split("\n")[0] == f"{spec}:3: {message}"
    assert "SECRET" not in str(info.value)


def test_fifo_as_spec_or_data_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(dlgraph.SpecError, match="is not a regular file"):
        dlgraph.load(fifo)
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(DataError, match="not a regular file"):
        load_data({"source": "csv", "path": "pipe.csv", "x": ["a"]}, tmp_path, 0)
    with pytest.raises(DataError, match="not a regular file"):
        load_data({"source": "csv", "path": "/dev/zero", "x": ["a"]}, tmp_path, 0)


def test_data_path_that_is_a_folder(tmp_path):
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(DataError) as info:
        load_data({"source": "csv", "path": "d.csv", "x": ["a"]}, tmp_path, 0)
    assert str(info.value) == (f"{tmp_path / 'd.csv'}: this is a folder, not a data file\n"
                               "  help: name a file inside it")


def test_huge_spec_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(100 * 2**20)
    with pytest.raises(dlgraph.SpecError, match="the spec file has 104857600 bytes; at most "
                                                "1048576 are read"):
        dlgraph.load(big)


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))


@pytest.mark.parametrize("text, message", [
    ("l0: &l0 [x, x]\n" + LAUGHS, "<string>:1: the spec expands to more than 20000 values"),
    ("a: &a [1, [2, *a]]\n", "<string>:1: a YAML anchor refers to itself"),
    ("a: &a {b: *a}\n", "<string>:1: a YAML anchor refers to itself"),
    ("a: " + "[" * 10000 + "]" * 10000 + "\n", "<string>:1: the spec is nested more than 64 "
                                                "levels deep"),
    ("a:\n" + "".join(" " * i + "- \n" for i in range(1, 600)),
     "<string>:257: the spec is nested more than 64 levels deep"),
    ("lr: .inf\n", "<string>:1: .inf is not a number a spec can hold"),
    ("lr: -Infinity\n", "<string>:1: -Infinity is not a number a spec can hold"),
    ("name: \x07\n", "<string>:1: the control character U+0007 at column 7"),
])
def test_yaml_bombs_are_refused(text, message):
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(text + SPEC.format(include="").replace("name: t\n", ""))
    assert str(info.value).split("\n")[0].startswith(message)


def test_json_nan_is_refused(tmp_path):
    spec = tmp_path / "n.json"
    spec.write_text('{"dlgraph": 1, "name": "n",\n "inputs": {"x": {"shape": [2, NaN]}},\n'
                    ' "nodes": {}, "outputs": []}\n')
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(spec)
    assert str(info.value).split("\n")[0] == f"{spec}:2: NaN is not a number a spec can hold"


def test_non_utf8_spec_names_line_and_column(tmp_path):
    spec = tmp_path / "b.yaml"
    spec.write_bytes(b"dlgraph: 1\nname: ab\xe9\n")
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(spec)
    assert str(info.value).split("\n")[0] == (
        f"{spec}:2: a byte that is not UTF-8 at column 9; this is not a spec file")


# ------------------------------------------------------------------ G. gradients vs PyTorch

def _param_graph(op: str, shape: tuple, attrs: dict | None = None, extra_nodes=None):
    """x0 (a param) -> op -> out; obj = sum(out * w): the graph, its reversal and its params."""
    from dlgraph.engine.graph.autodiff import reverse
    nodes = {"x0": {"op": "param", "shape": list(shape)},
             "out": {"op": op, "in": "x0", **(attrs or {})},
             "w": {"op": "param", "shape": list(shape), "trainable": False},
             "prod": {"op": "mul", "in": ["out", "w"]}, "obj": {"op": "sum", "in": "prod"}}
    g = dlgraph.load({"dlgraph": 1, "name": "g", "inputs": {}, "nodes": nodes,
                      "outputs": ["obj"]})
    wrt = [n for n, p in g.params.items() if p.trainable]
    return g, reverse(g, "obj", wrt=wrt), wrt


def _run(tg, wrt, values: dict, training: bool):
    from helpers import evaluate
    from tinygrad import Tensor
    params = {k: Tensor(np.asarray(v, np.float32)) for k, v in values.items()}
    outs = evaluate(tg, [tg.objective] + [tg.grads[n] for n in wrt], {}, params,
                    training=training)
    return {n: o.numpy() for n, o in zip(["obj", *wrt], outs, strict=True)}, params


def _torch_bn(shape, values, momentum, training):
    import torch
    bn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
        shape[1], momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(values["out.weight"]))
        bn.bias.copy_(torch.from_numpy(values["out.bias"]))
        bn.running_mean.copy_(torch.from_numpy(values["out.running_mean"].reshape(-1)))
        bn.running_var.copy_(torch.from_numpy(values["out.running_var"].reshape(-1)))
    bn.train(training)
    x = torch.from_numpy(values["x0"]).requires_grad_()
    obj = (bn(x) * torch.from_numpy(values["w"])).sum()
    obj.backward()
    return obj, x.grad, bn


def _bn_values(shape, seed, zero=False):
    rng = np.random.default_rng(seed)
    c = shape[1]
    stat = (1, c) + (1,) * (len(shape) - 2)
    x = np.zeros(shape) if zero else rng.standard_normal(shape) * 2 + 1
    return {k: np.asarray(v, np.float32) for k, v in {
        "x0": x, "w": rng.standard_normal(shape), "out.weight": rng.uniform(0.5, 2, c),
        "out.bias": rng.standard_normal(c), "out.running_mean": rng.standard_normal(stat),
        "out.running_var": rng.uniform(0.5, 2, stat)}.items()}


@pytest.mark.parametrize("shape, momentum", [((4, 3), 1.0), ((4, 3), 0.1), ((2, 3, 3, 3), 1.0),
                                             ((2, 3), 0.5), ((2, 3, 3, 3), 0.0)])
def test_batch_norm_running_var_is_unbiased_as_pytorch(shape, momentum):
    _, tg, wrt = _param_graph("batch_norm", shape, {"momentum": momentum})
    values = _bn_values(shape, 3)
    ours, params = _run(tg, wrt, values, training=True)
    _, xgrad, bn = _torch_bn(shape, values, momentum, training=True)
    np.testing.assert_allclose(params["out.running_var"].numpy().reshape(-1),
                               bn.running_var.numpy(), rtol=1e-5)
    np.testing.assert_allclose(params["out.running_mean"].numpy().reshape(-1),
                               bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["x0"], xgrad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, zero", [((4, 3), False), ((2, 3, 3, 3), False), ((1, 3), False),
                                         ((4, 3), True)])
def test_batch_norm_eval_gradient_skips_batch_statistics(shape, zero):
    _, tg, wrt = _param_graph("batch_norm", shape)
    values = _bn_values(shape, 5, zero)
    ours, params = _run(tg, wrt, values, training=False)
    obj, xgrad, bn = _torch_bn(shape, values, 0.1, training=False)
    assert ours["obj"] == pytest.approx(obj.item(), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(ours["x0"], xgrad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["out.weight"], bn.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    # eval mode leaves the running statistics alone
    np.testing.assert_array_equal(params["out.running_var"].numpy(), values["out.running_var"])


def test_softplus_gradient_is_sigmoid_also_at_zero_and_extremes():
    import torch
    x = np.array([[0.0, -0.0, 1e-8, -1e-8, 3.0, -3.0, 30.0, -30.0, 100.0, -100.0]], np.float32)
    _, tg, wrt = _param_graph("softplus", x.shape)
    w = np.ones_like(x)
    ours, _ = _run(tg, wrt, {"x0": x, "w": w}, training=True)
    tx = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.softplus(tx).sum().backward()
    np.testing.assert_allclose(ours["x0"], tx.grad.numpy(), rtol=1e-6, atol=1e-7)
    assert ours["x0"][0, 0] == 0.5
    assert ours["obj"] == pytest.approx(torch.nn.functional.softplus(torch.from_numpy(x))
                                        .sum().item(), rel=1e-6)


def test_bce_at_a_zero_logit_matches_pytorch():
    """A zero-initialised output layer: the bias gradient is mean(sigmoid(0) - y)."""
    import torch
    from helpers import evaluate
    from tinygrad import Tensor

    from dlgraph.engine.graph.autodiff import reverse
    spec = {"dlgraph": 1, "name": "b", "inputs": {"x": {"shape": [4, 2]}, "y": {"shape": [4, 1]}},
            "nodes": {"z": {"op": "linear", "in": "x", "out": 1},
                      "loss": {"op": "binary_cross_entropy", "in": ["z", "y"]}},
            "outputs": ["loss"]}
    g = dlgraph.load(spec)
    tg = reverse(g, "loss")
    x = np.array([[1, 2], [0, 1], [3, 1], [1, 1]], np.float32)
    y = np.array([[1], [1], [0], [1]], np.float32)
    params = {k: Tensor(np.zeros(p.shape, np.float32)) for k, p in g.params.items()}
    names = list(tg.grads)
    outs = evaluate(tg, [tg.grads[n] for n in names], {"x": x, "y": y}, params)
    bias = dict(zip(names, outs, strict=True))["z.bias"].numpy()
    tb = torch.zeros(1, requires_grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(x) @ torch.zeros(2, 1) + tb, torch.from_numpy(y)).backward()
    np.testing.assert_allclose(bias.reshape(-1), tb.grad.numpy(), rtol=1e-6)
    assert tb.grad.item() == pytest.approx(-0.25)


KINKY = """dlgraph: 1
name: kinky
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  zero: {op: const, value: 0.0}
  dark: {op: mul, in: [x, zero]}
  h: {op: linear, in: dark, out: 3, activation: relu}
  s: {op: linear, in: x, out: 3, activation: relu}
  both: {op: add, in: [h, s]}
  logits: {op: linear, in: both, out: 2}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 16}
  objective: loss
  optimizer: {type: sgd, lr: 0.1}
"""


def test_gradcheck_skips_kinks_instead_of_false_alarms():
    """h's zero bias on a black (all-zero) input sits exactly on relu's kink: every
    coordinate of h.bias is skipped, the smooth parameters are still checked and pass."""
    from dlgraph.engine.report.gradcheck import gradcheck
    rows = {name: (err, kinks) for name, err, kinks in gradcheck(dlgraph.load(KINKY))}
    assert rows["h.bias"] == (0.0, 3)
    assert all(err < 1e-6 for err, _ in rows.values()), rows
    assert rows["s.weight"][1] == 0 and rows["logits.weight"][1] == 0


# ------------------------------------------------------------------ C. no tracebacks

HOSTILE = [0, -1, -3, [], [3], [1, 0, 2, 1], [0, 0], [-2, 2], 2**31, 10**12, -2**40, "x", "",
           True, 1.5, None, {"a": 1}, [[1]], "1e12"]
SHAPES = [(2, 3, 8, 8), (2, 5, 4), (4, 6)]


def _op_specs():
    from dlgraph.ops import REGISTRY
    for op, d in sorted(REGISTRY.items()):
        arity = max(len(d.inputs) - d.variadic, 1 if d.variadic else 0)
        for field in [f for f in d.attrs.model_fields if f not in ("op", "in_")]:
            for k, value in enumerate(HOSTILE):
                shape = SHAPES[(k + len(field)) % len(SHAPES)]
                inputs = {f"x{i}": {"shape": list(shape)} for i in range(arity)}
                node = {"op": op, **({"in": list(inputs)} if arity else {}), field: value}
                yield op, field, value, {"dlgraph": 1, "name": "w", "inputs": inputs,
                                         "nodes": {"out": node}, "outputs": ["out"]}


def test_every_op_field_with_hostile_values_gives_only_dlgraph_errors():
    """0, negatives, empty and wrong-length lists, huge ints, wrong types in every field of
    every op: the spec validates or is refused with a DlgraphError, never anything else."""
    escaped, refused = [], 0
    for op, field, value, spec in _op_specs():
        try:
            dlgraph.validate(spec)
        except dlgraph.DlgraphError:
            refused += 1
        except Exception as e:  # noqa: BLE001 (what the test looks for)
            escaped.append(f"{op}.{field}={value!r}: {type(e).__name__}: {e}"[:200])
    assert not escaped, "\n".join(escaped[:20])
    assert refused > 1000  # the walk reaches the checks, it does not validate everything


@pytest.mark.parametrize("node, message", [
    ("{op: conv2d, in: x, out: 4, kernel: 3, stride: 0}",
     "field 'stride': stride must be at least 1 (and below 2^31); got 0"),
    ("{op: conv2d, in: x, out: 4, kernel: [3]}",
     "field 'kernel': kernel is one integer or a list of two, [h, w]; got [3]"),
    ("{op: max_pool2d, in: x, kernel: 2, padding: [1, 0, 2, 1]}",
     "padding [1, 0, 2, 1] is more than half the kernel 2: some windows would hold only "
     "padding"),
    ("{op: conv2d, in: x, out: 4, kernel: 3, padding: -1}",
     "field 'padding': padding must be 0 or more (and below 2^31); got -1"),
    ("{op: conv_transpose2d, in: x, out: 4, kernel: 3, dilation: 0}",
     "field 'dilation': dilation must be at least 1 (and below 2^31); got 0"),
    ("{op: max_pool2d, in: x, kernel: 2, padding: 2}",
     "padding 2 is more than half the kernel 2: some windows would hold only padding"),
    ("{op: reshape, in: x, shape: [batch, batch, -1]}",
     "named dim 'batch' appears more often in [batch, batch, -1] than in the input shape "
     "[batch, 3, 8, 8]"),
    ("{op: flatten, in: x, start: 3, end: 1}",
     "flatten start (axis 3) comes after its end (axis 1) in [batch, 3, 8, 8]"),
    ("{op: noise, in: x, shape: [-8]}", "field 'shape': shape is a list of sizes of at least 1; "
                                        "got [-8]"),
    ("{op: layer_norm, in: x, dims: 2147483648}",
     "dims is 2147483648, but the input [batch, 3, 8, 8] has 4 axes"),
    ("{op: [relu], in: x}", "`op` is the name of one op, not ['relu']"),
    ("{op: {a: 1}, in: x}", "`op` is the name of one op, not {'a': 1}"),
])
def test_listed_tracebacks_are_located_errors(node, message):
    text = ("dlgraph: 1\nname: t\ninputs:\n  x: {shape: [batch, 3, 8, 8]}\nnodes:\n"
            f"  a: {node}\noutputs: [a]\n")
    with pytest.raises(dlgraph.DlgraphError) as info:
        dlgraph.validate(text)
    first = str(info.value).split("\n")[0]
    assert first.startswith("<string>:6: node 'a'") and first.endswith(message), first


# ------------------------------------------------------------------ fuzzing the examples

def _mutate(data, rng):
    """One random mutation of the parsed spec ``data`` (in place): a hostile value, a deleted
    or misspelt key, another op, a value moved elsewhere."""
    import copy

    from dlgraph.ops import REGISTRY
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, path + (i,))
    walk(data, ())
    path = paths[rng.integers(1, len(paths))] if len(paths) > 1 else ()
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    key, kind = path[-1], rng.integers(6)
    if kind == 0 or kind == 1:
        parent[key] = copy.deepcopy(HOSTILE[rng.integers(len(HOSTILE))])
    elif kind == 2 and isinstance(parent, dict):
        del parent[key]
    elif kind == 3 and isinstance(parent, dict):
        parent[f"{key}x" if isinstance(key, str) else "extra"] = parent.pop(key)
    elif kind == 4:
        ops = sorted(REGISTRY)
        parent[key] = ops[rng.integers(len(ops))] if key == "op" else \
            copy.deepcopy(data[list(data)[rng.integers(len(data))]])
    else:
        other = paths[rng.integers(len(paths))]
        value = data
        for p in other:
            value = value[p]
        parent[key] = copy.deepcopy(value) if other[:len(path)] != path else None


def fuzz_examples(n: int, seed: int = 0) -> list[str]:
    """Validate ``n`` seeded mutations of graphs/*.yaml; returns what escaped as not a
    DlgraphError (or took over 10 s), as readable lines."""
    import time

    import yaml
    specs = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "graphs").glob("*.yaml"))]
    rng = np.random.default_rng(seed)
    bad = []
    for i in range(n):
        data = yaml.safe_load(yaml.safe_dump(specs[i % len(specs)]))
        for _ in range(1 + rng.integers(3)):
            _mutate(data, rng)
        text = yaml.safe_dump(data, sort_keys=False)
        if rng.integers(8) == 0:  # now and then damage the text itself
            cut = rng.integers(len(text))
            text = text[:cut] + "\x00:[{&*"[rng.integers(6)] + text[cut + 1:]
        start = time.perf_counter()
        try:
            dlgraph.validate(text)
        except dlgraph.DlgraphError:
            pass
        except Exception as e:  # noqa: BLE001 (what the fuzzer looks for)
            bad.append(f"mutation {i}: {type(e).__name__}: {e}"[:300])
        if time.perf_counter() - start > 10:
            bad.append(f"mutation {i}: took {time.perf_counter() - start:.1f} s")
    return bad


def test_fuzzed_examples_raise_only_dlgraph_errors(monkeypatch):
    """A few hundred seeded mutations here; `make fuzz` runs 5,000 (DLGRAPH_FUZZ)."""
    monkeypatch.chdir(ROOT / "graphs")
    n = int(os.environ.get("DLGRAPH_FUZZ", "300"))
    bad = fuzz_examples(n, seed=int(os.environ.get("DLGRAPH_FUZZ_SEED", "0")))
    assert not bad, "\n".join(bad[:20])


# ------------------------------------------------------------------ B. bombs in data and sizes

def test_gzip_bombed_idx_inflates_no_further_than_its_header_declares(tmp_path):
    import gzip
    import struct
    header = b"\0\0\x08\x03" + struct.pack(">3I", 2, 28, 28)       # declares 1,568 bytes
    with gzip.open(tmp_path / "bomb.gz", "wb", compresslevel=9) as f:
        f.write(header)
        chunk = bytes(2**20)
        for _ in range(256):                                         # inflates to 256 MiB
            f.write(chunk)
    assert (tmp_path / "bomb.gz").stat().st_size < 2 * 2**20
    with pytest.raises(DataError) as info:
        load_data({"source": "idx", "images": "bomb.gz", "labels": "bomb.gz"}, tmp_path, 0)
    assert str(info.value).startswith(f"{tmp_path / 'bomb.gz'}: oversized IDX file: expected "
                                      "1584 bytes, found more than that")


def test_idx_header_declaring_terabytes_is_refused_unread(tmp_path):
    import struct
    (tmp_path / "huge").write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", 2**31, 2**16, 2**16))
    with pytest.raises(DataError, match=r"the IDX images of shape \[2147483648, 65536, 65536\] "
                                        r"would take 8192.0 PiB of memory"):
        load_data({"source": "idx", "images": "huge", "labels": "huge"}, tmp_path, 0)


def test_npy_header_declaring_more_than_fits_is_refused(tmp_path):
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (2**20, 2**20)
    with open(tmp_path / "big.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    with pytest.raises(DataError, match=r"the array of shape \[1048576, 1048576\] would take "
                                        r"4.0 TiB of memory"):
        load_data({"source": "npy", "path": "big.npy"}, tmp_path, 0)


@pytest.mark.parametrize("spec, figure", [
    ({"source": "sine", "samples": 10**11}, "the 'sine' data would take 387.1 TiB"),
    ({"source": "images", "samples": 10**7}, "the 'images' data would take 572.2 GiB"),
    ({"source": "text_tokens", "samples": 10**9, "length": 64}, "the 'text_tokens' data would "
                                                                "take 726.4 GiB"),
])
def test_generated_data_over_the_cap_is_refused_before_generating(spec, figure):
    with pytest.raises(DataError) as info:
        load_data(spec, ".", 0)
    assert str(info.value).startswith(figure + " of memory; at most 4.0 GiB of data are loaded")


def test_run_refuses_a_graph_that_cannot_fit_with_the_figure(tmp_path):
    from click.testing import CliRunner

    from dlgraph.cli.main import main
    spec = tmp_path / "big.yaml"
    spec.write_text("dlgraph: 1\nname: big\ninputs:\n  x: {shape: [batch, 4]}\nnodes:\n"
                    "  h: {op: linear, in: x, out: 1e12}\noutputs: [h]\n")
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert result.exit_code == 1
    # 1e12 weights (18.2 TiB) + two [4, 1e12] values (29.1 TiB)
    assert result.stderr.startswith(f"error: {spec}:6: this graph needs about 47.3 TiB at "
                                    "batch 4 (18.2 TiB of parameters), more than the ")


# ------------------------------------------------------------------ D. silently wrong

CLASSIFIER = {"dlgraph": 1, "name": "c", "inputs": {"x": {"shape": ["batch", 3]},
                                                   "y": {"shape": ["batch"], "dtype": "int32"}},
              "nodes": {"z": {"op": "linear", "in": "x", "out": 4},
                        "loss": {"op": "cross_entropy", "in": ["z", "y"]}},
              "outputs": ["z"]}


def test_labels_out_of_range_are_refused_with_row_and_value():
    from dlgraph.engine.io.data.ids import check_ids
    g = dlgraph.load(CLASSIFIER)
    x = np.zeros((5, 3), np.float32)
    check_ids(g, {"x": x, "y": np.array([0, 1, 2, 3, 0], np.int32)})
    with pytest.raises(DataError) as info:
        check_ids(g, {"x": x, "y": np.array([0, 1, 4, 3, -100], np.int32)}, "train.csv")
    assert str(info.value) == (
        "train.csv: row 2 of 'y' holds the label 4, but node 'loss' (cross_entropy) takes "
        "labels 0 to 3\n  help: set ignore_index on the loss for a padding label (PyTorch "
        "uses -100)")


def test_embedding_ids_out_of_range_are_refused():
    from dlgraph.engine.io.data.ids import check_ids
    g = dlgraph.load({"dlgraph": 1, "name": "e",
                      "inputs": {"t": {"shape": ["batch", 3], "dtype": "int32"}},
                      "nodes": {"e": {"op": "embedding", "in": "t", "num": 5, "dim": 2}},
                      "outputs": ["e"]})
    with pytest.raises(DataError, match=r"row 1 of 't' holds the id 5, but node 'e' "
                                        r"\(embedding\) takes ids 0 to 4"):
        check_ids(g, {"t": np.array([[0, 1, 2], [4, 5, 0]], np.int32)})


def test_cross_entropy_ignore_index_matches_pytorch():
    import torch
    spec = {**CLASSIFIER, "nodes": {**CLASSIFIER["nodes"], "loss": {
        "op": "cross_entropy", "in": ["z", "y"], "ignore_index": -100}}}
    g = dlgraph.load(spec)
    tg = reverse(g, "loss")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = np.array([0, -100, 3, -100, 1], np.int32)
    weights = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in g.params.items()}
    names = list(tg.grads)
    outs = evaluate(tg, [tg.objective] + [tg.grads[n] for n in names], {"x": x, "y": y},
                    {k: Tensor(v) for k, v in weights.items()})
    w = torch.from_numpy(weights["z.weight"]).requires_grad_()
    b = torch.from_numpy(weights["z.bias"]).requires_grad_()
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(x) @ w.T + b,
                                             torch.from_numpy(y).long(), ignore_index=-100)
    loss.backward()
    assert outs[0].numpy() == pytest.approx(loss.item(), rel=1e-5)
    got = dict(zip(names, outs[1:], strict=True))
    np.testing.assert_allclose(got["z.weight"].numpy(), w.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["z.bias"].numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_checkpoints_are_checked_before_use(tmp_path):
    from dlgraph.engine.errors import TrainingError
    from dlgraph.engine.train.checkpoint import load_weights, read_checkpoint, save_tensors
    g = dlgraph.load(CLASSIFIER)
    shapes = {k: p.shape for k, p in g.params.items()}
    good = {f"param.{k}": np.ones(s, np.float32) for k, s in shapes.items()}
    ckpt = tmp_path / "checkpoint.safetensors"
    save_tensors(ckpt, good, {"step": 3, "epoch": 1, "history": []})
    assert read_checkpoint(ckpt, shapes)[1]["step"] == 3
    # inference straight from a run's checkpoint: the param. prefix is understood
    assert set(load_weights(g, ckpt)) == set(shapes)
    save_tensors(ckpt, {**good, "param.z.bias": np.ones(1, np.float32)},
                 {"step": 3, "epoch": 1, "history": []})
    with pytest.raises(TrainingError, match=r"parameter 'z.bias' has shape \[1\] in the "
                                            r"checkpoint, \[4\] in the graph"):
        read_checkpoint(ckpt, shapes)
    save_tensors(ckpt, good, {"epoch": 1})
    with pytest.raises(TrainingError, match="the checkpoint's metadata has no valid 'step'"):
        read_checkpoint(ckpt, shapes)
    raw = ckpt.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"dlgraph":"{', b'"dlgraph":"[')
    ckpt.write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(DataError, match="the file's dlgraph metadata is damaged"):
        read_checkpoint(ckpt, shapes)


def test_run_inputs_are_checked_and_untrained_weights_are_announced(tmp_path):
    from click.testing import CliRunner

    from dlgraph.cli.main import main
    tiny = str(ROOT / "tests/specs/good/tiny_mlp.yaml")
    np.save(tmp_path / "x.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 5, 1], np.int32))
    np.save(tmp_path / "yf.npy", np.array([0, 1.7, 1], np.float32))
    (tmp_path / "d.csv").write_text("a\n1\n")

    def run(*args):
        return CliRunner().invoke(main, ["run", tiny, *args])
    ok = run("--input", f"x={tmp_path / 'x.npy'}")
    assert ok.exit_code == 0 and ok.stderr.startswith(
        "warning: running with untrained (freshly initialised) weights")
    for args, message in [
        ([f"x={tmp_path / 'd.csv'}"], "--input reads only .npy and .npz files, not d.csv"),
        ([f"q={tmp_path / 'x.npy'}"],
         f"--input q={tmp_path / 'x.npy'} names 'q', which is not an input of the graph"),
        ([f"x={tmp_path / 'x.npy'}", "--input", f"y={tmp_path / 'yf.npy'}"],
         f"y={tmp_path / 'yf.npy'}: input 'y' is int32, but row 1 of its data holds a fraction"),
        ([f"x={tmp_path / 'x.npy'}", "--input", f"y={tmp_path / 'y.npy'}"],
         f"y={tmp_path / 'y.npy'}: row 1 of 'y' holds the label 5, but node 'loss' "
         "(cross_entropy) takes labels 0 to 1"),
        ([f"x={tmp_path / 'y.npy'}"], f"x={tmp_path / 'y.npy'}: input 'x' has shape [3], but "
                                      "the spec declares [batch, 2]"),
    ]:
        result = run("--input", *args)
        assert result.exit_code == 1, result.output
        assert message in result.stderr and "Traceback" not in result.output


def test_training_only_noise_is_off_at_inference():
    g = dlgraph.load({"dlgraph": 1, "name": "dn", "inputs": {"x": {"shape": ["batch", 3]}},
                      "nodes": {"n": {"op": "noise", "in": "x", "shape": [3],
                                      "training_only": True},
                                "noisy": {"op": "add", "in": ["x", "n"]}},
                      "outputs": ["noisy"]})
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (clean,) = evaluate(g, [g.resolve("noisy")], {"x": x}, {}, training=False)
    np.testing.assert_array_equal(clean.numpy(), x)
    (noisy,) = evaluate(g, [g.resolve("noisy")], {"x": x}, {}, training=True)
    assert np.abs(noisy.numpy() - x).min() > 0


@pytest.mark.parametrize("logits", [
    [[0.0, 0.0, 0.0], [1.0, 1.0, -1.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]],        # ties
    [[80.0, -80.0, 0.0], [-1e4, 1e4, 0.0], [1e4, 1e4, -1e4], [-60.0, -60.0, -60.0]],  # extremes
])
def test_losses_at_ties_and_extreme_logits_match_pytorch(logits):
    import torch
    z = np.array(logits, np.float32)
    y = np.array([0, 2, 1, 1], np.int32)
    t = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], np.float32)
    for op, target, ref in [
        ("cross_entropy", y, lambda tz: torch.nn.functional.cross_entropy(
            tz, torch.from_numpy(y).long())),
        ("binary_cross_entropy", t, lambda tz: torch.nn.functional.
         binary_cross_entropy_with_logits(tz, torch.from_numpy(t)))]:
        dtype = {"dtype": "int32"} if target.dtype == np.int32 else {}
        g = dlgraph.load({"dlgraph": 1, "name": "l",
                          "inputs": {"t": {"shape": list(target.shape), **dtype}},
                          "nodes": {"z": {"op": "param", "shape": [4, 3]},
                                    "loss": {"op": op, "in": ["z", "t"]}},
                          "outputs": ["loss"]})
        tg = reverse(g, "loss", wrt=["z"])
        loss, grad = evaluate(tg, [tg.objective, tg.grads["z"]], {"t": target},
                              {"z": Tensor(z)})
        tz = torch.from_numpy(z).requires_grad_()
        want = ref(tz)
        want.backward()
        assert loss.numpy() == pytest.approx(want.item(), rel=1e-5), op
        np.testing.assert_allclose(grad.numpy(), tz.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_nan_and_infinity_in_data_are_refused_with_the_row(tmp_path):
    (tmp_path / "d.csv").write_text("a,t\n1,2\n3,nan\n4,inf\n")
    with pytest.raises(DataError) as info:
        load_data({"source": "csv", "path": "d.csv", "x": ["a"], "y": "t"}, tmp_path, 0)
    assert str(info.value) == ("d.csv: row 1 of 'y' holds nan\n"
                               "  help: fill in or drop the rows with missing values")


@pytest.mark.parametrize("text", [
    "a: [" + ", ".join(["1"] * 30000) + "]\n",
    "".join(f"k{i}: {i}\n" for i in range(30000)),
])
def test_a_spec_of_many_values_is_refused_before_it_is_built(text):
    with pytest.raises(dlgraph.SpecError, match="the spec has more than 20000 values"):
        dlgraph.load(text)


@pytest.mark.parametrize("name, slug", [("../../x", "x"), ("/etc/cron.d", "etc-cron.d"),
                                        ("..", "run"), ("a b/../c", "a-b-..-c"),
                                        ("ok_name-1", "ok_name-1")])
def test_run_directory_is_a_safe_slug_under_runs(tmp_path, monkeypatch, name, slug):
    from types import SimpleNamespace

    from dlgraph.engine.train.rundir import run_dir_path
    monkeypatch.chdir(tmp_path)
    d = run_dir_path(SimpleNamespace(name=name), None)
    assert d.parts[:2] == ("runs", slug) and len(d.parts) == 3
    assert (tmp_path / d).resolve().is_relative_to(tmp_path / "runs")


def test_out_below_a_file_is_an_error(tmp_path):
    from types import SimpleNamespace

    from dlgraph.engine.errors import TrainingError
    from dlgraph.engine.train.rundir import run_dir_path
    (tmp_path / "f").write_text("")
    with pytest.raises(TrainingError, match="is a file"):
        run_dir_path(SimpleNamespace(name="x"), tmp_path / "f" / "run")
