# effpipe: every target creates .venv and installs the package when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU=1 installs TensorFlow's CUDA build (setup.cfg's gpu extra), GPU=0 the plain one;
# by default GPU=1 exactly when nvidia-smi lists a GPU.
GPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo 1 || echo 0)
COMMA := ,
EXTRAS := $(if $(filter 1,$(GPU)),test$(COMMA)gpu,test)
# Reinstall when the package metadata, or the GPU choice, changes.
STAMP := $(VENV)/.installed-gpu$(GPU)

.PHONY: venv demo test bench tune-gpu gpu-check lint format clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-gpu*
	touch $(STAMP)

# The offline demo: synthetic shapes, EfficientNet-B0 from scratch, both phases, on CPU.
# Rerunning resumes an interrupted demo, or says it finished (rm -rf runs/demo to redo).
# `make demo SEED=1` runs it with another seed, into runs/demo-seed1.
SEED ?= 0
DEMO_DIR := runs/demo$(if $(filter-out 0,$(SEED)),-seed$(SEED))
demo: venv
	$(PY) -m effpipe.train --flagfile=flags/demo.flags --seed=$(SEED) --workdir=$(DEMO_DIR)

# Two test processes (pytest-xdist), whole files each: while one waits on a
# subprocess or traces a model on one core, the other uses the second. Files are
# handed out in collection order, slowest first (tests/conftest.py), not xdist's
# default of most tests first, which left the one-test demo file to the end.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# The microbenchmarks at their defaults (CPU-sized: b0 at 224 px), and the input
# benchmark on a folder of 2,000 real photos it makes once; a few minutes.
bench: venv
	$(PY) -m benchmarks.input_throughput
	$(PY) -m benchmarks.photo_folder --path=runs/photos2000 --num_photos=2000
	$(PY) -m benchmarks.input_throughput --dataset=folder:runs/photos2000 --image_size=224
	$(PY) -m benchmarks.augment_throughput
	$(PY) -m benchmarks.step_throughput

# On a GPU: the batch-size tuner measured under an 8 GB cap, B0 and B5, both phases,
# float32 and mixed precision (each trial compiles a model: tens of minutes).
tune-gpu: venv
	mkdir -p runs
	for precision in --nomixed_precision --mixed_precision; do \
	  $(PY) -m effpipe.tune_batch --variant=b0 $$precision --memory_budget_gb=8 \
	    --method=measured --resolution=8 --output= \
	    | tee -a runs/tune_gpu.log | tail -n 1 >> runs/tune_gpu.jsonl; \
	  $(PY) -m effpipe.tune_batch --flagfile=flags/b5_rtx3070.flags $$precision \
	    --memory_budget_gb=8 --method=measured --resolution=8 --output= \
	    | tee -a runs/tune_gpu.log | tail -n 1 >> runs/tune_gpu.jsonl; \
	done

# On a GPU: the headline run and the GPU figures, in under 8 minutes, into
# runs/gpu_check.json and a record per part under results/ (benchmarks/gpu_check_parts.py
# lists them). Without a GPU: the plan and its time budget.
gpu-check: venv
	$(PY) -m benchmarks.gpu_check --results_dir=results

lint: venv
	$(VENV)/bin/ruff check effpipe benchmarks tests
	$(VENV)/bin/ruff format --check effpipe benchmarks tests

format: venv
	$(VENV)/bin/ruff format effpipe benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
