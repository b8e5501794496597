"""The program cache as a user meets it: a second run loads every compiled stage instead of
compiling it, trains exactly as a fresh compile does, and never trusts a bad entry.

Each test has its own cache directory. The state a capture touches (parameters, Adam's
moments, batch-norm statistics, dropout's random generator) must be this run's: the cached
and the uncached run are compared bit for bit.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import run_in_new_process

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.compile.cache import FORMAT, ProgramCache
from dlgraph.engine.train.checkpoint import load_tensors

ROOT = Path(__file__).resolve().parent.parent

SPEC = """\
dlgraph: 1
name: cache-mlp
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  h: {op: linear, in: x, out: 16, activation: tanh}
  bn: {op: batch_norm, in: h}
  d: {op: dropout, in: bn, p: 0.2}
  logits: {op: linear, in: d, out: 2}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 256}
  batch: 32
  epochs: 2
  objective: loss
  optimizer: {type: adam, lr: 0.02}
  metrics:
    - {type: accuracy, in: [logits, y]}
  validation: {split: 0.25}
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DLGRAPH_CACHE_DIR", str(d))
    return d


def _spec(tmp_path, text=SPEC, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _train(spec, out, **kw):
    said = []
    res = dlgraph.train(dlgraph.load(spec), out=out, log=said.append, **kw)
    weights = load_tensors(res.run_dir / "weights.safetensors")[0]
    return res, weights, said


def _same(a, b):
    drop = ("seconds", "time")
    assert [{k: v for k, v in h.items() if k not in drop} for h in a[0].history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in b[0].history]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)


def test_second_run_loads_every_stage_and_trains_the_same(tmp_path, cache_dir):
    spec = _spec(tmp_path)
    fresh = _train(spec, tmp_path / "r0", cache=False)
    assert not cache_dir.exists() or not list(cache_dir.glob("*.prog"))
    first = _train(spec, tmp_path / "r1")
    stored = sorted(cache_dir.glob("*.prog"))
    assert stored, "the first run stored nothing"
    assert not any("program cache" in s for s in first[2])
    second = _train(spec, tmp_path / "r2")
    loaded = [s for s in second[2] if s.startswith("loaded ")]
    assert loaded and not any(s.startswith("compiling") for s in second[2])
    assert sorted(cache_dir.glob("*.prog")) == stored
    _same(fresh, first)
    _same(fresh, second)            # weights, Adam state, running stats, dropout noise


def test_a_step_whose_state_is_too_large_to_copy_runs_first_through_tinygrad_alike(
        tmp_path, cache_dir, monkeypatch):
    """Over the bound of state a first step copies to replay itself, a fresh and a loaded
    program both run their first step through tinygrad's kernels, and still agree."""
    from dlgraph.engine.compile import tinygrad_door
    monkeypatch.setattr(tinygrad_door, "SNAPSHOT_BYTES", 0)
    spec = _spec(tmp_path)
    fresh = _train(spec, tmp_path / "r0", cache=False)
    first = _train(spec, tmp_path / "r1")
    second = _train(spec, tmp_path / "r2")
    assert any(s.startswith("loaded ") for s in second[2])
    _same(fresh, first)
    _same(fresh, second)


def _trained_in_two_processes(spec: Path, tmp_path: Path) -> list:
    """Two real processes train ``spec`` (nothing of the first one's tinygrad state is alive
    in the second): the second loads every stage the first compiled, and both train bit
    for bit alike. Returns the two runs."""
    code = ("import sys, dlgraph; r = dlgraph.train(dlgraph.load(sys.argv[1]), out=sys.argv[2]); "
            "print([(h['loss'], h.get('val_loss')) for h in r.history])")
    runs = [subprocess.run([sys.executable, "-c", code, str(spec), str(tmp_path / f"p{i}")],
                           capture_output=True, text=True, env=os.environ, timeout=300)
            for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert "compiling" not in runs[1].stderr and "from the program cache" in runs[1].stderr
    assert runs[0].stdout == runs[1].stdout
    w = [load_tensors(tmp_path / f"p{i}" / "weights.safetensors")[0] for i in range(2)]
    for k in w[0]:
        np.testing.assert_array_equal(w[0][k], w[1][k], err_msg=k)
    return runs


def test_recurrent_loops_load_in_a_new_process(tmp_path, cache_dir):
    """A real second process: nothing of the first one's tinygrad state is alive."""
    spec = _spec(tmp_path, textwrap.dedent("""\
        dlgraph: 1
        name: cache-lstm
        inputs:
          x: {shape: [batch, 6, 1]}
          y: {shape: [batch, 1]}
        nodes:
          enc: {op: lstm, in: x, hidden: 8}
          pred: {op: linear, in: enc.h, out: 1}
          loss: {op: mse, in: [pred, y]}
        outputs: [pred]
        train:
          data: {source: sine, samples: 128, length: 6}
          batch: 16
          epochs: 1
          steps: 3
          objective: loss
          optimizer: {type: adam, lr: 0.01}
        """))
    runs = _trained_in_two_processes(spec, tmp_path)
    assert "loaded" not in runs[0].stderr and "compiling" in runs[0].stderr
    assert "a loop over 6 steps backwards" in runs[1].stderr


def test_an_entry_keeps_code_not_a_steps_intermediate_values(tmp_path, cache_dir):
    """A convolution's step holds megabytes of intermediates (patches, activations and
    their gradients, packed by tinygrad into one arena): the stored entry leaves them out,
    and a new process that loads it trains bit for bit as the one that compiled it."""
    spec = _spec(tmp_path, textwrap.dedent("""\
        dlgraph: 1
        name: cache-conv
        inputs:
          x: {shape: [batch, 1, 28, 28]}
          y: {shape: [batch], dtype: int32}
        nodes:
          c: {op: conv2d, in: x, out: 16, kernel: 3, activation: relu}
          p: {op: max_pool2d, in: c, kernel: 2}
          f: {op: flatten, in: p}
          logits: {op: linear, in: f, out: 10}
          loss: {op: cross_entropy, in: [logits, y]}
        outputs: [logits]
        train:
          data: {source: images, samples: 256, size: 28, channels: 1, classes: 10}
          batch: 64
          epochs: 1
          steps: 3
          objective: loss
          optimizer: {type: adam, lr: 0.01}
        """))
    _trained_in_two_processes(spec, tmp_path)
    activations = 64 * 16 * 26 * 26 * 4                 # one of the step's intermediates
    sizes = [p.stat().st_size for p in cache_dir.glob("*.prog")]
    assert sizes and max(sizes) < activations / 2, sizes


def test_what_an_entry_remembers_of_its_programs_is_what_tinygrad_works_out(tmp_path,
                                                                           cache_dir):
    """An entry keeps each kernel's machine code and launch information, not its AST, and
    the buffers each program writes (worked out once, when it is stored): those are the
    ones tinygrad finds in the loaded program itself."""
    from dlgraph.engine.compile.tinygrad_door import stored_captures
    _train(_spec(tmp_path), tmp_path / "r")
    entries = sorted(cache_dir.glob("*.prog"))
    assert entries
    for path in entries:
        caps = stored_captures(path.read_bytes()[len(FORMAT) + 32:])
        assert caps
        for c in caps:
            assert c["written"] and c["written"] == c["found"]
            assert c["kernels"] and all(ops == 0 and code for ops, code in c["kernels"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "other-key"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, cache_dir, damage):
    spec = _spec(tmp_path)
    good = _train(spec, tmp_path / "r1", epochs=1)
    for p in cache_dir.glob("*.prog"):
        blob = p.read_bytes()
        if damage == "flip":
            blob = blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:]
        elif damage == "truncate":
            blob = blob[: len(blob) // 2]
        elif damage == "empty":
            blob = b""
        else:   # a well-formed entry signed with someone else's key
            other = ProgramCache(tmp_path / "elsewhere")
            payload = blob[len(FORMAT) + 32:]
            blob = FORMAT + other._sign(payload) + payload
        p.write_bytes(blob)
    again = _train(spec, tmp_path / "r2", epochs=1)
    assert not any(s.startswith("loaded ") for s in again[2])
    _same(good, again)
    third = _train(spec, tmp_path / "r3", epochs=1)       # rebuilt entries load again
    assert any(s.startswith("loaded ") for s in third[2])
    _same(good, third)


def test_a_signed_entry_naming_other_code_is_never_run(tmp_path, cache_dir):
    """Defence in depth: even an entry with a valid signature may only build tinygrad's
    own objects; a pickle that would call os.system is discarded, and the run compiles."""
    spec = _spec(tmp_path)
    _train(spec, tmp_path / "r1", epochs=1)
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    cache = ProgramCache(cache_dir)
    entries = list(cache_dir.glob("*.prog"))
    for p in entries:
        cache.store(p.stem, pickle.dumps(Evil()))
    again = _train(spec, tmp_path / "r2", epochs=1)
    assert not marker.exists()
    assert not any(s.startswith("loaded ") for s in again[2])


def test_a_changed_computation_never_reuses_another_specs_program(tmp_path, cache_dir):
    spec = _spec(tmp_path)
    _train(spec, tmp_path / "r1", epochs=1)
    n = len(list(cache_dir.glob("*.prog")))
    for i, change in enumerate([("out: 16", "out: 12"), ("p: 0.2", "p: 0.0"),
                                ("batch: 32", "batch: 16"), ("lr: 0.02", "lr: 0.02, b1: 0")]):
        other = _spec(tmp_path, SPEC.replace(*change), f"other{i}.yaml")
        res = _train(other, tmp_path / f"o{i}", epochs=1)
        assert not any(s.startswith("loaded ") for s in res[2]), change
        fresh = _train(other, tmp_path / f"f{i}", epochs=1, cache=False)
        _same(fresh, res)
        assert len(list(cache_dir.glob("*.prog"))) > n, change
        n = len(list(cache_dir.glob("*.prog")))


RUNTIME_EDITS = [("lr: 0.02", "lr: 0.05"), ("p: 0.2", "p: 0.35"),
                 ("lr: 0.02", "lr: 0.02, b1: 0.8, b2: 0.99, eps: 0.001"),
                 ("  objective: loss", "  objective: loss\n  clip: 0.5")]


@pytest.mark.parametrize("edit", RUNTIME_EDITS, ids=["lr", "dropout-p", "betas", "clip"])
def test_a_changed_runtime_value_reuses_the_program_and_computes_with_the_new_value(
        tmp_path, cache_dir, edit):
    """Learning rate, dropout probability, Adam's betas and eps, the clip norm: read from
    buffers by the compiled step, so an edit loads every stage from the cache, and the run
    is the one a fresh compile of the edited spec makes, bit for bit."""
    base = SPEC.replace("  objective: loss", "  objective: loss\n  clip: 2.0") \
        if "clip" in edit[1] else SPEC
    _train(_spec(tmp_path, base), tmp_path / "r0", epochs=1)
    other = _spec(tmp_path, base.replace(*edit) if "clip" not in edit[1]
                  else base.replace("clip: 2.0", "clip: 0.5"), "edited.yaml")
    res = _train(other, tmp_path / "r1", epochs=1)
    assert any(s.startswith("loaded ") for s in res[2]), res[2]
    assert not any(s.startswith("compiling") for s in res[2]), res[2]
    fresh = _train(other, tmp_path / "f1", epochs=1, cache=False)
    _same(fresh, res)
    before = _train(_spec(tmp_path, base, "base2.yaml"), tmp_path / "r2", epochs=1,
                    cache=False)
    assert any((before[1][k] != res[1][k]).any() for k in res[1])   # the new value counted


def test_no_cache_flag_and_off_switch(tmp_path, cache_dir, monkeypatch):
    spec = _spec(tmp_path)
    r = CliRunner().invoke(main, ["run", str(spec), "--no-cache", "--steps", "2",
                                  "--out", str(tmp_path / "r1")])
    assert r.exit_code == 0, r.output
    assert not cache_dir.exists() or not list(cache_dir.glob("*.prog"))
    monkeypatch.setenv("DLGRAPH_CACHE_DIR", "off")
    _train(spec, tmp_path / "r2", steps=2)
    assert not cache_dir.exists() or not list(cache_dir.glob("*.prog"))


def test_a_cache_others_may_write_is_not_used(tmp_path, cache_dir):
    cache_dir.mkdir(mode=0o700)
    os.chmod(cache_dir, 0o777)
    res = _train(_spec(tmp_path), tmp_path / "r1", steps=2)
    assert any("is not private to this user" in s and "running without it" in s
               for s in res[2])
    assert not list(cache_dir.glob("*.prog"))


def test_compiled_models_use_the_cache_too(tmp_path, cache_dir):
    g = dlgraph.load(ROOT / "graphs/mlp.yaml")
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    a = dlgraph.compile(g, seed=3)(x=x)
    assert list(cache_dir.glob("*.prog"))
    b = dlgraph.compile(g, seed=3)(x=x)
    c = dlgraph.compile(g, seed=3, cache=False)(x=x)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])


def test_sharded_training_is_never_cached(tmp_path, cache_dir):
    """State split over devices cannot be swapped for placeholders: such runs compile."""
    spec = _spec(tmp_path)
    devs = ["cpu:0", "cpu:1"]
    a = _train(spec, tmp_path / "r1", epochs=1, devices=devs)
    b = _train(spec, tmp_path / "r2", epochs=1, devices=devs)
    assert not any(s.startswith("loaded ") for s in b[2])
    _same(a, b)


def test_cache_command_reports_and_clears(tmp_path, cache_dir):
    _train(_spec(tmp_path), tmp_path / "r1", steps=2)
    n = len(list(cache_dir.glob("*.prog")))
    size = sum(p.stat().st_size for p in cache_dir.glob("*.prog")) / 2**20
    r = CliRunner().invoke(main, ["cache"])
    assert r.exit_code == 0
    assert r.output.startswith(f"program cache {cache_dir}: {n} compiled programs, "
                               f"{size:.1f} MiB")
    k = len(list((cache_dir / "kernels").glob("*.prog")))
    ksize = sum(p.stat().st_size for p in (cache_dir / "kernels").glob("*.prog")) / 2**20
    assert k > 0 and f"; {k} generated kernels, {ksize:.1f} MiB" in r.output
    r = CliRunner().invoke(main, ["cache", "--clear"])
    assert r.output == (f"removed {n} compiled programs ({size:.1f} MiB) and {k} kernels "
                        f"({ksize:.1f} MiB) from {cache_dir}\n")
    assert not list(cache_dir.glob("*.prog")) and (cache_dir / "key").is_file()
    assert not list((cache_dir / "kernels").glob("*.prog"))


def test_the_chosen_device_is_remembered_and_a_stale_choice_reprobed(cache_dir, monkeypatch):
    from dlgraph.engine.compile.cache import remembered_device
    from dlgraph.engine.compile.device import use_device
    from dlgraph.engine.compile.tinygrad_door import select_device

    def fresh():
        monkeypatch.delenv("DEV", raising=False)
        select_device("")

    fresh()
    first = use_device(None)
    assert remembered_device() == first == json.loads(
        (cache_dir / "device.json").read_text())["device"]
    fresh()
    assert use_device(None) == first
    for bad in ['{"device": "NOPE", "hardware": "%s"}', "not json", '["CPU"]']:
        hw = json.loads((cache_dir / "device.json").read_text()).get("hardware", "")
        (cache_dir / "device.json").write_text(bad.replace("%s", hw) if "%s" in bad else bad)
        fresh()
        assert use_device(None) == first
        assert remembered_device() == first
    fresh()


def test_a_new_process_opens_the_cpu_device_without_generating_its_programs(cache_dir):
    """tinygrad's CPU device generates its own helper programs each time a process opens
    it; with the kernel cache the second process loads them (0.3 s of every start)."""
    code = textwrap.dedent("""
        from dlgraph.engine.compile.cache import default_cache, kernel_cache
        from dlgraph.engine.compile.device import use_device
        use_device("cpu")
        print(*kernel_cache(default_cache()).take_counts()[:2])
    """)
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "DLGRAPH_CACHE_DIR": str(cache_dir)},
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    (loaded0, made0), (loaded1, made1) = (map(int, r.stdout.split()) for r in runs)
    assert made0 >= 4 and loaded0 == 0         # four helper programs and the probe's kernel
    assert made1 == 0 and loaded1 == made0


@pytest.mark.parametrize("spec", ["mlp", "lstm"])
def test_parameters_replaced_after_compiling_are_the_ones_used_and_stored(cache_dir, spec):
    """Tests and users swap tensors in `model.params` before the first call; the stored
    program must take them as parameters, never as constants baked into the entry."""
    from tinygrad import Tensor
    g = dlgraph.load(ROOT / "graphs" / f"{spec}.yaml")
    rng = np.random.default_rng(0)
    x = dlgraph.compile(g, cache=False).random_inputs(3, 1)

    def swapped(**kw):
        m = dlgraph.compile(g, seed=0, **kw)
        for k, v in m.params.items():
            m.params[k] = Tensor(rng.normal(size=v.shape).astype(np.float32)).realize()
        return m

    first = swapped()(**x)
    assert list(cache_dir.glob("*.prog"))
    rng = np.random.default_rng(1)
    again, fresh = swapped()(**x), None
    rng = np.random.default_rng(1)
    fresh = swapped(cache=False)(**x)
    for k in fresh:
        np.testing.assert_array_equal(again[k], fresh[k])
        assert np.abs(first[k] - fresh[k]).max() > 1e-3       # other weights, other outputs


def test_a_symbolic_length_program_loads_in_a_new_process(tmp_path, cache_dir):
    """A program compiled for every length up to dims.time.max is stored once and a second
    process loads it and runs lengths the first never ran, matching a fresh compile."""
    spec = _spec(tmp_path, textwrap.dedent("""\
        dlgraph: 1
        name: cache-varlen
        inputs:
          x: {shape: [batch, time, 2]}
          m: {shape: [batch, time]}
        dims:
          time: {max: 12}
        nodes:
          enc: {op: gru, in: x, mask: m, hidden: 8, bidirectional: true}
        outputs: [enc, enc.h]
        """))
    code = ("import sys, numpy as np, dlgraph; m = dlgraph.compile(dlgraph.load(sys.argv[1])); "
            "rng = np.random.default_rng(0); out = []\n"
            "for t in [int(a) for a in sys.argv[2:]]:\n"
            "    x = rng.standard_normal((3, t, 2)).astype(np.float32)\n"
            "    mask = (np.arange(t)[None] < np.array([[t], [1], [t // 2 + 1]])).astype("
            "np.float32)\n"
            "    out.append(round(float(np.abs(m(x=x, m=mask)['enc.h']).sum()), 4))\n"
            "print(out)")

    def run(*lengths, env=os.environ):
        r = subprocess.run([sys.executable, "-c", code, str(spec), *map(str, lengths)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    first = run(12)
    stored = [p.name for p in ProgramCache(cache_dir).entries()]
    assert stored
    second = run(12, 5, 9)      # loads; nothing new is compiled, so nothing new is stored
    assert [p.name for p in ProgramCache(cache_dir).entries()] == stored
    fresh = run(12, 5, 9, env={**os.environ, "DLGRAPH_CACHE_DIR": "off"})
    assert second.stdout == fresh.stdout and first.stdout.strip("[]\n") in second.stdout


# ------------------------------------------------------------------------ the kernel cache


def _kernel_line(text):
    import re
    m = re.search(r"compiled the training step.*; (\d+) from the kernel cache, (\d+) generated",
                  text)
    assert m, text
    return int(m[1]), int(m[2])


def test_specs_that_share_layers_share_their_kernels_across_processes(tmp_path, cache_dir):
    """Renamed nodes, then a different output layer: a new program each time
    (the program cache misses), its kernels loaded wherever the computation is the same;
    the numbers exactly those of a fresh compile."""
    spec = _spec(tmp_path)
    first = _kernel_line(run_in_new_process(spec, tmp_path / "r0", cache_dir, "--steps", "3"))
    assert first[0] == 0 and first[1] > 0
    kept = len(list((cache_dir / "kernels").glob("*.prog")))
    assert kept >= first[1]
    # renamed nodes: another program (the program cache misses), the same computation
    lr = _spec(tmp_path, SPEC.replace("  h:", "  hidden:").replace("in: h}", "in: hidden}")
               .replace("lr: 0.02", "lr: 0.05"), "lr.yaml")
    loaded, made = _kernel_line(run_in_new_process(lr, tmp_path / "r1", cache_dir, "--steps", "3"))
    assert (loaded, made) == (first[1], 0)        # every kernel shared
    fresh = run_in_new_process(lr, tmp_path / "f1", tmp_path / "empty", "--steps", "3")
    assert _kernel_line(fresh)[0] == 0
    for name in ("weights.safetensors", "checkpoint.safetensors"):
        a, b = (load_tensors(tmp_path / r / name)[0] for r in ("r1", "f1"))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    wide = _spec(tmp_path, SPEC.replace("out: 16", "out: 24"), "wide.yaml")
    loaded, made = _kernel_line(run_in_new_process(wide, tmp_path / "r2", cache_dir, "--steps",
                                                   "3"))
    assert loaded > 0 and made > 0                # the loss and Adam's scalar kernels shared


TWO_CORES = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no helper process")


@TWO_CORES
def test_a_second_process_generates_kernels_and_the_numbers_are_the_same(tmp_path):
    """On two cores, a forked copy of the process generates about half of the new kernels
    (the run's line counts them); weights and checkpoint bit for bit those of a process
    that generates every kernel itself."""
    spec = _spec(tmp_path, SPEC.replace("out: 16", "out: 21"))
    helped = run_in_new_process(spec, tmp_path / "a", tmp_path / "ca", "--steps", "3")
    alone = run_in_new_process(spec, tmp_path / "b", tmp_path / "cb", "--steps", "3",
                            env={"DLGRAPH_COMPILE_HELPER": "0"})
    import re
    beside = [int(n) for n in re.findall(r"\((\d+) of them by a second process\)", helped)]
    assert sum(beside) > 0, helped
    assert "second process" not in alone
    assert _kernel_line(helped)[1] == _kernel_line(alone)[1]
    for name in ("weights.safetensors", "checkpoint.safetensors"):
        a, b = (load_tensors(tmp_path / r / name)[0] for r in ("a", "b"))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@TWO_CORES
def test_a_helper_that_hangs_is_stopped_and_its_kernels_generated_here(monkeypatch):
    """A helper process that finishes no kernel for HELPER_STALL seconds is killed; this
    process generates what it had taken, and the model's answer is right."""
    import time

    from dlgraph.engine.compile import tinygrad_door as door
    parent, real = os.getpid(), door.to_program

    def stuck_in_helper(ast, renderer):
        if os.getpid() != parent:
            time.sleep(600)
        return real(ast, renderer)

    monkeypatch.setattr(door, "to_program", stuck_in_helper)
    monkeypatch.setattr(door, "HELPER_STALL", 1.0)
    monkeypatch.setattr(door, "_HELPER", [True])
    killed, kill = [], os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: (killed.append(pid), kill(pid, sig)))
    import yaml
    g = dlgraph.load(yaml.safe_load(SPEC.replace("out: 16", "out: 19")))
    model = dlgraph.compile(g, seed=5, cache=False)
    x = np.random.default_rng(1).normal(size=(7, 2)).astype(np.float32)
    t0 = time.monotonic()
    got = model(x=x)["logits"]
    assert time.monotonic() - t0 < 60 and len(killed) >= 1
    p = {k: v.numpy().astype(np.float64) for k, v in model.params.items()}
    h = np.tanh(x @ p["h.weight"].T + p["h.bias"])
    bn = (h - p["bn.running_mean"]) / np.sqrt(p["bn.running_var"] + 1e-5) * p["bn.weight"] \
        + p["bn.bias"]
    np.testing.assert_allclose(got, bn @ p["logits.weight"].T + p["logits.bias"], rtol=1e-5,
                               atol=1e-5)


@TWO_CORES
def test_no_helper_is_forked_from_a_thread_of_an_embedding_program(monkeypatch):
    """A model compiled from a thread of the user's program (a server's worker) compiles
    alone: another thread may hold a lock that a forked copy would never see released. From
    the main thread a fork is tried; one the system refuses leaves the compile to this
    process."""
    import threading

    import yaml

    from dlgraph.engine.compile import tinygrad_door as door
    forks = []
    monkeypatch.setattr(door, "_HELPER", [True])
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or (_ for _ in ()).throw(OSError))
    x = np.ones((3, 2), np.float32)

    def compiled(width):
        g = dlgraph.load(yaml.safe_load(SPEC.replace("out: 16", f"out: {width}")))
        return dlgraph.compile(g, seed=1, cache=False)(x=x)["logits"]

    got = []
    t = threading.Thread(target=lambda: got.append(compiled(17)))
    t.start()
    t.join()
    assert len(got) == 1 and forks == []
    # from the main thread it forks; a fork the system refuses: compiled alone, same numbers
    again = compiled(18)
    assert forks == [1]
    np.testing.assert_array_equal(again[:, :2].shape, got[0].shape)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_kernel_entry_is_rebuilt_not_trusted(tmp_path, cache_dir, damage):
    spec = _spec(tmp_path)
    made = _kernel_line(run_in_new_process(spec, tmp_path / "r0", cache_dir, "--steps", "2"))[1]
    entries = sorted((cache_dir / "kernels").glob("*.prog"))
    for e in entries:
        blob = e.read_bytes()
        e.write_bytes(blob[:len(blob) // 2] if damage == "truncate" else
                      blob[:-1] + bytes([blob[-1] ^ 1]))
    for p in cache_dir.glob("*.prog"):               # the programs too: compile again
        p.unlink()
    loaded, again = _kernel_line(run_in_new_process(spec, tmp_path / "r1", cache_dir,
                                                 "--steps", "2"))
    assert (loaded, again) == (0, made)
    a, b = (load_tensors(tmp_path / r / "weights.safetensors")[0] for r in ("r0", "r1"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
