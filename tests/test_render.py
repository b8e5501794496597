"""Drawings (engine/report/render.py) and training curves (engine/report/plot.py).

The DOT text is checked by handing it to graphviz itself (``dot -Tjson``) where graphviz
is installed: the nodes, clusters and edge labels a user would see must be there.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import dlgraph
from dlgraph.engine.errors import DataError, DlgraphError
from dlgraph.engine.graph.autodiff import reverse, training_graph
from dlgraph.engine.graph.build import Builder
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.report.plot import family, load_series, plot_run, plot_runs, read_metrics
from dlgraph.engine.report.render import render
from dlgraph.engine.types import TType
from dlgraph.ops import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "graphs").glob("*.yaml"))
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz's dot is not installed")


# ----------------------------------------------------------------------------- helpers


def layout(text: str) -> dict:
    """graphviz's own reading of a DOT text: names, clusters and edges (tail, head, label)."""
    out = subprocess.run(["dot", "-Tjson"], input=text.encode(), capture_output=True,
                         check=True)
    data = json.loads(out.stdout)
    objects = data.get("objects", [])
    names = {o["_gvid"]: o["name"] for o in objects}
    nodes = {o["name"]: o for o in objects if "nodes" not in o}
    clusters = {o["name"]: o for o in objects if "nodes" in o}
    edges = []
    for e in data.get("edges", []):
        a, b = names[e["tail"]], names[e["head"]]
        if e.get("dir") == "back":          # drawn upwards: the value flows head -> tail
            a, b = b, a
        label = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], e.get("label", ""))
        edges.append((a, b, label))
    return {"nodes": nodes, "clusters": clusters, "edges": edges, "graph": data}


def dims(t: TType) -> str:
    s = "×".join(str(d) for d in t.shape) if t.shape else "scalar"
    return s if t.dtype == "float32" else f"{s} {t.dtype}"


def has_train(g: Graph) -> bool:
    return g.spec is not None and g.spec.train is not None


def hidden_const(n) -> bool:
    return n.op == "const" and n.type.shape == () and (bool(n.scope) or n.role == "backward")


def twin(g: Graph, n) -> tuple:
    """Where a node sits with step numbers blanked: a hidden step's node has a drawn twin."""
    scope = g[n.origin].scope if n.role == "backward" else n.scope
    return n.op, n.role, tuple(re.sub(r"\d+", "#", s) for s in scope)


def example_cases():
    for path in EXAMPLES:
        for expand in (False, True):
            yield pytest.param(path, expand, False, id=f"{path.stem}-{'x' if expand else 'f'}")
            yield pytest.param(path, expand, True, id=f"{path.stem}-{'x' if expand else 'f'}-bw")


def tiny_rnn(steps: int = 6) -> Graph:
    """An unrolled recurrence: scopes enc/t0 .. enc/t5, the first step without a state."""
    g = Graph(name="rnn")
    b = Builder(g)
    x = b.input("x", TType(("batch", steps, 3)))
    with b.within("enc"):
        w = b.param("w_ih", (3, 8), "glorot_uniform")
        u = b.param("w_hh", (8, 8), "glorot_uniform")
        h = None
        for t in range(steps):
            with b.within(f"t{t}"):
                a = b.emit("matmul", b.emit("take", x, axis=1, index=t), w)
                h = b.emit("tanh", a if h is None else b.emit("add", a, b.emit("matmul", h, u)))
    with b.within("head"):
        y = b.emit("matmul", h, b.param("weight", (8, 1), "glorot_uniform"))
    with b.within("loss"):
        loss = b.emit("mean", b.emit("mul", y, y))
    g.outputs["y"] = y
    g.aliases.update(enc=h, head=y, loss=loss)
    return g


SPEC = """dlgraph: 1
name: tiny
inputs:
  x: {shape: [batch, 4]}
nodes:
  fc: {op: linear, in: x, out: 2}
  act: {op: relu, in: fc}
outputs: [act]
"""


# ----------------------------------------------------------------------------- every example


@needs_dot
@pytest.mark.parametrize("path, expand, backward", list(example_cases()))
def test_examples_draw(path, expand, backward):
    g = dlgraph.load(path)
    if backward and not has_train(g):
        pytest.skip("no train section")
    text = render(g, expand=expand, backward=backward)
    assert render(dlgraph.load(path), expand=expand, backward=backward) == text  # stable
    got = layout(text)
    names, edges = set(got["nodes"]), got["edges"]
    labels = {(a, b): set() for a, b, _ in edges}
    for a, b, label in edges:
        labels[(a, b)].add(label)
    spec = g.spec
    if not expand:
        assert set(spec.nodes) | set(g.inputs) <= names
        for nid, nd in spec.nodes.items():
            for ref in nd.in_:
                value = g.resolve(ref)
                if any(value in n.inputs for n in g.nodes.values() if n.user_id == nid):
                    assert dims(g[value].type) in labels[(ref.split(".")[0], nid)], (ref, nid)
    else:
        composites = {nid for nid, nd in spec.nodes.items()        # module calls too
                      if nd.op not in REGISTRY or REGISTRY[nd.op].composite}
        assert {f"cluster_{c}" for c in composites} <= set(got["clusters"])
        drawn = {twin(g, g[nid]) for nid in names if nid in g.nodes}
        for n in g.nodes.values():
            if hidden_const(n):
                continue
            if n.op == "loop":      # a loop is drawn as its body, once
                body = [b for b in n.attrs.body.nodes.values() if b.role != "input"]
                assert {b.id for b in body if not hidden_const(b)} <= names, n.id
                assert any(c.get("label", "").endswith(f"× {n.attrs.steps} steps")
                           for c in got["clusters"].values()), n.id
                continue
            if n.id not in names:   # only the repeated steps of a folded loop hide
                assert twin(g, n) in drawn, n.id
                continue
            for src in n.inputs:
                if src in names and g[src].role not in ("param",) and not hidden_const(g[src]):
                    assert dims(g[src].type) in labels[(src, n.id)], (src, n.id)
    if backward:
        tg = training_graph(g, spec.train.all_phases()[0])
        assert "@optimizer" in names
        back = [n for n in tg.nodes.values() if n.role == "backward"]
        if not expand:
            boxes = {"grad:" + tg[n.origin].user_id for n in back}
            assert boxes <= names
            sources = {"grad:" + tg[tg.grads[p]].origin.split("/")[0] for p in tg.grads}
            if len(sources) <= 24:
                assert all((s, "@optimizer") in labels for s in sources)
        else:
            drawn = {twin(tg, tg[nid]) for nid in names if nid in tg.nodes}
            for n in back:
                if n.op == "loop":  # drawn as its body: the cotangent step, once
                    steps = [b.id for b in n.attrs.body.nodes.values() if b.role == "backward"]
                    assert any(b in names for b in steps), n.id
                elif not hidden_const(n) and n.id not in names:
                    assert twin(tg, n) in drawn, n.id
            assert any(c.startswith("cluster_grad:") for c in got["clusters"])


# ----------------------------------------------------------------------------- the mlp


@pytest.fixture(scope="module")
def mlp() -> Graph:
    return dlgraph.load(ROOT / "graphs" / "mlp.yaml")


def test_folded_boxes_show_op_and_parameter_count(mlp):
    text = render(mlp)
    assert "<b>fc1</b>" in text and "linear + relu · 192 params" in text   # fused relu shown
    assert '"fc1" -> "fc2" [label="batch×64"]' in text
    assert '"y" -> "loss" [label="batch int32"]' in text       # non-float dtype always shown
    assert "fc1/weight" not in text                            # parameters live in the box
    assert 'shape="octagon"' in text and 'peripheries="2"' in text


def test_shapes_and_dtypes_switches(mlp):
    assert '"fc1" -> "fc2" [label="batch×64 float32"]' in render(mlp, dtypes=True)
    assert "label=\"batch" not in render(mlp, shapes=False)


@needs_dot
def test_expand_some_and_depth(mlp):
    got = layout(render(mlp, expand=["fc1", "loss"], depth=1))
    assert {"cluster_fc1", "cluster_loss"} <= set(got["clusters"])
    assert "cluster_fc2" not in got["clusters"]
    assert {"fc2", "fc1/matmul", "fc1/weight", "loss/log_softmax"} <= set(got["nodes"])
    assert "cluster_loss/log_softmax" not in got["clusters"]
    assert got["clusters"]["cluster_fc1"]["label"] == "fc1 (linear + relu)"


@needs_dot
def test_backward_pairs_each_box_with_its_gradient(mlp):
    text = render(mlp, backward=True)
    assert "{rank=same; \"fc1\"; \"grad:fc1\";}" in text
    got = layout(text)
    edges = {(a, b): label for a, b, label in got["edges"]}
    assert edges[("grad:loss", "grad:logits")] == "batch×3"
    assert edges[("grad:fc2", "grad:fc1")] == "batch×64"
    assert edges[("grad:fc1", "@optimizer")] == "fc1.weight 64×2\nfc1.bias 64"
    assert ("fc1", "grad:fc2") in edges                    # the saved activation


def test_backward_needs_an_objective(tmp_path):
    g = dlgraph.load(SPEC)
    with pytest.raises(DlgraphError) as e:
        render(g, backward=True)
    assert str(e.value) == ("graph 'tiny' has no training objective to differentiate\n"
                            "  help: add a `train:` section with an `objective:` to the spec, "
                            "or draw it without backward")


def test_bad_arguments(mlp, tmp_path):
    with pytest.raises(DlgraphError) as e:
        render(mlp, tmp_path / "g.jpg")
    assert str(e.value) == (f"cannot write {tmp_path / 'g.jpg'}: unknown format '.jpg'\n"
                            "  help: use one of: .dot, .gv, .svg, .png, .pdf")
    with pytest.raises(DlgraphError, match="(?s)cannot expand 'fc3'.*did you mean 'fc2'"):
        render(mlp, expand=["fc3"])
    with pytest.raises(DlgraphError, match="unknown rankdir 'XY'"):
        render(mlp, rankdir="XY")
    with pytest.raises(DlgraphError, match="no training phase 'gen'"):
        render(mlp, backward="gen")


def test_training_graph_drawn_forward_only(mlp):
    tg = reverse(mlp, "loss")
    assert render(tg) == render(mlp)
    assert render(tg, backward=True) == render(mlp, backward=True)


# ----------------------------------------------------------------------------- files


@needs_dot
def test_svg_png_pdf_files(mlp, tmp_path):
    text = render(mlp, tmp_path / "g.svg", backward=True)
    assert (tmp_path / "g.svg").exists()
    ET.parse(tmp_path / "g.svg")
    render(mlp, tmp_path / "g.png", expand=True)
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    render(mlp, tmp_path / "sub" / "g.pdf")
    assert (tmp_path / "sub" / "g.pdf").read_bytes()[:5] == b"%PDF-"
    render(mlp, tmp_path / "g.dot", backward=True)
    assert (tmp_path / "g.dot").read_text() == text


def test_missing_dot_program(mlp, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    path = tmp_path / "g.svg"
    with pytest.raises(DlgraphError) as e:
        render(mlp, path)
    assert str(e.value) == (f"cannot write {path}: graphviz's `dot` program is not installed\n"
                            "  help: install graphviz (apt-get install graphviz), or write .dot")
    assert not path.exists()
    render(mlp, tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text().startswith('digraph "mlp-spirals" {')


@needs_dot
def test_labels_are_escaped(tmp_path):
    name = 'say "hi" \\ <b>&'
    doc = 'a "doc" with \\n, <tags> & more'
    spec = SPEC.replace("name: tiny", f"name: '{name}'").replace(
        "{op: relu, in: fc}", f"{{op: relu, in: fc, doc: '{doc}'}}")
    g = dlgraph.load(spec)
    render(g, tmp_path / "g.svg")
    svg = ET.parse(tmp_path / "g.svg").getroot()
    texts = ["".join(t.itertext()) for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert name in texts
    titles = [v for el in svg.iter() for k, v in el.attrib.items() if k.endswith("title")]
    assert doc in titles


# ----------------------------------------------------------------------------- repetitions


@needs_dot
def test_unrolled_steps_fold_into_one():
    g = tiny_rnn(6)
    got = layout(render(g, expand=True))
    assert got["clusters"]["cluster_enc/t1"]["label"] == "t1 … t5 × 5"
    assert "cluster_enc/t2" not in got["clusters"]
    assert "enc/t2/matmul" not in got["nodes"] and "enc/t1/matmul" in got["nodes"]
    loops = [(a, b) for a, b, label in got["edges"] if label.startswith("next step")]
    assert loops == [("enc/t1/tanh", "enc/t1/matmul_1")]
    # folded one level down, the repeated step is one box with a loop on itself
    got = layout(render(g, expand=True, depth=1))
    assert {"enc/t0", "enc/t1"} <= set(got["nodes"]) and "enc/t2" not in got["nodes"]
    assert ("enc/t1", "enc/t1", "next step\nbatch×8") in got["edges"]
    assert ("enc/t1", "head/matmul", "batch×8") in got["edges"]


@needs_dot
def test_unrolled_backward_folds_too():
    tg = reverse(tiny_rnn(6), "loss")
    text = render(tg, expand=True, backward=True)
    assert text == render(tg, expand=True, backward=True)
    got = layout(text)
    folded = [c["label"] for c in got["clusters"].values() if "×" in c["label"]]
    assert "t1 … t5 × 5" in folded and any(lbl.startswith("∇ ") for lbl in folded)


REPEATS = """dlgraph: 1
name: repeats
modules:
  gate:
    inputs: [v]
    nodes:
      l: {op: linear, in: v, out: 4, activation: sigmoid}
    outputs: [l]
  cell:                        # two gates side by side, as a GRU's reset and update gates
    inputs: [v]
    nodes:
      gate1: {op: gate, in: v}
      gate2: {op: gate, in: v}
      m: {op: mul, in: [gate1, gate2]}
    outputs: [m]
  chain:                       # the same step three times, each on the one before
    inputs: [v]
    nodes:
      step1: {op: gate, in: v}
      step2: {op: gate, in: step1}
      step3: {op: gate, in: step2}
    outputs: [step3]
inputs:
  x: {shape: [batch, 4]}
nodes:
  c: {op: cell, in: x}
  r: {op: chain, in: c}
outputs: [r]
"""


@needs_dot
def test_only_chains_of_identical_steps_fold():
    got = layout(render(dlgraph.load(REPEATS), expand=True))
    labels = {c["label"] for c in got["clusters"].values()}
    assert {"gate1 (gate)", "gate2 (gate)"} <= labels      # parallel gates: drawn apart
    assert "step1 … step3 × 3 (gate)" in labels            # a chain of the same step: folded
    assert not any("gate1 …" in lbl for lbl in labels)
    assert "r/step2/l/matmul" not in got["nodes"]
    assert "l (linear + sigmoid)" in labels                # a module's layer says what it is


@needs_dot
def test_transformer_block_norms_are_drawn_apart():
    g = dlgraph.load(ROOT / "graphs" / "transformer.yaml")
    got = layout(render(g, expand=["block1"]))
    labels = [c["label"] for c in got["clusters"].values()]
    assert "norm1" in labels and "norm2" in labels
    assert not any("×" in lbl for lbl in labels)
    # every primitive of both norms is drawn: none hides behind the other
    drawn = set(got["nodes"])
    for n in g.nodes.values():
        if n.scope[:2] in (("block1", "norm1"), ("block1", "norm2")) and not hidden_const(n) \
                and n.role != "param":
            assert n.id in drawn, n.id


def test_fused_activation_is_shown():
    text = render(dlgraph.load(ROOT / "graphs" / "mlp.yaml"), expand=["fc1"])
    assert 'label="fc1 (linear + relu)"' in text
    assert "linear + relu · 4,160 params" in text          # fc2, still folded
    # a transformer block's `activation` is its feed-forward's, not applied to its output
    assert "+ relu" not in render(dlgraph.load(ROOT / "graphs" / "transformer.yaml"))


# ----------------------------------------------------------------------------- size


def test_large_graph_text_is_quick():
    layers = "\n".join(f"  fc{i}: {{op: linear, in: {'x' if i == 0 else f'fc{i - 1}'}, "
                       f"out: 8, activation: relu}}" for i in range(80))
    g = dlgraph.load(f"dlgraph: 1\nname: deep\ninputs:\n  x: {{shape: [batch, 8]}}\n"
                     f"nodes:\n{layers}\n  loss: {{op: mse, in: [fc79, x]}}\noutputs: [fc79]\n"
                     "train:\n  data: {source: sine, samples: 64}\n  objective: loss\n"
                     "  optimizer: {type: sgd}\n")
    text = render(g, expand=True, backward=True)
    assert text.count("subgraph") >= 160
    assert "80 parameter gradients" not in text       # 160: weights and biases
    assert "160 parameter gradients, from the nodes outlined in purple" in text


# ----------------------------------------------------------------------------- plots


def write_run(folder: Path, lines: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return folder


def good_lines(scale: float = 1.0) -> list:
    rows, step = [], 0
    for epoch in range(1, 4):
        for _ in range(5):
            step += 1
            rows.append({"kind": "step", "epoch": epoch, "step": step, "loss": scale / step})
        rows.append({"kind": "epoch", "epoch": epoch, "step": step, "seconds": 0.1 * epoch,
                     "loss": scale / step, "val_loss": 1.2 * scale / step,
                     "val_accuracy": 0.5 + 0.1 * epoch})
    return rows


def test_plot_run_writes_png(tmp_path):
    run = write_run(tmp_path / "run", good_lines())
    out = plot_run(run)
    assert out == run / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_several_runs(tmp_path):
    a = write_run(tmp_path / "a", good_lines())
    b = write_run(tmp_path / "b", good_lines(2.0))
    out = plot_runs([a, b], tmp_path / "out" / "both.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series, x = load_series([a, b])
    assert x == "step"
    assert {(s.run, s.key, s.kind) for s in series} >= {("a", "loss", "step"),
                                                        ("b", "val_accuracy", "epoch")}
    assert not any(s.key == "seconds" for s in series)


def test_metric_families():
    assert [family(k) for k in ("loss", "val_loss", "loss_generator", "val_accuracy",
                                "val_mse")] == ["loss", "loss", "loss", "accuracy", "mse"]


def test_epochs_when_steps_are_absent(tmp_path):
    run = write_run(tmp_path / "r", [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}])
    series, x = load_series([run])
    assert x == "epoch" and series[0].xs == [1.0, 2.0]
    assert plot_run(run).exists()


def test_malformed_metrics(tmp_path):
    run = write_run(tmp_path / "r", [good_lines()[0], "not json", good_lines()[1]])
    path = run / "metrics.jsonl"
    with pytest.raises(DataError) as e:
        plot_run(run)
    assert str(e.value) == (f"{path}:2: not valid JSON: Expecting value (column 1)\n"
                            "  help: each line of metrics.jsonl is one JSON object, "
                            "as `dlgraph run` writes it when training")
    write_run(run, [good_lines()[0], [1, 2]])
    with pytest.raises(DataError, match=r"metrics.jsonl:2: expected a JSON object, got a list"):
        read_metrics(path)


def test_missing_and_empty_metrics(tmp_path):
    with pytest.raises(DataError) as e:
        plot_run(tmp_path / "nothing")
    assert str(e.value).startswith(f"{tmp_path / 'nothing' / 'metrics.jsonl'}: no such file\n")
    run = write_run(tmp_path / "empty", [])
    with pytest.raises(DataError) as e:
        plot_run(run)
    assert str(e.value).startswith(f"{run / 'metrics.jsonl'}: no metrics: the file is empty")
    run = write_run(tmp_path / "words", [{"epoch": 1, "note": "hi"}])
    with pytest.raises(DataError, match="no numeric metrics to plot"):
        plot_run(run)


def test_a_line_still_being_written_is_skipped(tmp_path):
    run = write_run(tmp_path / "r", good_lines())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "epo')
    assert len(read_metrics(run / "metrics.jsonl")) == len(good_lines())


@needs_dot
def test_a_scanned_module_cell_is_marked_once():
    """The loop note sits on the step's own cluster, not on every layer inside the cell."""
    got = layout(render(dlgraph.load(ROOT / "graphs" / "custom_cell.yaml"), expand=True))
    noted = [c["label"] for c in got["clusters"].values() if "steps" in c["label"]]
    assert noted == ["cell × 16 steps"]
    labels = {c["label"] for c in got["clusters"].values()}
    assert {"hf (linear)", "xf (linear)"} <= labels          # the gates, each drawn, once


# -- one level of a module: --expand NODE --depth N -----------------------------------------
RESNET = ROOT / "tests/specs/good/resnet_modules.yaml"


def box_label(node: dict) -> str:
    """A drawn box's text as a user reads it: its lines joined by ' | '."""
    text = re.sub(r"<br/>", " | ", node["label"])
    return re.sub(r"<[^>]+>", "", text)


def inside(got: dict, cluster: str) -> set[str]:
    """The names of the nodes drawn directly in a cluster (not in its sub-clusters)."""
    c = got["clusters"][cluster]
    names = {o["_gvid"]: o["name"] for o in got["graph"]["objects"]}
    nested = {n for o in got["graph"]["objects"] if "nodes" in o and o["name"] != cluster
              and o["_gvid"] in c.get("subgraphs", []) for n in o["nodes"]}
    return {names[n] for n in c["nodes"] if n not in nested}


@needs_dot
def test_depth_draws_a_modules_layers_without_their_insides():
    g = dlgraph.load(RESNET)
    whole = layout(render(g, expand=["b"]))
    got = layout(render(g, expand=["b"], depth=1))
    assert set(got["clusters"]) == {"cluster_b"}
    assert inside(got, "cluster_b") == {"b/c1", "b/c2", "b/sum", "b/out"}
    # each layer of the module is one box saying what it is, as the spec's own nodes do
    assert box_label(got["nodes"]["b/c1"]) == "c1 | conv_bn · 616 params"
    assert box_label(got["nodes"]["b/c2"]) == "c2 | conv2d · 584 params"
    assert box_label(got["nodes"]["stem"]) == "stem | conv_bn · 256 params"
    assert len(got["nodes"]) == 10 and len(whole["nodes"]) > 50      # not down to primitives
    assert not any("windows" in n for n in got["nodes"])


@needs_dot
def test_a_layer_inside_a_module_opens_by_its_path():
    """`--expand b/c1` opens the module call b on the way and c1 in it; depth counts from
    c1, so its conv, norm and relu are boxes and b's other layers stay folded."""
    got = layout(render(dlgraph.load(RESNET), expand=["b/c1"], depth=1))
    assert set(got["clusters"]) == {"cluster_b", "cluster_b/c1"}
    assert inside(got, "cluster_b/c1") == {"b/c1/c", "b/c1/bn", "b/c1/a"}
    assert inside(got, "cluster_b") == {"b/c2", "b/sum", "b/out"}
    assert box_label(got["nodes"]["b/c1/bn"]) == "bn | batch_norm · 32 params"
    deeper = layout(render(dlgraph.load(RESNET), expand=["b/c1"], depth=2))
    assert {"b/c1/c/windows", "b/c1/bn/sqrt"} <= set(deeper["nodes"])


def test_a_module_call_that_shares_parameters_says_so_for_each_layer():
    text = render(dlgraph.load(ROOT / "tests/specs/good/nested_modules.yaml"), expand=["b"],
                  depth=1)
    assert "linear + silu · shares the parameters of a/f" in text
    assert "encoder · shares the parameters of a/enc" in text


def test_expanding_a_node_that_is_not_there_names_the_close_ones():
    with pytest.raises(DlgraphError) as e:
        render(dlgraph.load(RESNET), expand=["b/c1x"])
    assert str(e.value) == ("cannot expand 'b/c1x': it is not a node of the graph\n"
                            "  help: did you mean 'b/c1'?")


def test_cli_render_one_level_of_a_module():
    from click.testing import CliRunner

    from dlgraph.cli.main import main
    r = CliRunner().invoke(main, ["render", str(RESNET), "--expand", "b", "--depth", "1"])
    assert r.exit_code == 0, r.output
    assert 'subgraph "cluster_b"' in r.output and '"b/c1" [' in r.output
    assert "windows" not in r.output and "cluster_b/c1" not in r.output
