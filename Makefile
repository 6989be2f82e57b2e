# The two quick-start commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, pinned, unless the environment already has one: an open range would pull a multi-GB build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The bundled pipelines are tiny: on a small shared CPU one thread per process beats torch's default by far.
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test bench bench-gpu docs clean

setup: $(VENV)/.installed

# torchcfm goes in without its dependencies: its torchdyn would pull torchvision, a CUDA build (pyproject.toml, `libs`).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "torchcfm>=1.0.7"
	touch $@

demo: setup
	$(BIN)/fmcheck all --module fixtures.digits:build

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/startup.py --repeats 15
	$(BIN)/python bench/scale_overhead.py --repeats 3
	$(BIN)/python bench/overfit_overhead.py --pipeline digits --repeats 7 --skip-verdict
	$(BIN)/python bench/overfit_overhead.py --pipeline digits --repeats 3
	$(BIN)/python bench/whole_run.py --repeats 3

# On a machine with a CUDA GPU: the DiT-B reference through scale and overfit (bench/README.md)
bench-gpu: setup
	$(BIN)/python bench/gpu.py --out bench/gpu-latest.json

docs: setup
	$(BIN)/python scripts/gen_docs.py

clean:
	rm -rf $(VENV) build dist *.egg-info
