"""`dlgraph sample` continues a prompt with characters of the training text."""

from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.io.data import vocabulary

SPEC = """dlgraph: 1
name: tiny-lm
inputs:
  x: {shape: [batch, 8], dtype: int32}
  y: {shape: [batch, 8], dtype: int32}
nodes:
  emb: {op: embedding, in: x, num: VOCAB, dim: 8}
  rnn: {op: gru, in: emb, hidden: 16}
  logits: {op: linear, in: rnn, out: VOCAB}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: text_tokens, length: 8, samples: 256}
  batch: 32
  epochs: 1
  objective: loss
  optimizer: {type: adam, lr: 0.01}
"""


def trained(tmp_path, steps):
    """A tiny character model trained a few steps: (spec path, weights, vocabulary)."""
    vocab = vocabulary(dlgraph.load(SPEC.replace("VOCAB", "2")).spec.train.data)
    path = tmp_path / "lm.yaml"
    path.write_text(SPEC.replace("VOCAB", str(len(vocab))))
    res = dlgraph.train(dlgraph.load(path), out=tmp_path / "run", steps=steps, quiet=True)
    return str(path), str(res.run_dir / "weights.safetensors"), vocab


def test_sample_from_a_trained_model(tmp_path):
    path, weights, vocab = trained(tmp_path, 3)
    r = CliRunner().invoke(main, ["sample", path, "--weights", weights,
                                  "--prompt", "First", "--length", "30"])
    assert r.exit_code == 0, r.output
    text = r.stdout.rstrip("\n")
    assert text.startswith("First") and len(text) == len("First") + 30
    assert set(text) <= set(vocab)


def test_sample_rejects_unknown_prompt_tokens(tmp_path):
    path, weights, _ = trained(tmp_path, 1)
    r = CliRunner().invoke(main, ["sample", path, "--weights", weights, "--prompt", "€"])
    assert r.exit_code == 1
    assert "the prompt has tokens the model never saw: ['€']" in r.stderr


def test_a_symbolic_length_samples_step_by_step_with_one_program(tmp_path):
    """With `x: [batch, time]` each step feeds the context as it is: one compiled program
    serves every length, and a causal model gives the text the fixed-window spec gives with
    the same weights (which feeds zero-padded windows of 8)."""
    from dlgraph.engine.report.sample import sample
    path, weights, vocab = trained(tmp_path, 3)
    fixed = dlgraph.load(path)
    text = open(path).read().replace("[batch, 8]", "[batch, time]")
    (tmp_path / "sym.yaml").write_text(text)
    sym = dlgraph.load(tmp_path / "sym.yaml")
    model = dlgraph.compile(sym, weights=weights)
    got = sample(sym, model, prompt="Fi", length=20, seed=3)
    want = sample(fixed, dlgraph.compile(fixed, weights=weights), prompt="Fi", length=20, seed=3)
    assert got == want and len(got) == 22
    prog = model._program
    assert prog.lengths.most == {"time": 8}      # the training windows' length
    assert all(len(st._compiled if hasattr(st, "_compiled") else st._jits) == 1
               for st in prog.stages)
