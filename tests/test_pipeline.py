"""Pipelines (`dlgraph pipeline`): stages skipped when up to date and re-run when what they
read changed, resumed after an interrupt, stopped behind a failure, refused before anything
runs when the graphs on two sides of an edge disagree, the same in parallel as in series,
drawn the same every time. Stages train tests/specs/good/tiny_mlp.yaml for one epoch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.pipeline import stages
from dlgraph.engine.pipeline.state import file_hash

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests/specs/bad/pipelines"
BAD_FILES = sorted(p for p in BAD.glob("*.yaml") if p.name != "head3.yaml")
TINY = (ROOT / "tests/specs/good/tiny_mlp.yaml").read_text().replace("epochs: 4", "epochs: 1")


def write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


def run(pipe: Path, out: Path, **kw):
    said: list[str] = []
    res = dlgraph.run_pipeline(pipe, dir=out, echo=said.append, **kw)
    return {r.stage: r.state for r in res.rows}, res, said


def states(pipe: Path, out: Path) -> dict[str, str]:
    return {s: st.text() for s, st in dlgraph.pipeline_status(pipe, dir=out).items()}


@pytest.fixture
def tiny(tmp_path):
    write(tmp_path, "a.yaml", TINY)
    write(tmp_path, "b.yaml", TINY.replace("lr: 0.5", "lr: 0.3"))
    shutil.copy(BAD / "rows.npz", tmp_path / "rows.npz")
    return tmp_path


# ------------------------------------------------------------------- up to date and stale


def test_a_second_run_does_no_work_and_artifacts_read_from_python(tiny):
    # once engine/io/onnx/export.py is imported (any export does), the package's `export`
    # attribute is that module: the export stage failed after an earlier export in-process
    import dlgraph.engine.io.onnx.export  # noqa: F401
    pipe = write(tiny, "p.yaml", """\
dlgraph: 1
pipeline: p
stages:
  fit:    {train: a.yaml}
  score:  {evaluate: a.yaml, weights: fit.best}
  onnx:   {export: a.yaml, weights: fit.best}
  draw:   {sample: a.yaml, weights: fit.best, count: 5}
""")
    got, res, _ = run(pipe, tiny / "out")
    assert got == {"fit": "done", "score": "done", "onnx": "done", "draw": "done"}, \
        [r.error for r in res.rows]
    files = sorted((tiny / "out" / "stages").rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again, res2, said = run(pipe, tiny / "out")
    assert set(again.values()) == {"up to date"}
    assert said[:4] == [f"[{s}] up to date" for s in ("fit", "score", "onnx", "draw")]
    assert {p: p.stat().st_mtime_ns for p in sorted((tiny / "out" / "stages").rglob("*"))} \
        == stamps                                      # nothing rewritten
    # the artifacts, read from Python, are what the commands make of the same weights
    weights = res2.artifact("fit.best")
    assert weights == dlgraph.pipeline_artifact(pipe, "fit.best", dir=tiny / "out")
    g = dlgraph.load(tiny / "a.yaml")
    scored = json.loads(res2.artifact("score.metrics").read_text())
    direct = dlgraph.evaluate(g, weights)
    assert scored["metrics"] == pytest.approx(direct.metrics, rel=1e-6)
    import onnxruntime as ort
    x = np.random.default_rng(1).standard_normal((7, 2)).astype(np.float32)
    sess = ort.InferenceSession(str(res2.artifact("onnx.onnx")))
    ours = dlgraph.compile(g, weights=weights)(x=x)["logits"]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ours, rtol=1e-4, atol=1e-5)
    with np.load(res2.artifact("draw.samples")) as s:
        assert s["logits"].shape == (5, 2)


def test_editing_one_spec_reruns_it_and_its_dependents_only(tiny):
    pipe = write(tiny, "p.yaml", """\
dlgraph: 1
pipeline: p
stages:
  one:       {train: a.yaml}
  two:       {train: b.yaml}
  score_two: {evaluate: b.yaml, weights: two.weights}
""")
    run(pipe, tiny / "out")
    (tiny / "b.yaml").write_text(TINY.replace("lr: 0.5", "lr: 0.2"))
    assert states(pipe, tiny / "out") == {"one": "up to date",
                                          "two": "stale (its spec changed)",
                                          "score_two": "stale ('two' is stale)"}
    got, _, _ = run(pipe, tiny / "out")
    assert got == {"one": "up to date", "two": "done", "score_two": "done"}
    (tiny / "b.yaml").write_text(TINY.replace("lr: 0.5", "lr: 0.2") + "# a comment\n")
    assert set(states(pipe, tiny / "out").values()) == {"up to date"}   # content, not text


def test_an_input_is_judged_by_its_content_not_its_mtime(tiny):
    pipe = write(tiny, "p.yaml", """\
dlgraph: 1
pipeline: p
stages:
  fit:   {train: a.yaml}
  score: {evaluate: a.yaml, weights: fit.weights, data: rows.npz}
""")
    run(pipe, tiny / "out")
    rows = tiny / "rows.npz"
    os.utime(rows, (1e9, 1e9))                                 # touched: same content
    assert set(states(pipe, tiny / "out").values()) == {"up to date"}
    with np.load(rows) as f:
        arrays = dict(f)
    arrays["x"] = arrays["x"] + 1
    np.savez(rows, **arrays)
    os.utime(rows, (1e9, 1e9))                                 # same mtime, new content
    assert states(pipe, tiny / "out") == {"fit": "up to date",
                                          "score": "stale (input file rows.npz changed)"}
    weights = tiny / "out/stages/fit/weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")   # an artifact changed
    assert states(pipe, tiny / "out") == {"fit": "stale (artifact weights changed)",
                                          "score": "stale ('fit' is stale)"}
    got, _, _ = run(pipe, tiny / "out")
    assert got == {"fit": "done", "score": "done"}


def test_force_reruns_a_stage_and_dependents_whose_inputs_changed(tiny):
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: a.yaml}\n"
                                 "  score: {evaluate: a.yaml, weights: fit.weights}\n")
    run(pipe, tiny / "out")
    got, _, said = run(pipe, tiny / "out", force=["fit"])
    assert got["fit"] == "done" and said[0] == "[fit] running train a.yaml (forced)"
    # training is deterministic: the same weights again, so the evaluation stays valid
    assert got["score"] == "up to date"
    with pytest.raises(dlgraph.DlgraphError, match="--force fti: no such stage"):
        run(pipe, tiny / "out", force=["fti"])


# ------------------------------------------------------------- interrupts and failures


def test_an_interrupted_run_resumes_at_the_stage_that_did_not_finish(tiny, monkeypatch):
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: a.yaml}\n"
                                 "  score: {evaluate: a.yaml, weights: fit.weights}\n")

    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setitem(stages.RUNNERS, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(pipe, tiny / "out")
    assert states(pipe, tiny / "out") == {"fit": "up to date",
                                          "score": "interrupted (it did not finish)"}
    assert not (tiny / "out/stages/score").exists()            # no half of an artifact
    monkeypatch.undo()
    got, _, said = run(pipe, tiny / "out")
    assert got == {"fit": "up to date", "score": "done"}
    assert "[score] running evaluate a.yaml (it did not finish)" in said


def test_a_failing_stage_stops_its_dependents_and_keeps_the_others(tiny):
    pipe = write(tiny, "p.yaml", """\
dlgraph: 1
pipeline: p
stages:
  bad:        {train: a.yaml, set: {train.optimizer: {type: adam, lr: 1.0e+38}}}
  good:       {train: a.yaml}
  score_bad:  {evaluate: a.yaml, weights: bad.weights}
  score_good: {evaluate: a.yaml, weights: good.weights}
""")
    result = CliRunner().invoke(main, ["pipeline", "run", str(pipe), "--dir",
                                       str(tiny / "out")])
    assert result.exit_code == 1
    table = result.stdout.splitlines()
    assert [line.split()[:3] for line in table[1:5]] == [
        ["bad", "train", "failed"], ["good", "train", "done"],
        ["score_bad", "evaluate", "skipped"], ["score_good", "evaluate", "done"]]
    assert "error: stage 'bad': the loss of phase" in result.stderr
    assert "[score_bad] skipped: 'bad' failed" in result.stderr
    assert "Traceback" not in result.output
    st = states(pipe, tiny / "out")
    assert st["bad"].startswith("failed (the loss of phase") and st["good"] == "up to date"
    assert st["score_bad"] == "never run" and st["score_good"] == "up to date"
    assert (tiny / "out/stages/good/weights.safetensors").is_file()
    assert not (tiny / "out/stages/bad").exists()


# ----------------------------------------------------------------- checked before running


@pytest.mark.parametrize("pipe", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_a_bad_pipeline_is_refused_at_validate_with_file_and_line(pipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    rel = pipe.relative_to(ROOT)
    expected = Path(f"{pipe}.err").read_text()
    for command in ("validate", "run"):
        result = CliRunner().invoke(main, ["pipeline", command, str(rel)])
        assert result.exit_code == 1, result.output
        assert result.stderr == expected
    assert not (ROOT / "runs/pipelines" / rel.stem.replace("_", "-")).exists()
    with pytest.raises(dlgraph.DlgraphError) as info:
        dlgraph.validate_pipeline(rel)
    assert str(info.value) == expected.removeprefix("error: ").rstrip("\n")


def test_a_spec_error_is_located_in_the_spec(tiny):
    write(tiny, "broken.yaml", TINY.replace("op: linear, in: x", "op: lienar, in: x"))
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: broken.yaml}\n")
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.validate_pipeline(pipe)
    assert str(info.value) == (f"{tiny}/broken.yaml:8: node 'h': unknown op 'lienar'\n"
                               "  help: did you mean 'linear'?")


def test_a_folder_dlgraph_did_not_make_is_never_written(tiny):
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: a.yaml}\n")
    mine = tiny / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(dlgraph.DlgraphError, match="is not empty and is not a dlgraph "
                                                   "pipeline directory"):
        run(pipe, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    other = write(tiny, "q.yaml", "dlgraph: 1\npipeline: q\nstages:\n  fit: {train: a.yaml}\n")
    run(other, tiny / "q-out")
    with pytest.raises(dlgraph.DlgraphError, match="holds the pipeline 'q', not 'p'"):
        run(pipe, tiny / "q-out")
    stage = tiny / "q-out/stages/fit"           # a link planted where a stage's folder was
    shutil.rmtree(stage)
    stage.symlink_to(mine)
    run(other, tiny / "q-out")
    assert not stage.is_symlink() and (stage / "weights.safetensors").is_file()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ parallel and drawing


def test_independent_stages_in_parallel_give_the_same_artifacts_as_in_series(tiny):
    pipe = write(tiny, "p.yaml", """\
dlgraph: 1
pipeline: p
stages:
  one:       {train: a.yaml}
  two:       {train: b.yaml}
  score_one: {evaluate: a.yaml, weights: one.weights}
  score_two: {evaluate: b.yaml, weights: two.weights}
""")
    series, _, _ = run(pipe, tiny / "series")
    parallel, res, _ = run(pipe, tiny / "parallel", jobs=2)
    assert set(series.values()) == set(parallel.values()) == {"done"}
    for ref, path in res.artifacts.items():
        assert file_hash(path) == file_hash(tiny / "series" / path.relative_to(res.dir)), ref


@pytest.mark.slow
def test_stages_as_ray_tasks_give_the_same_artifacts_as_in_series(tiny):
    pytest.importorskip("ray")
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  one: {train: a.yaml}\n"
                                 "  two: {train: b.yaml}\n")
    series, _, _ = run(pipe, tiny / "series")
    on_ray, res, _ = run(pipe, tiny / "ray", address="local", jobs=2)
    assert series == on_ray == {"one": "done", "two": "done"}
    for ref, path in res.artifacts.items():
        assert file_hash(path) == file_hash(tiny / "series" / path.relative_to(res.dir)), ref


def test_a_stage_init_from_replaces_the_spec_own_file_which_need_not_exist(tiny):
    # graphs/pipelines/transfer.yaml on a fresh clone: classify.yaml's own init_from names a
    # run folder that only exists after `dlgraph run pretrain.yaml`
    write(tiny, "c.yaml", TINY.replace("  batch: 32", "  init_from: {path: runs/none/weights"
                                       ".safetensors, params: ['h.*']}\n  freeze: ['h.*']\n"
                                       "  batch: 32"))
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  pre: {train: a.yaml}\n"
                 "  fine: {train: c.yaml, init_from: pre.weights}\n")
    assert CliRunner().invoke(main, ["pipeline", "validate", str(pipe)]).exit_code == 0
    got, res, said = run(pipe, tiny / "out")
    assert got == {"pre": "done", "fine": "done"}, [r.error for r in res.rows]
    # h.* frozen: the pre stage's trained values, copied by the stage's init_from
    pre, fine = (dlgraph.pipeline_artifact(pipe, f"{s}.weights", dir=tiny / "out")
                 for s in ("pre", "fine"))
    from dlgraph.engine.train.checkpoint import load_tensors
    a, b = load_tensors(pre)[0], load_tensors(fine)[0]
    for k in ("h.weight", "h.bias"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["logits.weight"], b["logits.weight"])
    # the spec run alone still refuses its missing file, naming its line
    r = CliRunner().invoke(main, ["run", str(tiny / "c.yaml"), "--out", str(tiny / "alone")])
    assert r.exit_code == 1 and f"{tiny / 'c.yaml'}:14: init_from: no such weights file" \
        in r.output


@pytest.mark.parametrize("name", ["transfer", "digits", "gan"])
def test_the_example_pipelines_validate(name):
    if name == "digits" and not (ROOT / "graphs/data/digits.npz").exists():
        pytest.skip("graphs/data/digits.npz is made by scripts/export_digits.py")
    plan = dlgraph.validate_pipeline(ROOT / f"graphs/pipelines/{name}.yaml")
    assert plan.order == {"transfer": ["pretrain", "classify", "report", "onnx"],
                          "digits": ["search", "retrain", "report", "onnx"],
                          "gan": ["train", "sample"]}[name]


def test_the_rendered_dot_is_stable_and_coloured_by_state(tiny):
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: a.yaml}\n"
                                 "  score: {evaluate: a.yaml, weights: fit.weights}\n")
    font = "Helvetica,Arial,sans-serif"
    expected = f"""\
digraph "p" {{
  graph [rankdir="LR", fontname="{font}", labelloc="t", label="pipeline p"];
  node [shape="box", style="rounded,filled", fontname="{font}", fontsize="11"];
  edge [fontname="{font}", fontsize="10", color="#707070"];
  "fit" [label="fit\\ntrain a.yaml\\nnever run", fillcolor="#ececec", color="#858585", tooltip="never run"];
  "score" [label="score\\nevaluate a.yaml\\nnever run", fillcolor="#ececec", color="#858585", tooltip="never run"];
  "fit" -> "score" [label="weights"];
}}
"""  # noqa: E501
    out = tiny / "out"
    assert dlgraph.render_pipeline(pipe, dir=out) == expected
    assert dlgraph.render_pipeline(pipe, tiny / "p.dot", dir=out) == expected
    assert (tiny / "p.dot").read_text() == expected
    run(pipe, out)
    drawn = dlgraph.render_pipeline(pipe, tiny / "p.svg", dir=out)
    assert drawn == dlgraph.render_pipeline(pipe, dir=out)
    assert drawn.count('fillcolor="#dff0d8"') == 2                 # both up to date
    assert (tiny / "p.svg").read_text().lstrip().startswith("<?xml")


def test_the_commands_print_what_a_user_reads(tiny, monkeypatch):
    monkeypatch.chdir(tiny)              # the default pipeline directory is under the cwd
    write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: a.yaml}\n")
    before = sorted(p.name for p in tiny.iterdir())
    runner = CliRunner()
    ok = runner.invoke(main, ["pipeline", "validate", "p.yaml"])
    assert ok.exit_code == 0
    assert ok.stdout == "p.yaml: pipeline 'p' is valid: 1 stage (fit), 0 artifacts passed\n"
    assert runner.invoke(main, ["pipeline", "status", "p.yaml"]).stdout == "fit  never run\n"
    ran = runner.invoke(main, ["pipeline", "run", "p.yaml"])
    assert ran.exit_code == 0, ran.output
    head, row, total = ran.stdout.splitlines()
    assert head.split() == ["stage", "kind", "state", "time", "key", "metric"]
    assert row.split()[:3] == ["fit", "train", "done"] and "val_accuracy" in row
    assert total == "1 stage: 1 run, 0 up to date, 0 failed, 0 skipped; runs/pipelines/p"
    assert "[fit] epoch   1/1  loss" in ran.stderr                # the stage's own progress
    assert runner.invoke(main, ["pipeline", "status", "p.yaml"]).stdout == "fit  up to date\n"
    quiet = runner.invoke(main, ["pipeline", "run", "p.yaml", "-q"])
    assert quiet.stderr == "" and quiet.stdout.splitlines()[1].split()[:4] == \
        ["fit", "train", "up", "to"]
    # nothing written outside the pipeline directory
    assert sorted(p.name for p in tiny.iterdir()) == sorted(before + ["runs"])
    assert [p.name for p in (tiny / "runs").iterdir()] == ["pipelines"]
    assert [p.name for p in (tiny / "runs/pipelines").iterdir()] == ["p"]


def test_one_run_at_a_time_holds_a_pipeline_directory(tiny):
    from dlgraph.engine.pipeline.state import PipelineDir
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: a.yaml}\n")
    with PipelineDir(tiny / "out", "p").lock():
        with pytest.raises(dlgraph.DlgraphError, match="another `pipeline run` is using"):
            run(pipe, tiny / "out")


@pytest.mark.parametrize("doc", ["README.md", "docs/pipelines.md"])
def test_the_documented_pipeline_is_the_example(doc):
    import yaml
    text = (ROOT / doc).read_text(encoding="utf-8")
    body = text.split("```yaml\n# graphs/pipelines/transfer.yaml\n", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(body)
    example = yaml.safe_load((ROOT / "graphs/pipelines/transfer.yaml").read_text())
    assert shown["stages"] == example["stages"] and shown["pipeline"] == example["pipeline"]


def test_a_sample_stage_of_a_language_model_writes_what_the_command_prints(tmp_path):
    write(tmp_path, "lm.yaml", """\
dlgraph: 1
name: tiny-lm
inputs:
  x: {shape: [batch, 8], dtype: int32}
  y: {shape: [batch, 8], dtype: int32}
nodes:
  emb: {op: embedding, in: x, num: vocab, dim: 8}
  rnn: {op: gru, in: emb, hidden: 16}
  logits: {op: linear, in: rnn, out: vocab}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: text_tokens, length: 8, samples: 256}
  batch: 32
  epochs: 1
  objective: loss
  optimizer: {type: adam, lr: 0.01}
""")
    pipe = write(tmp_path, "p.yaml", """\
dlgraph: 1
pipeline: lm
stages:
  fit:   {train: lm.yaml, steps: 3}
  write: {sample: lm.yaml, weights: fit.weights, prompt: First, length: 20, seed: 4}
""")
    got, res, _ = run(pipe, tmp_path / "out")
    assert got == {"fit": "done", "write": "done"}
    text = res.artifact("write.samples").read_text()
    assert res.artifact("write.samples").name == "samples.txt"
    g = dlgraph.load(tmp_path / "lm.yaml")
    assert text == dlgraph.generate_text(g, res.artifact("fit.weights"), prompt="First",
                                         length=20, seed=4)
    assert text.startswith("First") and len(text) == 25


def test_predictions_feed_the_next_stage(tiny):
    rng = np.random.default_rng(2)
    np.savez(tiny / "head_rows.npz", logits=rng.standard_normal((32, 2)).astype(np.float32),
             y=(rng.random(32) > 0.5).astype(np.int32))
    write(tiny, "head.yaml", (BAD / "head3.yaml").read_text()
          .replace("[batch, 3]", "[batch, 2]").replace("rows.npz", "head_rows.npz"))
    pipe = write(tiny, "p.yaml", """\
dlgraph: 1
pipeline: p
stages:
  fit:    {train: a.yaml}
  head:   {train: head.yaml}
  scores: {predict: a.yaml, weights: fit.weights, data: rows.npz}
  judge:  {predict: head.yaml, weights: head.weights, data: scores.predictions}
""")
    got, res, _ = run(pipe, tiny / "out")
    assert set(got.values()) == {"done"}
    with np.load(res.artifact("scores.predictions")) as s:
        logits = s["logits"]
    with np.load(tiny / "rows.npz") as f:
        x = f["x"]
    first = dlgraph.compile(dlgraph.load(tiny / "a.yaml"), weights=res.artifact("fit.weights"))
    np.testing.assert_allclose(logits, first(x=x)["logits"], rtol=1e-5, atol=1e-6)
    head = dlgraph.compile(dlgraph.load(tiny / "head.yaml"), weights=res.artifact("head.weights"))
    with np.load(res.artifact("judge.predictions")) as j:
        np.testing.assert_allclose(j["out"], head(logits=logits)["out"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_sweep_stage_hands_its_best_trial_to_the_next(tiny):
    pytest.importorskip("ray")
    write(tiny, "s.yaml", TINY + "sweep:\n  parameters:\n    train.optimizer.lr: [0.05, 0.5]\n")
    pipe = write(tiny, "p.yaml", """\
dlgraph: 1
pipeline: p
stages:
  search:  {sweep: s.yaml, concurrency: 2}
  retrain: {train: search.spec, epochs: 2}
  score:   {evaluate: retrain.spec, weights: retrain.weights}
""")
    got, res, _ = run(pipe, tiny / "out")
    assert got == {"search": "done", "retrain": "done", "score": "done"}
    import csv
    with open(res.artifact("search.table")) as f:
        rows = list(csv.DictReader(f))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    chosen = json.loads(res.artifact("search.metrics").read_text())
    assert chosen["params"] == {"train.optimizer.lr": float(best["train.optimizer.lr"])}
    assert file_hash(res.artifact("search.best")) == file_hash(
        Path(best["run_dir"]) / "weights.safetensors")
    import yaml
    spec = yaml.safe_load(res.artifact("retrain.spec").read_text())
    assert spec["train"]["optimizer"]["lr"] == float(best["train.optimizer.lr"])
    assert spec["train"]["epochs"] == 1 and json.loads(
        res.artifact("retrain.metrics").read_text())["epochs"] == 2


def test_every_stage_kind_has_a_runner_artifacts_and_docs():
    from dlgraph.engine.pipeline.spec import KINDS
    doc = (ROOT / "docs/pipelines.md").read_text(encoding="utf-8")
    assert set(stages.RUNNERS) == set(KINDS)
    for kind, model in KINDS.items():
        assert kind in model.model_fields and model.artifacts, kind
        assert f"| `{kind}: SPEC` |" in doc, kind
        for art in model.artifacts:
            assert f"`{art}`" in doc, (kind, art)


def test_a_sample_count_that_cannot_fit_is_refused_before_anything_runs(tiny):
    pipe = write(tiny, "p.yaml", "dlgraph: 1\npipeline: p\nstages:\n  fit: {train: a.yaml}\n"
                                 "  draw: {sample: a.yaml, weights: fit.weights,\n"
                                 "         count: 100000000000}\n")
    with pytest.raises(dlgraph.DeviceError, match=r"p.yaml:6: stage 'draw' \(sample\): count "
                                                  r"100000000000: this graph needs about"):
        dlgraph.run_pipeline(pipe, dir=tiny / "out")
    assert not (tiny / "out").exists()
