# The two commands of the README. Each creates the project-local virtual environment on first use.
# torch is installed first and pinned: on its own, pip would resolve torch to a CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test quality export-env test-export

demo: $(STAMP)
	$(PY) -m gearfx demo

# The unit tests: one worker per core, a test file per worker (module fixtures load the model once);
# most of their time is single-threaded export and Inductor compilation, which a second process overlaps.
# test_executorch.py runs in the export environment (optimum-executorch cannot share .venv), beside
# them: it mostly waits on one core, and the workers leave a core idle while the last file finishes
# (on a 2-core AMD EPYC, one after the other: 4.7 + 14.8 min).
test: $(STAMP) export-env
	OMP_NUM_THREADS=1 $(EXPORT_TESTS) > $(EXPORT_VENV)/test.log 2>&1 & \
	job=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=10 --ignore=tests/test_executorch.py; \
	unit=$$?; wait $$job; executorch=$$?; \
	echo "tests/test_executorch.py ($(EXPORT_VENV)):"; cat $(EXPORT_VENV)/test.log; \
	[ $$unit -eq 0 ] && [ $$executorch -eq 0 ]
	mkdir -p .benchmarks
	$(PY) -m pytest -q -p no:logging bench/ --quick --benchmark-json .benchmarks/quick.json
	$(PY) -m gearfx bench check .benchmarks/quick.json --baseline results/bench/quick-baseline.json

# The README's results: every shipped recipe, 4096 WikiText-2 tokens scored after a 512-token
# prefill, through the cache, next to HF QuantizedCache on the same tokens; then the passkey table.
# Two single-threaded jobs in parallel (2 cores; Inductor's CPU kernels slow down badly with
# competing threads), merged into one table: about 2 hours on a 2-core CPU, plus the peers.
QUALITY := --model smollm2-135m --tokens 4096 --prefill 512 --text ../shared/data/wikitext2_raw_test.txt
PART1 := kivi-4bit kivi-2bit gear-paper-4bit gear-paper-2bit gear-4bit gear-2bit h2o gear-4bit-h2o
PART2 := lossless balanced compact
PEERS := hf-quanto-4bit hf-quanto-2bit hf-hqq-4bit hf-hqq-2bit
quality: $(STAMP)
	mkdir -p results/quality
	OMP_NUM_THREADS=1 $(PY) -m gearfx eval $(QUALITY) $(PART1:%=--recipe %) --json results/quality/part1.json & job=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m gearfx eval $(QUALITY) $(PART2:%=--recipe %) --json results/quality/part2.json && \
	OMP_NUM_THREADS=1 $(PY) -m gearfx peers $(QUALITY) $(PEERS:%=--peer %) --json results/quality/peers.json && \
	wait $$job
	$(PY) -m gearfx merge results/quality/part1.json results/quality/part2.json --json results/quality.json
	$(PY) -m gearfx plot results/quality.json --out results/pareto.png \
		--extra "HF QuantizedCache=results/quality/peers.json" \
		--extra "kvpress=results/quality/peers-kvpress.json"  # made in kvpress's environment (README)
	OMP_NUM_THREADS=1 $(PY) -m gearfx passkey --model smollm2-135m --recipe lossless --recipe compact \
		--recipe gear-4bit --recipe kivi-4bit --recipe gear-4bit-h2o --recipe h2o \
		--lengths 1000,4000 --depths 0.1,0.5,0.9 --json results/passkey.json

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DISABLE_CUDA=1 $(PY) -m pip install -q -c constraints.txt -e ".[dev,onnx,bench]"  # hqq: no CUDA kernels
	rm -f $(VENV)/.installed-*
	touch $@

# The export environment for ExecuTorch (optimum-executorch 1.1.0 pins transformers 5.0.0rc1, so it
# cannot share .venv): `make export-env` creates .venv-export; `make test-export` runs its tests
# (`make test` runs them too).
EXPORT_VENV := .venv-export
EXPORT_PY := $(EXPORT_VENV)/bin/python
EXPORT_STAMP := $(EXPORT_VENV)/.installed-$(shell cat pyproject.toml constraints-export.txt | cksum | cut -d' ' -f1)
EXPORT_TESTS := $(EXPORT_PY) -m pytest -q -p no:logging tests/test_executorch.py

export-env: $(EXPORT_STAMP)

test-export: $(EXPORT_STAMP)
	$(EXPORT_TESTS)

$(EXPORT_STAMP): pyproject.toml constraints-export.txt
	test -x $(EXPORT_PY) || python3 -m venv $(EXPORT_VENV)
	$(EXPORT_PY) -m pip install -q --upgrade pip
	$(EXPORT_PY) -m pip install -q torch==2.13.0
	$(EXPORT_PY) -m pip install -q -c constraints-export.txt -e ".[dev]" optimum-executorch executorch
	rm -f $(EXPORT_VENV)/.installed-*
	touch $@
