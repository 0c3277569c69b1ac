# Every target sets itself up: a virtual environment in .venv, the package installed in
# editable mode, and the gRPC stubs generated from protos/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
STUBS := lightllm_grpc/_proto/.generated
ARGS ?=
DURATION ?= 60

.PHONY: venv proto serve test test-gpu test-gpu-all lint format bench bench-gpu bench-gpu-tp soak clean

venv: $(STAMP)

# torch==2.13.0 first: a CPU build that pip finds on this kind of machine's disk; a bare
# "torch" could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Stubs are regenerated whenever a .proto changes.
$(STUBS): $(STAMP) $(PROTOS)
	$(PY) -m lightllm_grpc.protogen
	touch $(STUBS)

proto: $(STUBS)

serve: $(STUBS)
	$(VENV)/bin/lightllm-grpc serve $(ARGS)

test: $(STUBS)
	$(PY) -m pytest -q -m "not gpu" $(ARGS)

test-gpu: $(STUBS)
	$(PY) -m pytest -q -m gpu $(ARGS)

# Every GPU test at once on a GPU machine's image (no install): jobs spread over all its cards,
# the two-GPU ones on pairs (tests/gpu_runner.py). Needs the stubs (make proto) in the tree.
test-gpu-all:
	PYTHONPATH=.:kernels $(PYTHON) -m tests.gpu_runner $(ARGS)

BUF := tools/node_modules/.bin/buf

lint: $(STUBS) $(BUF)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(BUF) lint
	$(BUF) breaking --against protos/released.binpb

# buf, pinned to an exact version in tools/package.json (buf pins its per-platform binary
# packages exactly itself); only lint needs it (tests do not need npm). No lock file: npm
# records only this platform's optional binary in one, and `npm ci` then fails elsewhere.
$(BUF): tools/package.json
	npm install --prefix tools --no-audit --no-fund --no-package-lock
	touch $@

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STUBS)
	$(VENV)/bin/lightllm-grpc bench load $(ARGS)

# Mixed load (cancels, short deadlines, seeded sampling) against a CPU server it starts, or
# ARGS="--address HOST:PORT": requests served, errors by code, p99 latency, KV and RSS.
soak: $(STUBS)
	$(PY) -m lightllm_grpc.bench.soak --duration $(DURATION) $(ARGS)

# On a GPU machine whose image already has torch/triton/transformers/grpcio (no install).
bench-gpu:
	PYTHONPATH=.:kernels $(PYTHON) -m lightllm_grpc.bench.gpu $(ARGS)

# Two GPUs: TP=1 against TP=2 (P2P all-reduce on and off) and the all-reduce's share of decode.
bench-gpu-tp:
	PYTHONPATH=.:kernels $(PYTHON) -m lightllm_grpc.bench.gpu_tp $(ARGS)

clean:
	rm -rf $(VENV) lightllm_grpc/_proto build *.egg-info
