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
    from dlgraph.engine.compile import tinygrad_door as door
    from dlgraph.engine.compile.lower import LoopStage
    from dlgraph.engine.compile.model import Model

    def held(batch):
        m = Model(g)
        m(**m.random_inputs(batch, 0))
        jits, loop_buffers = [], []
        for st in m._program.stages:
            if isinstance(st, LoopStage):
                compiled = list(st._compiled.values())[0]
                jits += compiled[1:]
                loop_buffers += compiled[0]
            else:
                jits += [j for _, j, _ in st._jits.values()]
        return door.held_bytes(jits, list(m.params.values()), loop_buffers)
    return (held(large) - held(small)) / (large - small)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "lstm", "autoencoder"])
def test_activation_memory_is_within_2x_of_what_tinygrad_allocates(name):
    g = dlgraph.load(ROOT / "graphs" / f"{name}.yaml")
    said = 4 * summarize(g).activation_floats
    real = _allocated_per_sample(g)
    assert real / 2 <= said <= real * 2, (said, real)
