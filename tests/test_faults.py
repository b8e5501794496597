"""Faults while writing, and two runs at once: a full disk, a read-only or vanished folder is
one located error that says what to do, the last complete checkpoint stays whole and
`--resume` goes on once the fault is gone; a run directory is locked while a run writes it;
a killed run resumes with every metric row kept once."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.io import outputs
from dlgraph.engine.train import loop
from dlgraph.engine.train.checkpoint import load_tensors, read_checkpoint
from dlgraph.engine.train.rundir import claim_run_dir

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/specs/good/tiny_mlp.yaml"       # 4 epochs of 12 steps


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


def steps_of(rs: list[dict], kind: str) -> list[int]:
    return [r["step"] if kind == "step" else r["epoch"] for r in rs if r["kind"] == kind]


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, _ = load_tensors(a_dir / "weights.safetensors")
    b, _ = load_tensors(b_dir / "weights.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class FailingOs:
    """``os`` as engine/io/outputs.py sees it, whose ``replace`` onto a file named ``name``
    fails with ``code`` the ``when``-th time."""

    def __init__(self, name: str, when: int, code: int):
        self.name, self.when, self.code, self.calls = name, when, code, 0

    def __getattr__(self, attr):
        return getattr(os, attr)

    def replace(self, src, dst):
        if Path(dst).name == self.name:
            self.calls += 1
            if self.calls == self.when:
                raise OSError(self.code, os.strerror(self.code))
        return os.replace(src, dst)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run: what every interrupted one must end up as."""
    return dlgraph.train(dlgraph.load(TINY), out=tmp_path_factory.mktemp("w") / "run",
                         quiet=True).run_dir


# ------------------------------------------------------------------------------ full disk


def test_a_disk_full_at_the_second_checkpoint_then_resume(tmp_path, monkeypatch, whole):
    r_dir = tmp_path / "r"
    monkeypatch.setattr(outputs, "os", FailingOs("checkpoint.safetensors", 2, errno.ENOSPC))
    r = cli("run", TINY, "--out", r_dir, "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output == (
        f"error: {r_dir / 'checkpoint.safetensors'}: cannot write it: no space left on the "
        "device\n  help: free some space on that disk (or write somewhere else), then run "
        f"again with --resume --out {r_dir}: it goes on from the last complete checkpoint "
        "(epoch 1, step 12)\n")
    assert read_checkpoint(r_dir / "checkpoint.safetensors", {})[1]["step"] == 12
    assert not [p for p in r_dir.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()                                   # the disk has room again
    r = cli("run", TINY, "--out", r_dir, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming {r_dir} at epoch 2, step 12; 13 metric rows after the checkpoint moved " \
           "to metrics.replaced.jsonl (those steps run again)" in r.output
    kept = rows(r_dir)
    assert steps_of(kept, "step") == list(range(1, 49))          # each step once
    assert steps_of(kept, "epoch") == [1, 2, 3, 4]
    moved = rows(r_dir, "metrics.replaced.jsonl")                 # nothing lost
    assert steps_of(moved, "step") == list(range(13, 25)) and steps_of(moved, "epoch") == [2]
    assert_same_weights(whole, r_dir)
    assert kept[-1]["val_loss"] == rows(whole)[-1]["val_loss"]


def test_a_real_full_disk(tmp_path):
    """A small tmpfs filled up: one located error, the checkpoint whole, resume once freed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r_dir = disk / "r"
        assert cli("run", TINY, "--out", r_dir, "--epochs", "1", "-q").exit_code == 0
        before = (r_dir / "checkpoint.safetensors").read_bytes()
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        r = cli("run", TINY, "--out", r_dir, "--resume", "--epochs", "2", "-q")
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "cannot write it: no space left on the device\n  help: free some space on " \
               "that disk (or write somewhere else), then " in r.output
        assert (r_dir / "checkpoint.safetensors").read_bytes() == before
        filler.unlink()
        r = cli("run", TINY, "--out", r_dir, "--resume", "--epochs", "2", "-q")
        assert r.exit_code == 0, r.output
        assert steps_of(rows(r_dir), "step") == list(range(1, 25))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------ read-only, unwritable, gone


def test_a_read_only_out(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (ro / "old").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = cli("run", TINY, "--out", ro / "new", "-q")
        assert r.output == (f"error: {ro / 'new'}: cannot make the run directory: the file "
                            "system is read-only\n  help: write to a folder on a writable "
                            "disk, then run the command again\n")
        r = cli("run", TINY, "--out", ro / "old", "-q")
        assert r.output == (f"error: {ro / 'old'}: cannot write in the run directory: the "
                            "file system is read-only\n  help: write to a folder on a "
                            "writable disk, then run the command again\n")
        r = cli("render", TINY, "-o", ro / "g.dot")
        assert r.output == (f"error: {ro / 'g.dot'}: cannot write it: the file system is "
                            f"read-only ({ro})\n  help: write to a folder on a writable disk\n")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.mark.parametrize("code, what, todo", [
    (errno.EACCES, "no permission to write there",
     "write to a folder you own, or change its permissions"),
    (errno.EROFS, "the file system is read-only", "write to a folder on a writable disk"),
])
def test_an_unwritable_folder_mid_run(tmp_path, monkeypatch, code, what, todo):
    """Permissions root ignores, so the refusal is injected: at the first weights file."""
    r_dir = tmp_path / "r"
    monkeypatch.setattr(outputs, "os", FailingOs("best.safetensors", 1, code))
    r = cli("run", TINY, "--out", r_dir, "-q")
    assert r.output == (f"error: {r_dir / 'best.safetensors'}: cannot write it: {what}\n"
                        f"  help: {todo}, then run again with --resume --out {r_dir}: it "
                        "goes on from the last complete checkpoint (epoch 1, step 12)\n")


def test_a_run_directory_removed_mid_run(tmp_path, monkeypatch):
    r_dir = tmp_path / "r"
    real = loop.end_of_epoch

    def remove_then_end(run, epoch, last, met):
        if epoch == 1:
            shutil.rmtree(run.run_dir)
        return real(run, epoch, last, met)
    monkeypatch.setattr(loop, "end_of_epoch", remove_then_end)
    r = cli("run", TINY, "--out", r_dir, "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output == (f"error: {r_dir / 'checkpoint.safetensors'}: cannot write it: its "
                        "folder does not exist (was it removed while dlgraph wrote it?)\n"
                        "  help: keep the run directory while a run writes it; its files "
                        "went with it, so start the run again\n")
    assert not r_dir.exists()                            # not made again behind the user


# ---------------------------------------------------------------------- two runs at once


def test_a_locked_run_directory_is_refused_with_the_pid(tmp_path):
    r_dir = tmp_path / "r"
    lock = claim_run_dir(r_dir, resume=False)
    try:
        r = cli("run", TINY, "--out", r_dir, "-q")
        assert r.output == (f"error: {r_dir}: another dlgraph run (pid {os.getpid()}) is "
                            "writing this run directory\n  help: wait until it ends, or give "
                            "this run another --out folder\n")
        assert sorted(p.name for p in r_dir.iterdir()) == [".dlgraph-run"]
    finally:
        lock.release()
    assert cli("run", TINY, "--out", r_dir, "--epochs", "1", "-q").exit_code == 0


def test_two_processes_then_sigkill_then_resume(tmp_path):
    """A second process into a run directory is refused with the first one's pid; the first,
    killed with SIGKILL, resumes with its weights, epochs and every step row once."""
    spec = tmp_path / "long.yaml"
    spec.write_text(TINY.read_text().replace("epochs: 4", "epochs: 100000"))
    r_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "dlgraph.cli.main", "run", str(spec), "--out", str(r_dir),
           "-q"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300                # a wait for a state, not a timing
        while not (r_dir / "checkpoint.safetensors").is_file() and first.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read().decode()
        second = subprocess.run(cmd, capture_output=True, text=True)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"error: {r_dir}: another dlgraph run (pid {first.pid}) is writing this run " \
               "directory" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    at = read_checkpoint(r_dir / "checkpoint.safetensors", {})[1]
    before = steps_of(rows(r_dir), "step")
    assert before[:at["step"]] == list(range(1, at["step"] + 1))
    epochs = at["epoch"] + 1
    r = cli("run", spec, "--out", r_dir, "--resume", "--epochs", epochs, "-q")
    assert r.exit_code == 0, r.output
    assert steps_of(rows(r_dir), "step") == list(range(1, 12 * epochs + 1))
    assert steps_of(rows(r_dir), "epoch") == list(range(1, epochs + 1))
    whole = dlgraph.train(dlgraph.load(spec), out=tmp_path / "whole", epochs=epochs,
                          quiet=True).run_dir
    assert_same_weights(whole, r_dir)


# ----------------------------------------------------------------------- a finished run


def test_resuming_a_finished_run_says_it_is_finished(tmp_path):
    r_dir = tmp_path / "r"
    assert cli("run", TINY, "--out", r_dir, "--epochs", "2", "-q").exit_code == 0
    before = (r_dir / "metrics.jsonl").read_bytes()
    r = cli("run", TINY, "--out", r_dir, "--resume", "--epochs", "2", "-q")
    assert r.output == (f"error: {r_dir}: the run is finished: 2 of 2 epochs, 24 steps; "
                        "nothing to resume\n  help: pass a higher --epochs (or --steps) to "
                        "train it further, or start a new run with another --out\n")
    assert (r_dir / "metrics.jsonl").read_bytes() == before
    r = cli("run", TINY, "--out", r_dir, "--resume", "-q")        # the spec's 4 epochs
    assert r.exit_code == 0 and "done: " in r.output and "— 4 epochs, 48 steps" in r.output
    assert steps_of(rows(r_dir), "step") == list(range(1, 49))


def test_a_disk_full_at_the_weights_then_resume_ends_the_run(tmp_path, monkeypatch, whole):
    """The fault at the last file of a run: --resume writes what the end writes, once."""
    r_dir = tmp_path / "r"
    monkeypatch.setattr(outputs, "os", FailingOs("weights.safetensors", 1, errno.ENOSPC))
    r = cli("run", TINY, "--out", r_dir, "-q")
    assert r.exit_code == 1 and "(epoch 4, step 48)\n" in r.output, r.output
    assert not (r_dir / "weights.safetensors").exists()
    monkeypatch.undo()
    r = cli("run", TINY, "--out", r_dir, "--resume")
    assert r.exit_code == 0, r.output
    assert "its epochs are done; writing what the end of a run writes" in r.output
    assert "— 4 epochs, 48 steps" in r.output and "done: loss " in r.output
    assert steps_of(rows(r_dir), "step") == list(range(1, 49))
    assert_same_weights(whole, r_dir)
    r = cli("run", TINY, "--out", r_dir, "--resume", "-q")
    assert r.exit_code == 1 and "the run is finished: 4 of 4 epochs, 48 steps" in r.output


def test_a_lock_file_that_is_a_link_is_not_followed(tmp_path):
    r_dir = tmp_path / "r"
    r_dir.mkdir()
    theirs = tmp_path / "theirs.txt"
    theirs.write_bytes(b"keep me\n")
    (r_dir / ".dlgraph-run").symlink_to(theirs)
    r = cli("run", TINY, "--out", r_dir, "-q")
    assert r.exit_code == 1 and "the run directory holds files dlgraph did not write: " \
        ".dlgraph-run" in r.output
    assert theirs.read_bytes() == b"keep me\n"


def test_rows_after_a_sparser_checkpoint_move_aside(tmp_path, monkeypatch):
    """checkpoint_every: 2 and a fault at the checkpoint of epoch 4: epochs 3 and 4 run
    again, their first rows kept in metrics.replaced.jsonl."""
    spec = tmp_path / "every2.yaml"
    spec.write_text(TINY.read_text().replace("epochs: 4", "epochs: 4\n  checkpoint_every: 2"))
    r_dir = tmp_path / "r"
    monkeypatch.setattr(outputs, "os", FailingOs("checkpoint.safetensors", 2, errno.ENOSPC))
    r = cli("run", spec, "--out", r_dir, "-q")
    assert r.exit_code == 1 and "(epoch 2, step 24)\n" in r.output, r.output
    monkeypatch.undo()
    assert cli("run", spec, "--out", r_dir, "--resume", "-q").exit_code == 0
    assert steps_of(rows(r_dir), "step") == list(range(1, 49))
    assert steps_of(rows(r_dir), "epoch") == [1, 2, 3, 4]
    moved = rows(r_dir, "metrics.replaced.jsonl")
    assert steps_of(moved, "step") == list(range(25, 49)) and steps_of(moved, "epoch") == [3, 4]


def test_a_run_its_target_stopped_is_finished(tmp_path):
    spec = tmp_path / "target.yaml"
    spec.write_text(TINY.read_text() + "  target: {metric: val_accuracy, above: 0.5}\n")
    r_dir = tmp_path / "r"
    r = cli("run", spec, "--out", r_dir, "-q")
    assert r.exit_code == 0 and "— 1 epoch, 12 steps" in r.output, r.output
    r = cli("run", spec, "--out", r_dir, "--resume", "-q")
    assert r.output == (f"error: {r_dir}: the run is finished: 1 of 4 epochs, 12 steps; it "
                        "stopped: its target val_accuracy > 0.5 was met; nothing to resume\n"
                        "  help: pass a higher --epochs (or --steps) to train it further, or "
                        "start a new run with another --out\n")


def test_a_folder_with_a_checkpoint_not_of_dlgraph_is_not_taken(tmp_path):
    r_dir = tmp_path / "r"
    r_dir.mkdir()
    (r_dir / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    (r_dir / "spec.yaml").write_bytes(b"mine\n")
    r = cli("run", TINY, "--out", r_dir, "--resume", "-q")
    assert r.exit_code == 1 and "not a readable safetensors file" in r.output, r.output
    assert sorted(p.name for p in r_dir.iterdir()) == ["checkpoint.safetensors", "spec.yaml"]
    assert (r_dir / "spec.yaml").read_bytes() == b"mine\n"


def test_two_runs_started_together_into_one_new_folder(tmp_path):
    """Whichever takes the folder first trains; the other is refused (the first's pid, or,
    had the first already ended, the run it left) and writes nothing: each step once."""
    r_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "dlgraph.cli.main", "run", str(TINY), "--out", str(r_dir),
           "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in procs]
    assert sorted(o[3] for o in outs) == [0, 1], outs
    (won, *_), (_, _, err, _) = sorted(outs, key=lambda o: o[3])
    assert "Traceback" not in err
    assert f"another dlgraph run (pid {won}) is writing this run directory" in err or \
        "the folder already holds a dlgraph run" in err, err
    assert steps_of(rows(r_dir), "step") == list(range(1, 49))
    assert steps_of(rows(r_dir), "epoch") == [1, 2, 3, 4]


@pytest.mark.parametrize("left", ["", "999999999\n"])
def test_a_run_that_has_just_taken_the_lock_is_named_by_its_pid(tmp_path, left):
    """A run refused in the moment between another run's lock and its pid (empty mark file,
    or one still holding the pid of a run that ended) names the live holder, not "unknown"
    or the ended run: the CI race of two runs started together."""
    from dlgraph.engine.errors import TrainingError
    from dlgraph.engine.train.rundir import MARK, RunLock
    (tmp_path / MARK).write_text(left)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / MARK)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(0.3)\n"
        "b = f'{os.getpid()}\\n'.encode(); os.pwrite(fd, b, 0); os.ftruncate(fd, len(b))\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(TrainingError, match=rf"another dlgraph run \(pid {holder.pid}\)"):
            RunLock(tmp_path)
    finally:
        holder.communicate("", timeout=30)
    lock = RunLock(tmp_path)                            # the holder ended: the lock is free
    assert (tmp_path / MARK).read_text() == f"{os.getpid()}\n"
    lock.release()
