"""What `dlgraph summary` reports: activation memory per sample counts the values that grow
with the batch (two [batch, 1000] values of a linear 1000 -> 1000), not its weights."""

import dlgraph
from dlgraph.engine.summary import summarize

LINEAR = {"dlgraph": 1, "name": "lin", "inputs": {"x": {"shape": ["batch", 1000]}},
          "nodes": {"fc": {"op": "linear", "in": "x", "out": 1000}}, "outputs": ["fc"]}


def test_activations_per_sample_leave_weights_out():
    s = summarize(dlgraph.load(LINEAR))
    assert s.activation_floats == 2 * 1000          # x @ W^T, then + bias
    assert "activations: 7.8 KiB per sample (forward, float32)" in str(s)
    assert s.params == 1000 * 1000 + 1000
