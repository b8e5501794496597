"""The data layer: generated sources, file formats, errors, splitting and batching."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter

from dlgraph.engine.errors import DataError, Source, SpecError
from dlgraph.engine.io.data import (
    SOURCES,
    DataSpec,
    batches,
    gaussian_mixture_centers,
    load_data,
    num_batches,
    parse_data_spec,
    split,
    vocabulary,
)
from dlgraph.engine.io.data.text import CORPUS

GENERATED = {  # source -> (spec fields, expected shapes of each key for N = 60): the records'
    name: model.example for name, model in SOURCES.items() if model.example is not None}


def gen(source: str, run_seed: int = 0, samples: int = 60, **params) -> dict[str, np.ndarray]:
    return load_data({"source": source, "samples": samples, **params}, ".", run_seed)


def raises(match_message: str, fn, *args, **kwargs) -> DataError:
    """Call ``fn``; it must raise DataError with exactly this message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert info.value.message == match_message
    return info.value


# ------------------------------------------------------------------ specs

def test_every_source_is_documented_and_strict():
    # every source carries its test in its record, except those that read a user's file
    assert set(SOURCES) - set(GENERATED) == {"csv", "npy", "text", "idx", "cifar10"}
    schema = TypeAdapter(DataSpec).json_schema()
    for name, model in SOURCES.items():
        defn = schema["$defs"][model.__name__]
        assert defn["description"], name
        assert all(f.description for f in model.model_fields.values()), name
        assert model.model_config["extra"] == "forbid"
    with pytest.raises(SpecError, match="Extra inputs are not permitted"):
        parse_data_spec({"source": "sine", "lenght": 3})
    with pytest.raises(SpecError) as e:
        parse_data_spec({"source": "nope"})
    assert str(e.value) == ("unknown data source 'nope'\n  help: sources are: "
                            + ", ".join(SOURCES))
    with pytest.raises(SpecError, match="did you mean 'sine'"):
        parse_data_spec({"source": "sin"})
    with pytest.raises(SpecError, match="label: true needs y to name exactly one column"):
        parse_data_spec({"source": "csv", "path": "a.csv", "x": ["a"], "label": True})


# ------------------------------------------------------------------ generated sources

@pytest.mark.parametrize("source", list(GENERATED))
def test_generated_shapes_dtypes_determinism(source):
    params, shapes = GENERATED[source]
    a, b, c = gen(source, 1, **params), gen(source, 1, **params), gen(source, 2, **params)
    assert {k: v.shape for k, v in a.items()} == shapes
    for k, v in a.items():
        assert v.dtype == (np.int32 if v.dtype.kind == "i" else np.float32), k
        np.testing.assert_array_equal(v, b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    own = gen(source, 99, seed=1, **params)  # the spec's own seed wins over the run's
    assert all(np.array_equal(own[k], a[k]) for k in a)


def test_time_series_ranges():
    for source, params in [("sine", {}), ("series", {"kind": "sawtooth"}),
                           ("series", {"kind": "square"}), ("series", {"kind": "ar"})]:
        d = gen(source, samples=500, **params)
        assert np.abs(d["x"]).max() <= 1.5 and np.abs(d["y"]).max() <= 1.5, params
    d = gen("sine", samples=10, length=8, horizon=3)
    assert d["x"].shape == (10, 8, 1) and d["y"].shape == (10, 1)
    noisy = gen("sine", samples=10, noise=0.1)
    clean = gen("sine", samples=10)
    np.testing.assert_array_equal(noisy["y"], clean["y"])  # noise only touches the inputs
    assert not np.array_equal(noisy["x"], clean["x"])


def test_classification_sets():
    s = gen("spirals", samples=300, classes=4)
    assert np.bincount(s["y"]).tolist() == [75] * 4
    assert np.abs(s["x"]).max() <= 1.5
    x = gen("xor", samples=200, noise=0.0)
    assert np.array_equal(x["y"], (x["x"][:, 0] != x["x"][:, 1]).astype(np.int32))


def test_gaussian_mixture_near_centers():
    centers = gaussian_mixture_centers(6, 3.0)
    assert centers.shape == (6, 2) and centers.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 3.0, rtol=1e-6)
    x = gen("gaussian_mixture", samples=600, modes=6, radius=3.0, std=0.01)["x"]
    dist = np.linalg.norm(x[:, None] - centers, axis=2)
    assert dist.min(1).max() < 0.1
    assert len(np.unique(dist.argmin(1))) == 6


def test_adding_and_parity():
    d = gen("adding", samples=200, length=9)
    values, markers = d["x"][..., 0], d["x"][..., 1]
    assert set(np.unique(markers)) == {0.0, 1.0} and (markers.sum(1) == 2).all()
    assert (values >= 0).all() and (values <= 1).all()
    np.testing.assert_allclose(d["y"][:, 0], (values * markers).sum(1), rtol=1e-6)
    p = gen("parity", samples=200, length=7)
    assert set(np.unique(p["x"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(p["y"], p["x"][..., 0].sum(1).astype(int) % 2)


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_sequence_tasks(task):
    d = gen("sequence_task", task=task, length=7, vocab=4)
    assert d["x"].min() >= 0 and d["x"].max() < 4
    want = {"copy": d["x"], "reverse": d["x"][:, ::-1], "sort": np.sort(d["x"], 1)}[task]
    np.testing.assert_array_equal(d["y"], want)


def test_images_need_more_than_class_means():
    tr = gen("images", 0, samples=1000)
    va = gen("images", 1, samples=300)
    assert np.bincount(tr["y"]).tolist() == [100] * 10
    assert tr["x"].min() >= 0 and tr["x"].max() <= 1
    means = np.stack([tr["x"][tr["y"] == c].reshape(-1, 3 * 32 * 32).mean(0) for c in range(10)])
    flat = va["x"].reshape(len(va["x"]), -1)
    pred = ((flat ** 2).sum(1)[:, None] - 2 * flat @ means.T + (means ** 2).sum(1)).argmin(1)
    assert (pred == va["y"]).mean() < 0.4  # chance is 0.1: a class is not its mean image
    grey = gen("images", samples=8, size=12, channels=1, classes=3)
    assert grey["x"].shape == (8, 1, 12, 12)
    with pytest.raises(SpecError, match="size 12 is too small for 10 classes"):
        parse_data_spec({"source": "images", "size": 12})


def test_text_tokens_builtin_corpus():
    spec = parse_data_spec({"source": "text_tokens", "samples": 50, "length": 30})
    d = load_data(spec, ".", 0)
    np.testing.assert_array_equal(d["x"][:, 1:], d["y"][:, :-1])
    vocab = vocabulary(spec)
    assert vocab == sorted(set(CORPUS.read_text()))
    assert 20_000 <= CORPUS.stat().st_size <= 60_000
    window = "".join(vocab[i] for i in d["x"][0]) + vocab[d["y"][0, -1]]
    assert window in CORPUS.read_text()


def test_text_file_words(tmp_path):
    (tmp_path / "t.txt").write_text("the cat sat. the cat ran!\n")
    spec = parse_data_spec({"source": "text", "path": "t.txt", "level": "word", "length": 3,
                            "samples": 40})
    assert vocabulary(spec, tmp_path) == ["!", ".", "cat", "ran", "sat", "the"]
    d = load_data(spec, tmp_path, 0)
    stream = [5, 2, 4, 1, 5, 2, 3, 0]
    for x, y in zip(d["x"], d["y"], strict=True):
        i = next(i for i in range(5) if stream[i:i + 3] == x.tolist())
        assert stream[i + 1:i + 4] == y.tolist()
    raises("source 'sine' has no vocabulary", vocabulary, parse_data_spec({"source": "sine"}))
    e = raises("the text has 8 tokens; a window of length 8 needs 9", load_data,
               {"source": "text", "path": "t.txt", "level": "word", "length": 8}, tmp_path, 0)
    assert e.source == Source(str(tmp_path / "t.txt"))


# ------------------------------------------------------------------ CSV

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_round_trip(tmp_path):
    write(tmp_path / "d.csv", "a,b,kind,target\n1,2.5,cat,0.5\n\n-3,4e2,dog,1\n7,8,cat,2\n")
    d = load_data({"source": "csv", "path": "d.csv", "x": ["b", "a"], "y": "kind",
                   "label": True}, tmp_path, 0)
    np.testing.assert_array_equal(d["x"], np.array([[2.5, 1], [400, -3], [8, 7]], np.float32))
    assert d["x"].dtype == np.float32 and d["y"].dtype == np.int32
    assert d["y"].tolist() == [0, 1, 0]
    d = load_data({"source": "csv", "path": "d.csv", "x": ["a"], "y": ["target", "b"]},
                  tmp_path, 0)
    assert d["y"].tolist() == [[0.5, 2.5], [1, 400], [2, 8]]
    d = load_data({"source": "csv", "path": "d.csv", "x": ["a"], "y": "target", "label": True},
                  tmp_path, 0)
    assert d["y"].tolist() == [0, 1, 2]  # 0.5 is no integer: ids of sorted "0.5", "1", "2"
    write(tmp_path / "n.tsv", "1\t5\n2\t3\n")
    d = load_data({"source": "csv", "path": "n.tsv", "x": ["0"], "y": "1", "label": True,
                   "delimiter": "\t", "header": False}, tmp_path, 0)
    assert d["x"].tolist() == [[1], [2]] and d["y"].tolist() == [5, 3]


def test_csv_errors(tmp_path):
    e = raises(f"no such file: {tmp_path / 'nope.csv'}", load_data,
               {"source": "csv", "path": "nope.csv", "x": ["a"]}, tmp_path, 0)
    assert e.help == ("check the path; relative paths are resolved against the spec's folder "
                      f"({tmp_path})")
    f = write(tmp_path / "d.csv", "height,weight\n1,2\n3,x\n")
    e = raises("no column 'wieght'; the columns are: height, weight", load_data,
               {"source": "csv", "path": "d.csv", "x": ["wieght"]}, tmp_path, 0)
    assert e.help == "did you mean 'weight'?" and e.source == Source(str(f), 1)
    assert str(e) == (f"{f}:1: no column 'wieght'; the columns are: height, weight\n"
                      "  help: did you mean 'weight'?")
    e = raises("row 2, column 'weight': 'x' is not a number", load_data,
               {"source": "csv", "path": "d.csv", "x": ["height", "weight"]}, tmp_path, 0)
    assert e.source == Source(str(f), 3)
    write(tmp_path / "r.csv", "a,b\n1,2\n3\n")
    e = raises("this row has 1 cell, but there are 2 columns", load_data,
               {"source": "csv", "path": "r.csv", "x": ["a"]}, tmp_path, 0)
    assert e.source.line == 3
    write(tmp_path / "e.csv", "a,b\n")
    raises("the CSV file has a header but no data rows", load_data,
           {"source": "csv", "path": "e.csv", "x": ["a"]}, tmp_path, 0)


# ------------------------------------------------------------------ NumPy

def test_npy_and_npz(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    y = np.array([3, 1, 2, 0], dtype=np.int64)
    np.save(tmp_path / "a.npy", x)
    d = load_data({"source": "npy", "path": "a.npy", "key": "inputs"}, tmp_path, 0)
    assert list(d) == ["inputs"] and d["inputs"].dtype == np.float32
    np.testing.assert_array_equal(d["inputs"], x.astype(np.float32))
    np.savez(tmp_path / "b.npz", x=x, y=y)
    d = load_data({"source": "npy", "path": "b.npz"}, tmp_path, 0)
    assert d["y"].dtype == np.int32 and d["y"].tolist() == [3, 1, 2, 0]
    np.savez(tmp_path / "c.npz", x, labels=y)
    d = load_data({"source": "npy", "path": "c.npz", "keys": {"x": "arr_0", "y": "labels"}},
                  tmp_path, 0)
    np.testing.assert_array_equal(d["x"], x.astype(np.float32))
    np.testing.assert_array_equal(d["y"], y)
    e = raises("no array 'label' in the archive; it holds: arr_0, labels", load_data,
               {"source": "npy", "path": "c.npz", "keys": {"y": "label"}}, tmp_path, 0)
    assert e.help == "did you mean 'labels'?"
    np.savez(tmp_path / "bad.npz", x=x, y=y[:3])
    e = raises("arrays have different lengths: 'x' has 4 samples, 'y' has 3", load_data,
               {"source": "npy", "path": "bad.npz"}, tmp_path, 0)
    assert e.source == Source(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------ IDX

def idx_bytes(array: np.ndarray) -> bytes:
    magic = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return magic + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3)).astype(np.uint8)
    labels = np.array([7, 0, 3, 9, 1], np.uint8)
    suffix, pack = (".gz", gzip.compress) if gz else ("", bytes)
    (tmp_path / f"img{suffix}").write_bytes(pack(idx_bytes(images)))
    (tmp_path / f"lab{suffix}").write_bytes(pack(idx_bytes(labels)))
    spec = {"source": "idx", "images": f"img{suffix}", "labels": f"lab{suffix}"}
    d = load_data(spec, tmp_path, 0)
    assert d["x"].shape == (5, 1, 4, 3) and d["x"].dtype == np.float32
    np.testing.assert_allclose(d["x"][:, 0], images / 255, rtol=1e-6)
    assert d["y"].dtype == np.int32 and d["y"].tolist() == [7, 0, 3, 9, 1]
    raw = load_data({**spec, "normalize": False}, tmp_path, 0)
    np.testing.assert_array_equal(raw["x"][:, 0], images.astype(np.float32))


def test_idx_errors(tmp_path):
    images = np.zeros((5, 4, 3), np.uint8)
    good = idx_bytes(images)
    (tmp_path / "lab").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    (tmp_path / "cut").write_bytes(good[:-7])
    e = raises("truncated IDX file: expected 76 bytes, found 69", load_data,
               {"source": "idx", "images": "cut", "labels": "lab"}, tmp_path, 0)
    assert e.source == Source(str(tmp_path / "cut"))
    (tmp_path / "swapped").write_bytes(good)
    raises("not an IDX label file: the magic number is 0x00000803, expected 0x00000801",
           load_data, {"source": "idx", "images": "swapped", "labels": "swapped"}, tmp_path, 0)
    (tmp_path / "few").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    raises(f"there are 4 labels for 5 images in {tmp_path / 'swapped'}", load_data,
           {"source": "idx", "images": "swapped", "labels": "few"}, tmp_path, 0)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good)[:-10])
    raises("the gzip data is damaged or cut short", load_data,
           {"source": "idx", "images": "bad.gz", "labels": "lab"}, tmp_path, 0)


# ------------------------------------------------------------------ CIFAR-10

def write_cifar(path: Path, n: int, start: int) -> np.ndarray:
    data = (np.arange(n * 3072).reshape(n, 3072) + start) % 256
    with open(path, "wb") as f:
        pickle.dump({b"data": data.astype(np.uint8), b"labels": list(range(n))}, f)
    return data


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    first = write_cifar(folder / "data_batch_1", 3, 0)
    second = write_cifar(folder / "data_batch_2", 2, 5)
    write_cifar(folder / "test_batch", 4, 9)
    for paths in ["cifar-10-batches-py",
                  ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/data_batch_2"]]:
        d = load_data({"source": "cifar10", "paths": paths}, tmp_path, 0)
        assert d["x"].shape == (5, 3, 32, 32) and d["x"].dtype == np.float32
        want = np.concatenate([first, second]).reshape(5, 3, 32, 32) / 255
        np.testing.assert_allclose(d["x"], want, rtol=1e-6)
        assert d["y"].tolist() == [0, 1, 2, 0, 1]
    with open(tmp_path / "odd", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    raises("not a CIFAR-10 batch: data has shape [2, 100] for 2 labels, expected [2, 3072]",
           load_data, {"source": "cifar10", "paths": ["odd"]}, tmp_path, 0)
    with open(tmp_path / "dict", "wb") as f:
        pickle.dump({b"images": 1}, f)
    raises("not a CIFAR-10 batch: it has no b'data' and b'labels' entries",
           load_data, {"source": "cifar10", "paths": "dict"}, tmp_path, 0)
    (tmp_path / "junk").write_bytes(b"not a pickle")
    raises("not a CIFAR-10 batch: it cannot be unpickled",
           load_data, {"source": "cifar10", "paths": ["junk"]}, tmp_path, 0)


# ------------------------------------------------------------------ split and batches

def numbered(n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(n, dtype=np.float32)[:, None] * [1, -1], "y": np.arange(n)}


def test_split():
    data = numbered(100)
    train, val = split(data, 0.2, seed=3)
    assert len(train["y"]) == 80 and len(val["y"]) == 20
    assert set(train["y"]).isdisjoint(val["y"]) and len(set(train["y"]) | set(val["y"])) == 100
    np.testing.assert_array_equal(train["x"][:, 0], train["y"])  # rows stay together
    again, _ = split(data, 0.2, seed=3)
    other, _ = split(data, 0.2, seed=4)
    assert np.array_equal(again["y"], train["y"]) and not np.array_equal(other["y"], train["y"])
    assert len(split(numbered(5), 0.01, 0)[1]["y"]) == 1
    assert len(split(numbered(5), 0.0, 0)[1]["y"]) == 0
    raises("val_fraction must be in [0, 1), got 1.5", split, data, 1.5, 0)


def test_batches():
    data = numbered(10)
    epoch0 = list(batches(data, 3, seed=1, epoch=0))
    assert [len(b["y"]) for b in epoch0] == [3, 3, 3] and num_batches(data, 3) == 3
    for b in epoch0:
        np.testing.assert_array_equal(b["x"][:, 0], b["y"])
    order = lambda e, s=1: np.concatenate([b["y"] for b in batches(data, 5, s, e)]).tolist()
    assert sorted(order(0)) == list(range(10))
    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, s=2)
    assert order(0) != list(range(10))
    plain = list(batches(data, 4, 0, 0, shuffle=False, drop_last=False))
    assert [b["y"].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert num_batches(data, 4, drop_last=False) == 3
    e = raises("there are only 10 samples, fewer than one batch of 16", batches, data, 16, 0, 0)
    assert e.help == "use a batch size of at most 10, or more samples"
    assert len(list(batches(data, 16, 0, 0, drop_last=False))) == 1


def test_generation_is_fast():
    import time
    start = time.perf_counter()
    for source in GENERATED:
        gen(source, samples=3000)
    assert time.perf_counter() - start < 3.0


# ------------------------------------------------------------------ standardize, stratify, vocab

TABLE_SPEC = """\
dlgraph: 1
name: table
inputs:
  x: {{shape: [batch, 3]}}
  y: {{shape: [batch], dtype: int32}}
nodes:
  logits: {{op: linear, in: x, out: 3}}
  loss: {{op: cross_entropy, in: [logits, y]}}
outputs: [logits]
train:
  data: {{source: csv, path: t.csv, x: [a, b, c], y: label, label: true{extra}}}
  batch: 16
  epochs: 1
  objective: loss
  optimizer: {{type: sgd, lr: 0.1}}
  validation: {{split: 0.25{validation}}}
"""


def _table(tmp_path: Path, n: int = 320, extra: str = ", standardize: true",
           validation: str = "", labels: np.ndarray | None = None):
    """A CSV of three features of very different scales (one constant) and 3 classes,
    and the graph of a spec that reads it."""
    import dlgraph
    rng = np.random.default_rng(7)
    x = np.stack([rng.normal(5, 2, n), rng.normal(-300, 80, n), np.full(n, 4.5)], 1)
    x[:8, 0] = 1e4                          # outliers: wherever they land, they move the mean
    y = rng.integers(0, 3, n) if labels is None else labels
    (tmp_path / "t.csv").write_text("a,b,c,label\n" + "".join(
        f"{r[0]!r},{r[1]!r},{r[2]!r},{k}\n" for r, k in zip(x.tolist(), y.tolist(), strict=True)))
    (tmp_path / "t.yaml").write_text(TABLE_SPEC.format(extra=extra, validation=validation))
    return dlgraph.load(tmp_path / "t.yaml"), x, y


def test_standardize_uses_the_training_split_only(tmp_path):
    from sklearn.preprocessing import StandardScaler

    from dlgraph.engine.train.prepare import split_data
    g, x, _ = _table(tmp_path)
    raw_train, raw_val, _, none = split_data(g, g.spec.train, standardize=False)
    train, val, _, stats = split_data(g, g.spec.train)
    assert none == {} and list(stats) == ["x"] and len(val["x"]) == 80
    ref = StandardScaler().fit(raw_train["x"].astype(np.float64))
    np.testing.assert_allclose(stats["x"][0], ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(stats["x"][1], ref.scale_, rtol=1e-12)   # constant column: 1
    np.testing.assert_allclose(train["x"], ref.transform(raw_train["x"]), atol=1e-5)
    np.testing.assert_allclose(val["x"], ref.transform(raw_val["x"]), atol=1e-5)
    assert train["x"].dtype == np.float32 and np.array_equal(train["y"], raw_train["y"])
    # the validation rows stayed out: the statistics of all rows are not these
    assert not np.allclose(stats["x"][0], x.mean(0)) and not np.allclose(stats["x"][1][:2],
                                                                          x.std(0)[:2])


def test_standardize_errors_are_located(tmp_path):
    from dlgraph.engine.train.prepare import split_data
    g, *_ = _table(tmp_path, extra=", standardize: [y]")
    with pytest.raises(DataError, match="cannot standardize 'y': it holds int32 values") as e:
        split_data(g, g.spec.train)
    assert e.value.source.line == 11
    g, *_ = _table(tmp_path, extra=", standardize: [xx]")
    with pytest.raises(SpecError, match="standardize names 'xx', which feeds no input") as e:
        split_data(g, g.spec.train)
    assert "did you mean 'x'?" in str(e.value)


def test_stratified_split_keeps_each_class_share(tmp_path):
    from sklearn.model_selection import train_test_split

    from dlgraph.engine.train.prepare import split_data
    labels = np.repeat([0, 1, 2], [224, 64, 32])          # 70%, 20%, 10% of 320
    g, x, y = _table(tmp_path, extra="", validation=", stratify: y", labels=labels)
    train, val, _, _ = split_data(g, g.spec.train)
    _, y_ref = train_test_split(labels, test_size=len(val["y"]), stratify=labels,
                                random_state=0)
    assert len(val["y"]) == 80
    assert np.bincount(val["y"]).tolist() == np.bincount(y_ref).tolist() == [56, 16, 8]
    assert np.bincount(train["y"]).tolist() == [168, 48, 24]
    rows = np.concatenate([train["x"][:, 1], val["x"][:, 1]])      # column b is unique
    assert sorted(rows.tolist()) == sorted(x[:, 1].astype(np.float32).tolist())
    # uneven shares: the rounding hands the leftover rows to the largest remainders
    from dlgraph.engine.io.data import split
    lab = np.repeat([0, 1, 2], [5, 3, 2])
    _, v = split({"y": lab}, 0.3, 0, stratify=lab)
    # shares 1.5, 0.9, 0.6: floors 1, 0, 0, and the two rows left go to 0.9 and 0.6
    assert np.bincount(v["y"], minlength=3).tolist() == [1, 1, 1]


def test_stratify_errors(tmp_path):
    from dlgraph.engine.train.prepare import split_data
    g, *_ = _table(tmp_path, validation=", stratify: lable")
    with pytest.raises(SpecError, match="validation.stratify names 'lable', which is not an "
                                        "input") as e:
        split_data(g, g.spec.train)
    assert e.value.source.line == 16
    g, *_ = _table(tmp_path, validation=", stratify: x")
    with pytest.raises(DataError, match=r"one integer class label per sample; 'x' is float32 "
                                        r"of shape \[320, 3\]"):
        split_data(g, g.spec.train)


def test_validate_catches_bad_standardize_and_stratify_names(tmp_path):
    import dlgraph
    for extra, validation, message in [
            (", standardize: [y]", "", "t.yaml:11: cannot standardize 'y': the input is int32"),
            (", standardize: [z]", "", "t.yaml:11: standardize names 'z', which feeds no input"),
            ("", ", stratify: yy", "t.yaml:16: validation.stratify names 'yy', which is not "
                                   "an input of the graph\n  help: did you mean 'y'?"),
            ("", ", stratify: x", "t.yaml:16: validation.stratify needs one integer class label "
                                  "per sample; 'x' is float32 of shape [batch, 3]")]:
        _table(tmp_path, 40, extra=extra, validation=validation)
        with pytest.raises(dlgraph.DlgraphError) as e:
            dlgraph.validate(tmp_path / "t.yaml")
        assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)


VOCAB_SPEC = """\
dlgraph: 1
name: lm
inputs:
  x: {{shape: [batch, 4], dtype: int32}}
  y: {{shape: [batch, 4], dtype: int32}}
nodes:
  emb: {{op: embedding, in: x, num: vocab, dim: 8}}
  logits: {{op: linear, in: emb, out: vocab}}
  loss: {{op: cross_entropy, in: [logits, y]}}
outputs: [logits]
train:
  data: {data}
  batch: 8
  objective: loss
  optimizer: {{type: adam, lr: 0.01}}
"""


def test_vocab_is_the_text_sources_vocabulary_size(tmp_path):
    import dlgraph
    (tmp_path / "t.txt").write_text("abracadabra, cab!")
    g = dlgraph.load(VOCAB_SPEC.format(data="{source: text, path: t.txt, length: 4}"),
                     base=tmp_path)
    size = len(set("abracadabra, cab!"))                       # a b r c d , space ! = 8
    assert size == 8 and g.params["emb.weight"].shape == (8, 8)
    assert g.params["logits.weight"].shape == (8, 8)
    assert g.spec.nodes["emb"].num == 8 and g.spec.nodes["logits"].out == 8
    g = dlgraph.load(VOCAB_SPEC.format(data="{source: text_tokens, length: 4, level: word}"))
    assert g.spec.nodes["emb"].num == len(vocabulary(parse_data_spec(
        {"source": "text_tokens", "level": "word"})))


def test_vocab_without_a_text_source_is_a_located_error():
    import dlgraph
    with pytest.raises(SpecError) as e:
        dlgraph.load(VOCAB_SPEC.format(data="{source: sequence_task, length: 4}"))
    assert str(e.value) == (
        "<string>:7: 'vocab' is the vocabulary size of a text data source, and this spec's "
        "data is 'sequence_task'\n  help: write the size as a number, or train on "
        "`source: text` / `text_tokens`")


def test_export_digits_writes_scikit_learns_digits(tmp_path, capsys):
    import importlib.util

    from sklearn.datasets import load_digits
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("export_digits",
                                                  root / "scripts" / "export_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["-o", str(tmp_path / "d.npz")]) == 0
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'd.npz'}: x [1797, 1, 8, 8], y [1797] "
                                       "(174-183 per digit)\n")
    ref = load_digits()
    got = load_data({"source": "npy", "path": "d.npz"}, tmp_path, 0)  # as digits.yaml reads it
    np.testing.assert_array_equal(got["x"].reshape(-1, 64) * 16, ref.data)
    np.testing.assert_array_equal(got["y"], ref.target)
    assert got["x"].dtype == np.float32 and got["y"].dtype == np.int32
