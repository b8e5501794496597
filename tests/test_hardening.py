"""Hostile and clumsy input: nothing runs code, nothing escapes its folder, nothing explodes,
and every bad input is a DlgraphError (issue classes A-G)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import dlgraph
from dlgraph.engine.data import load_data
from dlgraph.engine.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this calls ``os.system`` -- if the unpickler lets it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


# ------------------------------------------------------------------ A. security

@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
def test_cifar_batch_cannot_run_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload(marker)]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="refused to unpickle: it names .*which a CIFAR-10 "
                                        "batch never holds"):
        load_data({"source": "cifar10", "paths": "data_batch_1"}, tmp_path, 0)
    assert not marker.exists()


def test_cifar_batch_of_any_protocol_still_loads(tmp_path):
    data = np.arange(2 * 3072).reshape(2, 3072) % 256
    for protocol in (2, 4, 5):
        (tmp_path / "b").write_bytes(pickle.dumps(
            {b"data": data.astype(np.uint8), b"labels": [3, 9], b"filenames": [b"a", b"b"],
             b"batch_label": b"training batch 1 of 5"}, protocol=protocol))
        d = load_data({"source": "cifar10", "paths": "b"}, tmp_path, 0)
        np.testing.assert_array_equal(d["x"].reshape(2, 3072) * 255, data)
        assert d["y"].tolist() == [3, 9]


def test_cifar_label_out_of_range_is_refused(tmp_path):
    (tmp_path / "b").write_bytes(pickle.dumps(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}))
    with pytest.raises(DataError, match=r"label 10 of image 1 is not a CIFAR-10 class \(0-9\)"):
        load_data({"source": "cifar10", "paths": "b"}, tmp_path, 0)


SPEC = ("dlgraph: 1\nname: t\n{include}inputs:\n  x: {{shape: [2, 3]}}\nnodes:\n"
        "  a: {{op: relu, in: x}}\noutputs: [a]\n")


def write_spec(folder: Path, include: str = "", name: str = "s.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(SPEC.format(include=include))
    return path


def test_include_outside_the_spec_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("modules: {}\nroot:x:0:0:TOPSECRET\n")
    for inc in ["../secret.yaml", str(secret)]:
        spec = write_spec(tmp_path / "proj", f"include: [{inc}]\n")
        with pytest.raises(dlgraph.SpecError) as info:
            dlgraph.load(spec)
        assert str(info.value) == (
            f"{spec}:3: included file {inc} is outside the spec's folder ({spec.parent})\n"
            "  help: include files below the spec's folder, or add their folder to "
            "DLGRAPH_INCLUDE_PATH")
        assert "TOPSECRET" not in str(info.value)


def test_include_through_a_symlink_out_of_the_tree_is_refused(tmp_path):
    (tmp_path / "outside.yaml").write_text("modules: {}\n")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    with pytest.raises(dlgraph.SpecError, match="is outside the spec's folder"):
        dlgraph.load(write_spec(proj, "include: [link.yaml]\n"))


def test_include_root_opt_in(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "blocks.yaml").write_text(
        "modules:\n  act:\n    inputs: [h]\n    nodes:\n      r: {op: relu, in: h}\n"
        "    outputs: [r]\n")
    spec = write_spec(tmp_path / "proj", f"include: [{shared / 'blocks.yaml'}]\n")
    with pytest.raises(dlgraph.SpecError, match="outside the spec's folder"):
        dlgraph.load(spec)
    monkeypatch.setenv("DLGRAPH_INCLUDE_PATH", str(shared))
    dlgraph.validate(spec)


@pytest.mark.parametrize("include, message", [
    ("include: 7\n", "`include:` is a list of spec file paths, not 7"),
    ("include: blocks.yaml\n", "`include:` is a list of spec file paths, not 'blocks.yaml'"),
    ("include: [notes.txt]\n", "included file notes.txt is not a .yaml, .yml or .json spec"),
    ("include: [bin.yaml]\n", "included file bin.yaml: a byte that is not UTF-8 at column 3; "
                              "this is not a spec file"),
    ("include: [sub]\n", "included file sub is not a .yaml, .yml or .json spec"),
])
def test_bad_include_is_a_located_error(tmp_path, include, message):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bin.yaml").write_bytes(b"ab\xff\xfe\x00SECRET")
    (tmp_path / "sub").mkdir()
    spec = write_spec(tmp_path, include)
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(spec)
    assert str(info.value).split("\n")[0] == f"{spec}:3: {message}"
    assert "SECRET" not in str(info.value)


def test_fifo_as_spec_or_data_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(dlgraph.SpecError, match="is not a regular file"):
        dlgraph.load(fifo)
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(DataError, match="not a regular file"):
        load_data({"source": "csv", "path": "pipe.csv", "x": ["a"]}, tmp_path, 0)
    with pytest.raises(DataError, match="not a regular file"):
        load_data({"source": "csv", "path": "/dev/zero", "x": ["a"]}, tmp_path, 0)


def test_data_path_that_is_a_folder(tmp_path):
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(DataError) as info:
        load_data({"source": "csv", "path": "d.csv", "x": ["a"]}, tmp_path, 0)
    assert str(info.value) == (f"{tmp_path / 'd.csv'}: this is a folder, not a data file\n"
                               "  help: name a file inside it")


def test_huge_spec_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(100 * 2**20)
    with pytest.raises(dlgraph.SpecError, match="the spec file has 104857600 bytes; at most"):
        dlgraph.load(big)


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))


@pytest.mark.parametrize("text, message", [
    ("l0: &l0 [x, x]\n" + LAUGHS, "<string>:1: the spec expands to more than 200000 values"),
    ("a: &a [1, [2, *a]]\n", "<string>:1: a YAML anchor refers to itself"),
    ("a: &a {b: *a}\n", "<string>:1: a YAML anchor refers to itself"),
    ("a: " + "[" * 10000 + "]" * 10000 + "\n", "<string>: the spec is nested more than 64 "
                                                "levels deep"),
    ("a:\n" + "".join(" " * i + "- \n" for i in range(1, 3000)),
     "<string>:65: the spec is nested more than 64 levels deep"),
    ("lr: .inf\n", "<string>:1: .inf is not a number a spec can hold"),
    ("lr: -Infinity\n", "<string>:1: -Infinity is not a number a spec can hold"),
    ("name: \x07\n", "<string>:1: the control character U+0007 at column 7"),
])
def test_yaml_bombs_are_refused(text, message):
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(text + SPEC.format(include="").replace("name: t\n", ""))
    assert str(info.value).split("\n")[0].startswith(message)


def test_json_nan_is_refused(tmp_path):
    spec = tmp_path / "n.json"
    spec.write_text('{"dlgraph": 1, "name": "n",\n "inputs": {"x": {"shape": [2, NaN]}},\n'
                    ' "nodes": {}, "outputs": []}\n')
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(spec)
    assert str(info.value).split("\n")[0] == f"{spec}:2: NaN is not a number a spec can hold"


def test_non_utf8_spec_names_line_and_column(tmp_path):
    spec = tmp_path / "b.yaml"
    spec.write_bytes(b"dlgraph: 1\nname: ab\xe9\n")
    with pytest.raises(dlgraph.SpecError) as info:
        dlgraph.load(spec)
    assert str(info.value).split("\n")[0] == (
        f"{spec}:2: a byte that is not UTF-8 at column 9; this is not a spec file")
