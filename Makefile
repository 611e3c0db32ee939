# One command each: `make test` (tests) and `make demo` (the demo job).
# Both create .venv on first use. torch is pinned to the local CPU build through
# constraints.txt so that no dependency pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-cluster demo bench-env clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[pipelines,test,cluster,eval,faiss]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Tests that start their own Ray clusters (multi-node, node loss, job submission): minutes on 2 cores.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

demo: $(STAMP)
	$(BIN)/influence demo --output demo_output
	@echo "with make's venv: $(BIN)/influence show demo_output/results --bottom; $(BIN)/influence sql demo_output/results;"
	@echo "the report: demo_output/results/report.html (open it in a browser; no server needed)"

# Benchmark-only dependencies (kronfluence is a benchmark dependency, never a runtime one).
# kronfluence goes in without its dependencies: it asks for torchvision, whose wheel does not match
# the CPU build of torch here (transformers then fails to import); it runs without it.
bench-env: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt accelerate einops einconv opt_einsum scipy
	$(BIN)/pip install --quiet --no-deps 'kronfluence>=1.0'
	# kronfluence 1.0.1's wheel also installs its own top-level `tests` package, which would shadow ours
	rm -rf $(VENV)/lib/python*/site-packages/tests

clean:
	rm -rf $(VENV) demo_output bench_output
