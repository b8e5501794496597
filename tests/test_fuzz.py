"""Property-based fuzzing of the example specs with hypothesis: whatever a mutation does to
a spec (hostile values, deleted or misspelt keys, other ops, values moved elsewhere, damaged
text), `validate` raises nothing but a DlgraphError, within 10 s. Hypothesis shrinks a
failure to the smallest mutation that shows it. The seeded fuzzer in test_hardening.py
(`make fuzz`: 5,000 mutations) covers volume; this one covers the shapes of input a
hand-written list of hostile values would not think of.
"""

from pathlib import Path

import pytest
import yaml

import dlgraph

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "graphs").glob("*.yaml"))}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["batch", "x", "relu", "lstm", "1e12", "-1", "[]", "{}"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
mutation = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 4), values)


def _paths(v, path=()):
    yield path
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, path + (i,))


def _apply(data, where: float, kind: int, value):
    paths = list(_paths(data))[1:]
    if not paths:
        return
    path = paths[int(where * len(paths))]
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    if kind <= 1:
        parent[key] = value                                  # a hostile value
    elif kind == 2 and isinstance(parent, dict):
        del parent[key]                                      # a missing key
    elif kind == 3 and isinstance(parent, dict):
        parent[f"{key}_" if isinstance(key, str) else "extra"] = parent.pop(key)   # misspelt
    else:
        other = paths[int(where * 7919) % len(paths)]        # a value from elsewhere
        v = data
        for p in other:
            v = v[p]
        if other[:len(path)] != path:
            parent[key] = yaml.safe_load(yaml.safe_dump(v))


@settings(max_examples=120, deadline=10_000, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(name=st.sampled_from(sorted(SPECS)), mutations=st.lists(mutation, min_size=1, max_size=3),
       damage=st.one_of(st.none(), st.tuples(st.floats(0, 1, exclude_max=True),
                                             st.sampled_from(list("\x00:[{&*\t\"'")))))
def test_mutated_examples_raise_only_dlgraph_errors(name, mutations, damage, monkeypatch_dir):
    data = yaml.safe_load(yaml.safe_dump(SPECS[name]))
    for where, kind, value in mutations:
        _apply(data, where, kind, value)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if damage is not None:
        cut = int(damage[0] * len(text))
        text = text[:cut] + damage[1] + text[cut + 1:]
    try:
        dlgraph.validate(text)
    except dlgraph.DlgraphError:
        pass


@pytest.fixture(scope="module")
def monkeypatch_dir():
    """Relative data paths and modules resolve as they do for graphs/."""
    import os
    old = os.getcwd()
    os.chdir(ROOT / "graphs")
    yield
    os.chdir(old)
