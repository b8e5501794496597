# The two commands of the quick start: `make run` and `make test`.
# Each sets up what is missing first (system packages, .venv), then does its job.

.PHONY: run test setup setup-test lint bench examples clean fuzz bytecode

run: .venv/.installed bytecode
	.venv/bin/dlgraph run graphs/lstm.yaml

test: .venv/.installed-test bytecode
	.venv/bin/python scripts/export_digits.py   # graphs/digits.yaml's data (scikit-learn is a test extra)
	.venv/bin/python -m pytest

setup: .venv/.installed bytecode
setup-test: .venv/.installed-test bytecode

# dlgraph's own modules byte-compiled, as pip does for an installed (not editable) package:
# Python reads them instead of compiling about 80 modules at every start (0.2 s of each
# `dlgraph run`), also where PYTHONDONTWRITEBYTECODE keeps it from writing them itself.
bytecode: .venv/.installed
	.venv/bin/python -m compileall -q dlgraph engine ops cli >/dev/null

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

.venv/.installed-test: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh test
	touch $@ .venv/.installed

# 5,000 seeded mutations of graphs/*.yaml: nothing but DlgraphError may escape `validate`
# and no mutation may take over 10 s (DLGRAPH_FUZZ_SEED=N for other mutations).
fuzz: .venv/.installed-test
	DLGRAPH_FUZZ=5000 .venv/bin/python -m pytest tests/test_hardening.py -q -k fuzz

lint: .venv/.installed-test
	.venv/bin/ruff check .

bench: .venv/.installed-test bytecode
	.venv/bin/python bench/run.py

examples: .venv/.installed bytecode
	-.venv/bin/python scripts/export_digits.py   # graphs/digits.yaml's data, if scikit-learn is there
	.venv/bin/python bench/examples.py

clean:
	rm -rf .venv runs build *.egg-info

.PHONY: onnx-conformance
onnx-conformance: .venv/.installed-test
	.venv/bin/python -m dlgraph.engine.io.onnx.conformance -o docs/onnx.md
