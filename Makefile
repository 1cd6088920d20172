# The README's commands. Both create .venv on first use and are safe to re-run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# pytest-xdist workers; the suite is sized for 2 cores.
WORKERS ?= 2

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

# The test extra adds the PyTorch reference stack, the tf extra TensorFlow for
# tfrecord-prepared tfds datasets (make test covers both tfds paths). openai-clip and dall-e are
# installed without their declared dependencies, which would pull torchvision
# (no torchvision works beside the pinned CPU torch here).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test,tf]'
	$(PIP) install --quiet --no-deps openai-clip==1.0.1 dall-e==0.1
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments.demo --workdir runs/demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(WORKERS) tests

# Every benchmark against its reference on this machine's device (GPU/TPU detected: accelerator sizes,
# MFU); writes experiments/bench/results/<machine>.md and .json. About 15 minutes on a 2-core CPU.
bench: $(VENV)/.installed-test
	$(PY) -m experiments.bench.run_all --out experiments/bench/results

clean:
	rm -rf $(VENV) runs .pytest_cache
