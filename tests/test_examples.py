"""The example specs in graphs/: each one is valid, documented, and learns.

Every ``graphs/*.yaml`` is picked up by the glob, so a new example is covered as soon as it
is added. The learning check is a shortened run (``STEPS`` below): the mean loss of the
last three steps must be clearly below that of the first three (per phase for GANs, where
only the discriminator's loss has to fall: the generator's may rise while it is still
behind). Validation, metrics and the target are dropped for these runs, so no second
program is compiled. Compiling dominates the time and is single-threaded, so the runs are
started together in one worker process per core; the slowest examples are marked ``slow``
(deselect them with ``-m "not slow"``). Full training to each target, and the checks of
the trained models, are ``bench/examples.py``'s job.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = sorted((ROOT / "graphs").glob("*.yaml"))

#: steps of the shortened run per example (default DEFAULT_STEPS); cheap steps get more
STEPS = {"autoencoder": 40, "gan": 20, "mlp": 30}
DEFAULT_STEPS = 15
#: the last three steps' mean loss must be below (1 - margin) x the first three's
MARGIN = {"gan": 0.02}
DEFAULT_MARGIN = 0.1
#: examples whose shortened run takes about a minute or more on 2 CPU cores (compiling)
SLOW = {"lstm", "char_lm", "transformer", "custom_cell"}


def _missing_data(path: Path) -> str | None:
    """Why an example cannot run here: its data file (made by a script its doc names, e.g.
    scripts/export_digits.py) is not there."""
    data = (yaml.safe_load(path.read_text(encoding="utf-8")).get("train") or {}).get("data", {})
    file = data.get("path")
    if file and not (path.parent / file).exists():
        return f"{path.parent.name}/{file} is missing: make it with the script named in the doc"
    return None


def _param(path: Path, slow: bool = True):
    marks = [pytest.mark.slow] if slow and path.stem in SLOW else []
    if _missing_data(path):
        marks.append(pytest.mark.skip(reason=_missing_data(path)))
    return pytest.param(path, id=path.stem, marks=marks)


def test_there_are_examples():
    names = {p.stem for p in GRAPHS}
    assert {"mlp", "lstm", "cnn", "rnn", "gru", "autoencoder", "gan", "transformer",
            "char_lm"} <= names


@pytest.mark.parametrize("path", [_param(p, slow=False) for p in GRAPHS])
def test_validates(path):
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip().endswith("is valid")


@pytest.mark.parametrize("path", [_param(p, slow=False) for p in GRAPHS])
def test_documented_and_offline(path):
    """A doc that names its target, a target or judge, and built-in data by default."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert len(spec.get("doc", "")) > 80, "say what it learns, on which data, to what bound"
    assert spec["train"]["data"]["source"] not in ("csv", "npy", "idx", "cifar10", "text") \
        or "scripts/" in spec["doc"], "examples run offline on a built-in source (or on a " \
        "file that a script of scripts/ makes offline)"
    if "target" not in spec["train"]:
        assert "bench/examples.py" in spec["doc"], "no target: say where it is judged"


def _short_run(path: str, steps: int, out: str) -> list[dict]:
    """Train a trimmed copy of one example for ``steps`` steps; its per-step log rows."""
    g = dlgraph.load(path)
    train = g.spec.train            # loaded from the file as is (its includes resolve), then
    train.validation.split = 0      # trimmed: no validation program to compile
    train.metrics = []
    train.target = None
    res = dlgraph.train(g, steps=steps, quiet=True, out=out)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "step"]


@pytest.fixture(scope="module")
def short_runs(request, tmp_path_factory):
    """The shortened runs of every example selected in this session, started together in
    worker processes (one per core, slowest first): compiling is single-threaded, so this
    divides the file's wall time by the number of cores."""
    wanted = [item.callspec.params["path"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_loss_falls"
              and hasattr(item, "callspec") and not _missing_data(item.callspec.params["path"])]
    wanted.sort(key=lambda p: p.stem not in SLOW)
    tmp = tmp_path_factory.mktemp("examples")
    workers = max(1, min(len(wanted), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield {p: pool.submit(_short_run, str(p), STEPS.get(p.stem, DEFAULT_STEPS),
                              str(tmp / p.stem)) for p in wanted}


@pytest.mark.parametrize("path", [_param(p) for p in GRAPHS])
def test_loss_falls(path, short_runs):
    rows = short_runs[path].result()
    assert len(rows) == STEPS.get(path.stem, DEFAULT_STEPS)
    keys = [k for k in rows[0] if k.startswith("loss")]
    if "loss" not in keys:          # phases: the discriminator (first phase) must learn
        keys = keys[:1]
    margin = MARGIN.get(path.stem, DEFAULT_MARGIN)
    for k in keys:
        first = sum(r[k] for r in rows[:3]) / 3
        last = sum(r[k] for r in rows[-3:]) / 3
        assert last < (1 - margin) * first, \
            f"{k}: first steps {first:.4g}, last steps {last:.4g} ({[r[k] for r in rows]})"
