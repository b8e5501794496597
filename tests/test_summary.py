"""What `dlgraph summary` reports: activation memory per sample counts the values that grow
with the batch (two [batch, 1000] values of a linear 1000 -> 1000), not its weights, and
only the values tinygrad writes, while they are alive: for the examples it is within 2x of
what tinygrad's compiled program really holds per sample."""

from pathlib import Path

import pytest

import dlgraph
from dlgraph.engine.report.summary import summarize

ROOT = Path(__file__).resolve().parent.parent

LINEAR = {"dlgraph": 1, "name": "lin", "inputs": {"x": {"shape": ["batch", 1000]}},
          "nodes": {"fc": {"op": "linear", "in": "x", "out": 1000}}, "outputs": ["fc"]}


def test_activations_per_sample_leave_weights_out():
    s = summarize(dlgraph.load(LINEAR))
    assert s.activation_floats == 2 * 1000          # x @ W^T, then + bias
    assert "activations: 7.8 KiB per sample (forward, float32)" in str(s)
    assert s.params == 1000 * 1000 + 1000


def _allocated_per_sample(g, small=16, large=64) -> float:
    """What tinygrad allocates per sample for a forward pass: every buffer the compiled
    program holds (not the parameters), at two batch sizes, divided by the difference."""
    from tinygrad.uop.ops import Ops, buffers

    from dlgraph.engine.compile.lower import LoopStage
    from dlgraph.engine.compile.model import Model

    def held(batch):
        m = Model(g)
        m(**m.random_inputs(batch, 0))
        mine = {t.uop.base for t in m.params.values()}
        seen, total = set(), 0
        for st in m._program.stages:
            jits = [j for _, j, _ in st._jits.values()] if not isinstance(st, LoopStage) \
                else list(st._compiled.values())[0][1:]
            for j in jits:
                for u in getattr(j, "captured", None) and j.captured.linear.toposort() or []:
                    if u.op is Ops.BUFFER and u not in mine and u in buffers:
                        b = buffers[u]._base or buffers[u]
                        if id(b) not in seen:
                            seen.add(id(b))
                            total += b.nbytes
            if isinstance(st, LoopStage):
                total += sum(b.uop.base.buffer.nbytes for b in list(st._compiled.values())[0][0])
        return total
    return (held(large) - held(small)) / (large - small)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "lstm", "autoencoder"])
def test_activation_memory_is_within_2x_of_what_tinygrad_allocates(name):
    g = dlgraph.load(ROOT / "graphs" / f"{name}.yaml")
    said = 4 * summarize(g).activation_floats
    real = _allocated_per_sample(g)
    assert real / 2 <= said <= real * 2, (said, real)
