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
