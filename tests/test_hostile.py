"""Hostile files and faults (issue 23, parts B, C, D, F, G, I): every one is refused with its
figure and its place, or read right; nothing escapes as a traceback.

Each test builds its own hostile input, so the classes are tested, not one example: a .npz
member whose own header declares terabytes, safetensors headers nested 100,000 levels or
declaring more than the file holds, BF16 tensors (checked against PyTorch's bfloat16),
sweeps of 10^9 trials, Ray failing to start with any exception class, YAML 1.1 spellings,
graphs that cannot fit, labels out of range through the Python API.
"""

from __future__ import annotations

import json
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.errors import DataError, SpecError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/specs/good/tiny_mlp.yaml"


def _npy_header(shape, descr="<f4") -> bytes:
    """A .npy version 1.0 header declaring ``shape`` (no data need follow)."""
    h = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h


def _safetensors(header: dict | str, body: bytes = b"") -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


# ------------------------------------------------------------------ B. untrusted files


@pytest.mark.parametrize("shape, figure", [((10**12,), "3.6 TiB"), ((2**20, 2**20, 4), "16.0 TiB")])
def test_npz_members_are_sized_by_their_own_headers(tmp_path, shape, figure):
    # the zip entry is a few bytes; only the member's .npy header says how big it is
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.writestr("x.npy", _npy_header(shape) + b"\0" * 16)
        z.writestr("y.npy", _npy_header((4,), "<i4") + b"\0" * 16)
    from dlgraph.engine.io.data import load_data
    with pytest.raises(DataError) as info:
        load_data({"source": "npy", "path": "d.npz"}, tmp_path, 0)
    assert str(info.value).startswith(
        f"{tmp_path / 'd.npz'}: the arrays of this archive (x {list(shape)} float32, y [4] int32) "
        f"would take {figure} of memory")
    r = _cli("run", TINY, "--input", tmp_path / "d.npz")          # --input: the same reader
    assert r.exit_code == 1 and f"{tmp_path / 'd.npz'}: the arrays of this archive" in r.stderr


def test_a_npz_member_that_is_not_npy_is_a_located_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.writestr("x.npy", b"not an array at all")
    from dlgraph.engine.io.data import load_data
    with pytest.raises(DataError, match=r"array 'x.npy' of the archive is not a NumPy .npy"):
        load_data({"source": "npy", "path": "d.npz"}, tmp_path, 0)


@pytest.mark.parametrize("make, message", [
    (lambda: _safetensors('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     "not a readable safetensors file: its header nests 100,001 levels deep (at most 32 "
     "are read)"),
    (lambda: _safetensors({"__metadata__": {"dlgraph": "[" * 100_000 + "]" * 100_000}}),
     "the file's dlgraph metadata is damaged"),
    (lambda: _safetensors({"w": {"dtype": "F32", "shape": [10**6, 10**6],
                                 "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'w' declares shape [1000000, 1000000] F32 (4,000,000,000,000 bytes) at bytes 0-4"),
    (lambda: _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                          b"\0" * 4), "tensor 'w' declares shape [2] F32 (8 bytes) at bytes 0-8 "
                                      "of 4"),
    (lambda: _safetensors({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
                          b"\0" * 8), "tensor 'w' has the dtype 'C64', which dlgraph does not "
                                      "read"),
    (lambda: struct.pack("<Q", 2**40) + b"{}", "its header declares 1,099,511,627,776 bytes"),
    (lambda: b"\1\0", "it is shorter than its 8-byte header size"),
    (lambda: _safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                          b"\0" * 4 + b"\xff" * 4096),
     "its tensors end at byte 4 of the data, the file holds 4,100"),
])
def test_hostile_safetensors_are_one_located_error(tmp_path, make, message):
    path = tmp_path / "w.safetensors"
    path.write_bytes(make())
    r = _cli("evaluate", TINY, "--weights", path)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith(f"error: {path}: ") and message in r.stderr and "help: " in r.stderr


def test_bf16_tensors_are_read_as_float32_and_said_so(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from dlgraph.engine.train.checkpoint import load_tensors
    ref = torch.tensor([[1.0, -2.5, 3.140625], [1e-3, 65504.0, -0.0]]).to(torch.bfloat16)
    save_file({"w": ref, "b": torch.ones(3, dtype=torch.float16)}, tmp_path / "w.safetensors")
    arrays, _ = load_tensors(tmp_path / "w.safetensors")
    assert arrays["w"].dtype == np.float32
    np.testing.assert_array_equal(arrays["w"], ref.float().numpy())     # exact: a widening
    np.testing.assert_array_equal(arrays["b"], np.ones(3, np.float16))


def test_bf16_warning_names_the_file(tmp_path, capfd):
    from dlgraph.engine.io.data.declared import read_safetensors
    data = _safetensors({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}},
                        b"\x80\x3f\x00\x40")                     # 1.0 and 2.0 in bfloat16
    arrays, _ = read_safetensors(data, "w.safetensors")
    np.testing.assert_array_equal(arrays["w"], [1.0, 2.0])
    assert "warning: w.safetensors: read 1 bfloat16 tensor as float32 (w)" in capfd.readouterr().err


def test_char_tokens_take_a_table_not_a_string_per_character(tmp_path):
    """58 MiB of CJK text took 2.1 GiB as a list of one-character strings; the table over
    code points peaks at a small multiple of the text (measured with tracemalloc, which
    numpy reports to), and gives np.unique's ids."""
    import tracemalloc

    from dlgraph.engine.io.data.text import _char_ids
    rng = np.random.default_rng(0)
    text = "".join(map(chr, rng.integers(0x4E00, 0x9FFF, 400_000))) + "ab, c!"
    tracemalloc.start()
    ids, vocab = _char_ids(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * len(text) + 10 * 2**20            # was ~60 bytes a character
    ref_vocab, ref_ids = np.unique(np.array(list(text)), return_inverse=True)
    assert vocab == ref_vocab.tolist() and np.array_equal(ids, ref_ids)


def test_word_tokens_match_np_unique():
    from dlgraph.engine.io.data.text import _word_ids
    text = "The cat, the CAT; a " + "very" * 300 + " long word. 世界 世界!"
    import re
    tokens = re.findall(r"\w+|[^\w\s]", text)
    ref_vocab, ref_ids = np.unique(np.array(tokens), return_inverse=True)
    ids, vocab = _word_ids(text)
    assert vocab == ref_vocab.tolist() and np.array_equal(ids, ref_ids)


# ------------------------------------------------------------------ C. sweeps


def _sweep_spec(tmp_path) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(TINY.read_text())
    return p


def test_a_grid_of_a_billion_trials_is_counted_not_built(tmp_path):
    from dlgraph.engine.train.sweep_plan import plan_sweep
    values = ",".join(str(v) for v in range(1, 1001))
    flags = [f"train.batch={values}", f"train.seed={values}", f"train.epochs={values}"]
    with pytest.raises(SpecError) as info:
        plan_sweep(_sweep_spec(tmp_path), flags)
    assert str(info.value).startswith(
        f"{tmp_path / 's.yaml'}: this sweep would run 1,000,000,000 trials (a grid of "
        "1000 × 1000 × 1000 values); at most 10,000 are run")
    assert "--max-trials" in info.value.help


def test_samples_over_the_bound_are_refused_and_the_bound_can_be_raised(tmp_path):
    from dlgraph.engine.train.sweep_plan import plan_sweep
    spec = _sweep_spec(tmp_path)
    r = _cli("sweep", spec, "--param", "train.optimizer.lr=0.001:0.1", "--search", "random",
             "--samples", "1000000000")
    assert r.exit_code == 1
    assert "this sweep would run 1,000,000,000 trials (random search); at most 10,000" in r.stderr
    plan = plan_sweep(spec, ["train.optimizer.lr=0.001:0.1"], search="random", samples=20_000,
                      max_trials=20_000)
    assert plan.trials == 20_000


class _RayError(Exception):
    """Stands for one of Ray's own exception classes."""


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   TimeoutError("timed out waiting for the GCS"),
                                   _RayError("System error: raylet died\nlog at /tmp/ray"),
                                   FileNotFoundError(2, "No such file", "raylet")])
def test_ray_failing_to_start_is_one_line(tmp_path, monkeypatch, error):
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False

    def init(**_):
        raise error
    fake.init = init
    fake.tune = types.ModuleType("ray.tune")
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.tune", fake.tune)
    r = _cli("sweep", _sweep_spec(tmp_path), "--param", "train.optimizer.lr=0.1,0.01",
             "--out", tmp_path / "sw")
    assert r.exit_code == 1, r.output
    first = str(error).splitlines()[0]
    assert r.stderr.startswith(f"error: cannot start a local Ray: {type(error).__name__}: "
                               f"{first}\n  help: ")


# ------------------------------------------------------------------ F, G. spec text


def test_yaml_is_read_by_the_1_2_core_schema():
    from dlgraph.engine.spec.parse import parse_text
    data, _ = parse_text("a: 010\nb: 0o17\nc: 0x1F\nd: 1e3\ne: 1.5e3\nf: on\non: 1\ng: yes\n"
                         "h: 1:20\ni: True\nj: -007\nk: ~\nl: 1_000\n", "x.yaml")
    assert data == {"a": 10, "b": 15, "c": 31, "d": 1000, "e": 1500.0, "f": "on", "on": 1,
                    "g": "yes", "h": "1:20", "i": True, "j": -7, "k": None, "l": "1_000"}


def test_a_leading_zero_count_is_decimal_in_a_graph():
    g = dlgraph.load("dlgraph: 1\nname: z\ninputs:\n  x: {shape: [batch, 2]}\nnodes:\n"
                     "  h: {op: linear, in: x, out: 010}\noutputs: [h]\n")
    assert g.params["h.bias"].shape == (10,)


@pytest.mark.parametrize("text", ["x: " + "[" * 10_000 + "]" * 10_000,
                                  "x: " + "{a: " * 10_000 + "1" + "}" * 10_000,
                                  "x:\n" + "".join(" " * i + "- \n" for i in range(1, 300))])
def test_deep_nesting_is_refused_at_its_line(text):
    with pytest.raises(SpecError) as info:
        dlgraph.load("dlgraph: 1\nname: d\n" + text)
    assert str(info.value).startswith("<string>:")
    assert info.value.source.line >= 3 and "nested more than 64 levels deep" in str(info.value)


def test_a_node_nothing_reads_is_a_warning(tmp_path):
    spec = tmp_path / "u.yaml"
    spec.write_text("dlgraph: 1\nname: u\ninputs:\n  x: {shape: [2]}\nnodes:\n"
                    "  a: {op: relu, in: x}\n  b: {op: tanh, in: x}\noutputs: [a]\n")
    r = _cli("validate", spec)
    assert r.exit_code == 0
    assert f"warning: {spec}:7: node 'b' is not used by any node, output, objective or " \
           "metric" in r.stderr


@pytest.mark.parametrize("body, line", [
    ("inputs:\n  x: {shape: [batch, 32, 1]}\nnodes:\n"
     "  a: {op: lstm, in: x, hidden: 1000000000000}\noutputs: [a]\n", 6),
    ("inputs:\n  x: {shape: [batch, 100000, 1000000]}\nnodes:\n  a: {op: relu, in: x}\n"
     "outputs: [a]\n", 4),
])
def test_validate_runs_the_memory_check(tmp_path, body, line):
    spec = tmp_path / "big.yaml"
    spec.write_text("dlgraph: 1\nname: big\n" + body)
    r = _cli("validate", spec)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: {spec}:{line}: this graph needs about ")
    assert "of memory here\n  help: use smaller layers or a smaller batch" in r.stderr


# ------------------------------------------------------------------ D. validate = run


RUN_ALIKE = ["train_freeze_no_match", "train_freeze_everything", "train_init_from_missing",
             "train_init_from_nothing_matches", "train_init_from_rename_collides",
             "train_init_from_deep_header", "train_early_stopping_not_logged",
             "train_best_checkpoint_not_logged", "train_plateau_not_logged",
             "train_tensorboard_file", "train_samples_over_cap", "train_npz_member_bomb"]


@pytest.mark.parametrize("name", RUN_ALIKE)
def test_run_stops_where_validate_does_before_any_run_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(ROOT)                 # the fixture's text names it from the repository
    bad = Path(f"tests/specs/bad/{name}.yaml")
    expected = Path(f"{bad}.err").read_text()
    r = _cli("run", bad, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 1 and r.stderr == expected
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ I. the Python API


def test_a_compiled_model_refuses_labels_and_ids_out_of_range():
    g = dlgraph.load("dlgraph: 1\nname: ids\ninputs:\n  t: {shape: [batch], dtype: int32}\n"
                     "  y: {shape: [batch], dtype: int32}\nnodes:\n"
                     "  e: {op: embedding, in: t, num: 5, dim: 3}\n"
                     "  logits: {op: linear, in: e, out: 4}\n"
                     "  loss: {op: cross_entropy, in: [logits, y]}\noutputs: [loss]\n")
    model = dlgraph.compile(g)
    with pytest.raises(DataError) as info:
        model(t=np.array([0, 5]), y=np.array([0, 1]))
    assert str(info.value) == ("row 1 of 't' holds the id 5, but node 'e' (embedding) takes ids "
                               "0 to 4\n  help: make num at least 6")
    with pytest.raises(DataError, match="row 0 of 'y' holds the label 4, but node 'loss' "
                                        r"\(cross_entropy\) takes labels 0 to 3"):
        model(t=np.array([0, 1]), y=np.array([4, 1]))
    assert np.isfinite(model(t=np.array([0, 4]), y=np.array([3, 0]))["loss"]).all()



def test_batch_norm_over_one_sample_per_ray_worker_is_refused(tmp_path):
    g = dlgraph.load("dlgraph: 1\nname: bn\ninputs:\n  x: {shape: [batch, 2]}\n"
                     "  y: {shape: [batch], dtype: int32}\nnodes:\n"
                     "  h: {op: batch_norm, in: x}\n  logits: {op: linear, in: h, out: 2}\n"
                     "  loss: {op: cross_entropy, in: [logits, y]}\noutputs: [logits]\n"
                     "train:\n  data: {source: spirals, samples: 64, classes: 2}\n"
                     "  batch: 4\n  objective: loss\n  optimizer: {type: sgd, lr: 0.1}\n")
    with pytest.raises(SpecError) as info:     # refused before Ray is imported or started
        dlgraph.train(g, workers=4, out=tmp_path / "r", quiet=True)
    assert str(info.value) == (
        "<string>:13: batch 1 per worker (4 over 4 workers) cannot train h: batch_norm needs "
        "more than one sample per batch to compute its statistics\n"
        "  help: use a batch of 2 or more, or layer_norm")


def test_a_broken_ray_install_is_one_line(tmp_path, monkeypatch):
    fake = types.ModuleType("ray")

    def broken(name):
        raise RuntimeError("Descriptors cannot be created directly (protobuf)\nmore")
    fake.__getattr__ = broken                     # `from ray import tune` fails inside Ray
    monkeypatch.setitem(sys.modules, "ray", fake)
    r = _cli("sweep", _sweep_spec(tmp_path), "--param", "train.optimizer.lr=0.1,0.01",
             "--out", tmp_path / "sw")
    assert r.exit_code == 1, r.output
    assert r.stderr == ("error: Ray is installed but cannot be imported: RuntimeError: "
                        "Descriptors cannot be created directly (protobuf)\n  help: reinstall "
                        "it: pip install --force-reinstall 'dlgraph[ray]'\n")


def test_a_npz_member_without_the_npy_suffix_is_sized_too(tmp_path):
    # NumPy reads any member that starts with the .npy magic as an array, whatever its name
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.writestr("x", _npy_header((10**12,)))
    from dlgraph.engine.io.data import load_data
    with pytest.raises(DataError, match=r"the arrays of this archive \(x \[1000000000000\] "
                                        r"float32\) would take 3.6 TiB of memory"):
        load_data({"source": "npy", "path": "d.npz"}, tmp_path, 0)


def test_command_line_values_are_read_by_the_spec_rules():
    from dlgraph.engine.spec.parse import parse_value
    from dlgraph.engine.train.sweep_plan import parse_param
    assert parse_value("{source: spirals, samples: 010, on: 1}", "--data") == \
        {"source": "spirals", "samples": 10, "on": 1}
    assert parse_param("nodes.fc1.out=010,0o10,1e2").values == [10, 8, 100]
    assert parse_param("train.optimizer.type=on,off").values == ["on", "off"]


def test_ids_given_as_whole_floats_or_lists_are_checked_too():
    g = dlgraph.load("dlgraph: 1\nname: ids\ninputs:\n  x: {shape: [batch, 2]}\n"
                     "  y: {shape: [batch], dtype: int32}\nnodes:\n"
                     "  logits: {op: linear, in: x, out: 3}\n"
                     "  loss: {op: cross_entropy, in: [logits, y]}\noutputs: [loss]\n")
    model = dlgraph.compile(g)
    x = np.zeros((2, 2), np.float32)
    for y in ([0.0, 3.0], [0, 3], np.array([0, 3], np.int64)):
        with pytest.raises(DataError, match="row 1 of 'y' holds the label 3"):
            model(x=x, y=y)
