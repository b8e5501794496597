"""The JSON Schema of the spec format (`dlgraph schema`), checked with the `jsonschema` package.

It must accept every spec dlgraph accepts: the specs we ship, one spec per example of every
op, and thousands of mutated specs that `validate` still reads. It must reject what a schema
can decide (unknown or missing fields, wrong types, bad names, unknown sources), listed
below; what needs the whole graph (references, shapes, module args) stays `validate`'s.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import cases, op_spec

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.spec.read import validate_data
from dlgraph.ops import REGISTRY

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(p for p in [*ROOT.glob("graphs/**/*.yaml"), *ROOT.glob("bench/specs/*.yaml"),
                           *ROOT.glob("tests/specs/good/*.yaml"),
                           *ROOT.glob("tests/specs/modules/*.yaml")]
               if "pipelines" not in p.parts)      # graphs/pipelines/: dlgraph pipeline files
BAD = ROOT / "tests/specs/bad"

REJECTED = {
    "activation_case.yaml": ["nodes", "fc1", "activation"],     # 'Relu': not an activation op
    "bad_node_id.yaml": ["nodes"],                              # '2fc'
    "bad_source.yaml": ["train", "data"],                       # source 'spiral'
    "bad_value.yaml": ["nodes", "fc1", "out"],                  # 'eight'
    "batch_yes.yaml": ["train", "batch"],
    "bool_as_count.yaml": ["nodes", "fc1", "out"],              # true
    "data_unknown_field.yaml": ["train", "data"],               # clases
    "empty.yaml": [],
    "include_not_spec.yaml": ["include", 0],                    # version.yaml.err
    "include_number.yaml": ["include"],
    "include_string.yaml": ["include"],
    "keras_units.yaml": ["nodes", "fc1"],                       # units
    "lr_nan_string.yaml": ["train", "optimizer", "lr"],         # 'nan'
    "missing_field.yaml": ["nodes", "fc1"],                     # no `out`
    "missing_op.yaml": ["nodes", "fc1"],
    "module_bad_input_name.yaml": ["modules", "block", "inputs", 0],
    "module_bad_node_id.yaml": ["modules", "block", "nodes"],   # '1h'
    "module_duplicate_input.yaml": ["modules", "pair", "inputs"],
    "modules_not_mapping.yaml": ["modules"],
    "no_nodes.yaml": [],
    "not_mapping.yaml": [],
    "op_list.yaml": ["nodes", "a", "op"],
    "optimizer_unknown_field.yaml": ["train", "optimizer"],     # momentom
    "slice_step.yaml": ["nodes", "s"],                          # step
    "unknown_field.yaml": ["nodes", "fc1"],                     # outs
    "version.yaml": ["dlgraph"],                                # 2
    "version_bool.yaml": ["dlgraph"],                           # true
}
"""Bad specs (tests/specs/bad/) the schema rejects, and where its error points."""

NOT_DECIDED = {
    "unknown_op.yaml": "any op that is not built in may be a module of the spec",
    "arity.yaml": "the number of inputs an op takes", "broadcast.yaml": "shapes",
    "flatten_order.yaml": "shapes", "labels_dtype.yaml": "dtypes", "layer_norm_dims.yaml":
    "shapes", "layer_shapes.yaml": "shapes", "matmul_shapes.yaml": "shapes",
    "reshape_batch_twice.yaml": "shapes", "pool_padding.yaml": "padding against the kernel",
    "bad_output.yaml": "references", "bad_subref.yaml": "references", "cycle.yaml":
    "references", "dangling.yaml": "references", "objective.yaml": "references",
    "input_node_clash.yaml": "names across sections", "init_key.yaml": "parameter names",
    "unreachable_param.yaml": "the graph", "share_other_op.yaml": "references",
    "share_other_size.yaml": "shapes", "three_independent_mistakes.yaml": "shapes",
    "module_bad_output.yaml": "references", "module_input_node_clash.yaml": "names across "
    "sections", "module_missing_inputs.yaml": "a module's inputs at its call",
    "module_self_reference.yaml": "references", "module_unknown_input.yaml": "references",
    "kernel_wrong_length.yaml": "an op's own field check (one int or [h, w])",
    "noise_shape.yaml": "an op's own field check", "padding_negative.yaml": "an op's own "
    "field check", "padding_three.yaml": "an op's own field check", "stride_zero.yaml":
    "an op's own field check",
    "include_outside.yaml": "the file system", "train_data_missing.yaml": "the file system",
    "train_batch_norm_batch_1.yaml": "the train section against the graph",
    "train_duplicate_phases.yaml": "names across a list",
    "train_feed_not_input.yaml": "the train section against the graph",
    "train_metric_missing.yaml": "references", "train_metric_shapes.yaml": "shapes",
    "train_target_not_logged.yaml": "the train section against the graph",
    "duplicate_key.yaml": "YAML text (a parsed mapping has one key)", "duplicate_key.json":
    "JSON text", "merge_key.yaml": "YAML text", "recursive_anchor.yaml": "YAML text",
    "alias_bomb.yaml": "the size of the text", "deep_nesting.yaml": "the size of the text",
    "control_char.yaml": "YAML text", "non_utf8.yaml": "the encoding", "python_tag.yaml":
    "YAML text", "syntax.yaml": "YAML text", "syntax.json": "JSON text",
    "nan.json": "NaN (JSON Schema numbers include it)", "nan_value.yaml": "NaN",
}
"""Bad specs whose mistake a JSON Schema cannot see, and what it would need to know."""


@pytest.fixture(scope="module")
def validator():
    schema = dlgraph.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator, data) -> list:
    return sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))


TAGS = ("op", "source", "type")     # what tells the branches of a node, data source, optimizer


def pinpoint(err):
    """The error inside the one branch of a `oneOf` whose tag (`op`, ...) matched: what an
    editor shows (jsonschema's best_match stops at "not valid under any of the schemas")."""
    while err.context:
        branches: dict = {}
        for c in err.context:
            branches.setdefault(c.relative_schema_path[0], []).append(c)
        fits = [cs for cs in branches.values() if not any(
            list(c.relative_path) in ([t] for t in TAGS) and c.validator in ("const", "not",
                                                                             "enum")
            for c in cs)]
        if len(fits) != 1:
            return err
        err = jsonschema.exceptions.best_match(fits[0])
    return err


def test_the_schema_has_an_id_a_version_and_is_what_the_cli_prints():
    s = dlgraph.schema()
    assert s["$id"] == "urn:dlgraph:spec:1"
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["title"] == "dlgraph spec, version 1"
    assert s["$defs"]["GraphSpec"]["properties"]["dlgraph"]["const"] == 1
    # only JSON Schema's keywords: validators in strict mode (ajv's default) refuse others
    assert '"discriminator"' not in json.dumps(s)
    r = CliRunner().invoke(main, ["schema"])
    assert r.exit_code == 0 and json.loads(r.output) == s


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_spec_we_ship_is_valid(validator, path):
    data = yaml.safe_load(path.read_text())
    assert [(list(e.absolute_path), e.message) for e in errors(validator, data)] == []


def test_a_node_matches_exactly_one_branch(validator):
    """Each node is one op's model (by its `op`) or a module call (an op not built in)."""
    s = dlgraph.schema()
    branches = s["$defs"]["GraphSpec"]["properties"]["nodes"]["additionalProperties"]["oneOf"]
    assert len(branches) == len(REGISTRY) + 1
    def branch(ref: str):
        return validator.evolve(schema={"$defs": s["$defs"], "$ref": ref})

    for node, hit in [({"op": "linear", "in": "x", "out": 3}, "LinearNode"),
                      ({"op": "add", "in": ["x", "y"]}, "AddNode"),
                      ({"op": "block", "in": "x", "hidden": 8}, "ModuleCall")]:
        assert [b["$ref"] for b in branches if branch(b["$ref"]).is_valid(node)] == \
            [f"#/$defs/{hit}"]
    # a built-in op with a field it lacks is no module call either: no branch matches
    assert not branch("#/$defs/ModuleCall").is_valid({"op": "linear", "in": "x", "units": 3})


@pytest.mark.parametrize("kind", ["examples", "grad_examples"])
def test_a_spec_of_every_op_example_is_valid(validator, kind):
    """One spec per example of every registered op (the specs tests/test_ops.py and
    tests/test_gradients.py run), each read by dlgraph first."""
    ops = set()
    for case in cases(kind):
        data = op_spec(case, grad=kind == "grad_examples", out_shape=(1,))
        validate_data(copy.deepcopy(data), {}, "<example>")
        assert errors(validator, data) == [], case.id
        ops.add(case.op)
    assert ops == set(REGISTRY) if kind == "examples" else len(ops) > 40


VALUES = [1, 2, 3, 8, 64, 0.5, 1e-3, True, False, None, "relu", "tanh", "gelu", "x", "batch",
          "vocab", "zeros", [1, 2], [3, 3], [], {}, "sum", "mean", -1, 0]


def _mutate(data, rng: random.Random) -> None:
    paths, stack = [], [((), data)]
    while stack:
        path, v = stack.pop()
        if path:
            paths.append(path)
        if isinstance(v, dict):
            stack.extend((path + (k,), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((path + (i,), x) for i, x in enumerate(v))
    path = rng.choice(sorted(paths, key=str))
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    old, r = parent[path[-1]], rng.random()
    if isinstance(parent, dict) and r < 0.2:
        del parent[path[-1]]
    elif r < 0.6:                                # another value of the same kind
        same = [v for v in VALUES if type(v) is type(old)]
        parent[path[-1]] = copy.deepcopy(rng.choice(same or VALUES))
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))


def test_every_mutated_spec_that_dlgraph_reads_is_valid_for_the_schema(validator,
                                                                        monkeypatch):
    """Seeded small mutations (a value changed, a key dropped) of the shipped specs: the
    schema never rejects one that dlgraph loads."""
    monkeypatch.chdir(ROOT / "graphs")          # includes and data files as for graphs/
    rng, accepted = random.Random(1), 0
    specs = [yaml.safe_load(p.read_text()) for p in SPECS if "nodes" in p.read_text()]
    for k in range(3000):
        data = copy.deepcopy(specs[k % len(specs)])
        for _ in range(rng.randint(1, 2)):
            _mutate(data, rng)
        try:
            dlgraph.load(copy.deepcopy(data), base=ROOT / "graphs")
        except DlgraphError:
            continue
        accepted += 1
        assert [(list(e.absolute_path), e.message) for e in errors(validator, data)] == [], \
            yaml.safe_dump(data, sort_keys=False)
    assert accepted >= 250      # (339 of the 3000 seeded mutations keep the spec valid)


def test_the_lists_of_bad_specs_name_fixtures_that_exist():
    """A bad fixture goes into REJECTED (with where the schema's error points) when a JSON
    Schema can see its mistake, else into NOT_DECIDED with the reason."""
    names = {p.name for p in BAD.iterdir() if p.suffix in (".yaml", ".json")}
    assert sorted((set(REJECTED) | set(NOT_DECIDED)) - names) == []
    assert not set(REJECTED) & set(NOT_DECIDED)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_bad_specs_a_schema_can_decide_are_rejected(validator, name):
    data = yaml.safe_load((BAD / name).read_text())
    found = errors(validator, data)
    assert found, f"{name} passed the schema"
    best = pinpoint(jsonschema.exceptions.best_match(found))
    assert list(best.absolute_path)[:len(REJECTED[name])] == REJECTED[name], best.message


MLP = {"dlgraph": 1, "name": "t", "inputs": {"x": {"shape": ["batch", 4]}},
       "nodes": {"fc": {"op": "linear", "in": "x", "out": 3}}, "outputs": ["fc"]}


def _with(path, value):
    data = copy.deepcopy(MLP)
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return data


@pytest.mark.parametrize("path, value", [
    (("nodes", "fc", "in"), 3),                            # in: a name or a list of names
    (("nodes", "fc", "in"), ["x", 1]),
    (("nodes", "fc", "in"), "x y"),                        # not a name
    (("nodes", "fc", "out"), "3"),                         # a count, not text
    (("nodes", "fc", "activation"), "Relu"),
    (("nodes", "fc", "op"), 7),
    (("nodes", "fc", "units"), 3),                         # unknown field of a built-in op
    (("inputs", "x", "shape"), ["batch", 0]),              # dims are positive or names
    (("inputs", "x", "shape"), ["batch size", 4]),
    (("inputs", "x", "dtype"), "float64"),
    (("inputs", "2x"), {"shape": [4]}),
    (("modules",), {"linear": {"inputs": ["x"], "nodes": {"a": {"op": "relu", "in": "x"}},
                               "outputs": ["a"]}}),      # a module named like a built-in op
    (("modules",), {"m": {"inputs": ["x"], "nodes": {"a": {"in": "x"}}, "outputs": ["a"]}}),
    (("outputs",), "fc"),
    (("dlgraph",), "1"),
    (("extra",), 1),                                       # unknown top-level field
])
def test_hand_written_invalid_specs_are_rejected(validator, path, value):
    data = _with(path, value)
    with pytest.raises(DlgraphError):
        dlgraph.load(copy.deepcopy(data))
    assert errors(validator, data), (path, value)


def test_a_module_library_is_valid_and_a_spec_is_not_mistaken_for_one(validator):
    lib = {"dlgraph": 1, "modules": {"block": {"inputs": ["x"], "args": {"n": None},
                                               "nodes": {"a": {"op": "linear", "in": "x",
                                                               "out": "$n"}},
                                               "outputs": ["a"]}}}
    assert errors(validator, lib) == []
    assert errors(validator, {**lib, "nodes": {}})       # a library has no nodes ...
    assert errors(validator, {k: v for k, v in MLP.items() if k != "nodes"})  # ... a spec has
