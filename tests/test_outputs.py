"""What dlgraph writes: every command that writes leaves a file it did not write untouched,
byte for byte, and says so (exit 1, a located error, a help line, no traceback); a file it
wrote itself, unchanged since, is replaced; --force replaces anyway (engine/io/outputs.py,
engine/train/rundir.py)."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/specs/good/tiny_mlp.yaml"
MINE = b"the user's own bytes\n\x00\x01"
REFUSED = "the file is already there and dlgraph did not write it\n  help: name a new file, " \
          "or pass --force to replace it\n"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(r, path: Path, text: str = REFUSED) -> None:
    """The command stopped with the located error and left ``path`` as the user had it."""
    assert r.exit_code == 1, r.output
    assert f"error: {path}: {text}" in r.output, r.output
    assert "Traceback" not in r.output
    assert path.read_bytes() == MINE


def user_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MINE)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    res = dlgraph.train(dlgraph.load(TINY), out=d / "run", epochs=1, quiet=True)
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.savez(d / "xy.npz", x=x, y=(x[:, 0] * x[:, 1] > 0).astype(np.int32))
    return d, res.run_dir


# --------------------------------------------------------------------- one test per command


def test_run_out_into_a_folder_of_the_users_files(tmp_path):
    d = tmp_path / "mine"
    user_file(d / "spec.yaml")
    user_file(d / "metrics.jsonl")
    r = cli("run", TINY, "--out", d, "-q")
    assert r.exit_code == 1 and r.output == (
        f"error: {d}: the run directory holds files dlgraph did not write: metrics.jsonl, "
        "spec.yaml\n  help: give --out a new or empty folder (dlgraph never replaces files it "
        "did not write)\n")
    assert (d / "spec.yaml").read_bytes() == (d / "metrics.jsonl").read_bytes() == MINE
    assert sorted(p.name for p in d.iterdir()) == ["metrics.jsonl", "spec.yaml"]
    r = cli("run", TINY, "--out", d, "--resume", "-q")      # nothing of dlgraph's to resume
    assert r.exit_code == 1 and "nothing to resume" in r.output
    assert (d / "spec.yaml").read_bytes() == MINE


def test_run_output_npz(tmp_path):
    out = user_file(tmp_path / "o.npz")
    refused(cli("run", ROOT / "tests/specs/good/forward.yaml", "--output", out), out)


def test_export(tmp_path):
    pytest.importorskip("onnx")
    out = user_file(tmp_path / "m.onnx")
    refused(cli("export", TINY, "-o", out), out)
    r = cli("export", TINY, "-o", tmp_path / "new.onnx")
    assert r.exit_code == 0, r.output
    first = (tmp_path / "new.onnx").read_bytes()
    r = cli("export", TINY, "-o", tmp_path / "new.onnx", "--seed", "1")   # dlgraph's: replaced
    assert r.exit_code == 0, r.output
    assert (tmp_path / "new.onnx").read_bytes() != first
    r = cli("export", TINY, "-o", out, "--force")
    assert r.exit_code == 0 and out.read_bytes() != MINE


def test_import_spec_and_weights(tmp_path):
    pytest.importorskip("onnx")
    model = tmp_path / "m.onnx"
    assert cli("export", TINY, "-o", model).exit_code == 0
    spec = user_file(tmp_path / "m.yaml")
    refused(cli("import", model, "-o", spec), spec)
    weights = user_file(tmp_path / "w.safetensors")        # the weights beside the spec
    refused(cli("import", model, "-o", tmp_path / "w.yaml"), weights)
    assert not (tmp_path / "w.yaml").exists()


def test_predict(trained, tmp_path):
    d, run = trained
    out = user_file(tmp_path / "p.csv")
    refused(cli("predict", TINY, "--weights", run / "weights.safetensors", "--data",
                d / "x.npy", "-o", out), out)


def test_evaluate_picture(trained, tmp_path):
    d, run = trained
    out = user_file(tmp_path / "cm.png")
    refused(cli("evaluate", TINY, "--weights", run / "weights.safetensors", "--data",
                d / "xy.npz", "-o", out, "-q"), out)


def test_plot(trained, tmp_path):
    _, run = trained
    out = user_file(tmp_path / "curves.png")
    refused(cli("plot", run, "-o", out), out)
    r = cli("plot", run, "-o", out, "--force")
    assert r.exit_code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render(tmp_path):
    out = user_file(tmp_path / "g.dot")
    refused(cli("render", TINY, "-o", out), out)


def test_tensorboard_dir_that_is_a_file(tmp_path):
    pytest.importorskip("tensorboardX")
    f = user_file(tmp_path / "tb")
    r = cli("run", TINY, "--out", tmp_path / "r", "--tensorboard", f, "-q")
    assert r.exit_code == 1 and "is a file, not a folder\n  help: " in r.output, r.output
    assert "Traceback" not in r.output and f.read_bytes() == MINE
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------ the rule itself


def test_a_file_dlgraph_wrote_is_replaced_until_someone_changes_it(tmp_path):
    out = tmp_path / "g.dot"
    assert cli("render", TINY, "-o", out).exit_code == 0
    assert cli("render", TINY, "-o", out, "--rankdir", "LR").exit_code == 0
    assert 'rankdir="LR"' in out.read_text()
    out.write_text(out.read_text() + "// my note\n")        # now it is the user's too
    r = cli("render", TINY, "-o", out)
    assert r.exit_code == 1 and REFUSED in r.output and out.read_text().endswith("// my note\n")


def test_a_symlink_and_a_folder_are_not_written_through(tmp_path):
    target = user_file(tmp_path / "target.txt")
    (tmp_path / "link.dot").symlink_to(target)
    r = cli("render", TINY, "-o", tmp_path / "link.dot")
    assert r.exit_code == 1 and "symbolic link" in r.output and target.read_bytes() == MINE
    (tmp_path / "dir.dot").mkdir()
    with pytest.raises(dlgraph.DlgraphError) as e:       # the CLI's -o refuses it as usage
        dlgraph.render(dlgraph.load(TINY), tmp_path / "dir.dot")
    assert str(e.value) == f"{tmp_path / 'dir.dot'}: cannot write it: it is a folder\n" \
                           "  help: name a file, not a folder"


def test_a_file_where_a_folder_should_be(tmp_path):
    """import -o afile/m.yaml, with afile a file: one located error, nothing written."""
    pytest.importorskip("onnx")
    model = tmp_path / "m.onnx"
    assert cli("export", TINY, "-o", model).exit_code == 0
    afile = user_file(tmp_path / "afile")
    for cmd in (("import", model, "-o", afile / "m.yaml"),
                ("export", TINY, "-o", afile / "m.onnx"),
                ("render", TINY, "-o", afile / "sub" / "g.dot")):
        r = cli(*cmd)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"cannot write it: {afile} is a file, not a folder\n  help: choose a path " \
               "whose folders are folders" in r.output
    assert afile.read_bytes() == MINE


def test_a_run_directory_is_dlgraphs_own(tmp_path):
    d = tmp_path / "r"
    r = cli("run", TINY, "--out", d, "--epochs", "1", "-q")
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    r = cli("run", TINY, "--out", d, "-q")
    assert r.exit_code == 1 and r.output == (f"error: {d}: the folder already holds a dlgraph "
                                             "run\n  help: pass --resume to continue it, or "
                                             "give --out a new folder\n")
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("run", TINY, "--out", empty, "--epochs", "1", "-q").exit_code == 0


def test_cache_listing_and_clearing_skip_what_is_not_an_entry(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DLGRAPH_CACHE_DIR", str(root))
    assert cli("cache").exit_code == 0
    (root / "gone.prog").symlink_to(tmp_path / "nowhere")       # a dangling link
    (root / "dir.prog").mkdir()                                 # a folder named like one
    (root / "dir.prog" / "keep").write_bytes(MINE)
    (root / "a.prog").write_bytes(b"x" * 10)
    r = cli("cache")
    assert r.exit_code == 0 and ": 1 compiled program," in r.output, r.output
    r = cli("cache", "--clear")
    assert r.exit_code == 0 and r.output.startswith("removed 1 compiled program "), r.output
    assert (root / "gone.prog").is_symlink() and (root / "dir.prog" / "keep").read_bytes() == MINE
    assert not (root / "a.prog").exists()


def test_sweep_out_among_the_users_files(tmp_path):
    out = user_file(tmp_path / "sw" / "curves.png")
    r = cli("sweep", TINY, "--param", "train.optimizer.lr=0.1,0.01", "--out", out.parent)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output == (f"error: {TINY}: {out.parent} is not a new or empty folder; a sweep "
                        "never writes among files dlgraph did not write\n  help: pass a new "
                        "--out folder\n")
    assert out.read_bytes() == MINE
    afile = user_file(tmp_path / "afile")
    r = cli("sweep", TINY, "--param", "train.optimizer.lr=0.1,0.01", "--out", afile / "sw")
    assert r.exit_code == 1 and "Traceback" not in r.output and "help: " in r.output
    assert afile.read_bytes() == MINE


def test_two_default_run_directories_in_one_second_are_two(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from dlgraph.engine.train.rundir import claim_run_dir
    first = claim_run_dir(Path("runs/x/20250101-000000"), False, fresh=True)
    second = claim_run_dir(Path("runs/x/20250101-000000"), False, fresh=True)
    assert (first.run_dir.name, second.run_dir.name) == ("20250101-000000",
                                                         "20250101-000000-1")
    first.release()
    second.release()


def test_pipeline_render(tmp_path):
    pipe = ROOT / "graphs/pipelines/transfer.yaml"
    out = user_file(tmp_path / "p.dot")
    refused(cli("pipeline", "render", pipe, "-o", out, "--dir", tmp_path / "pd"), out)
