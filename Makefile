# make setup  - create .venv and install the pinned set (first time ~10 min: llama-cpp-python compiles)
# make demo   - setup, then the whole pipeline on the built-in tiny model (runs/demo)
# make test   - setup, then the test suite (the six notebooks included)
# make notebooks - execute the notebooks into runs/notebooks/ with their outputs
# make app    - serve the chat app on the demo's Q4_K_M at http://127.0.0.1:7860
# make screenshot - S29-gradio.png from the running app after one exchange (real browser)
# make bench  - benchmarks on the tiny model (a few minutes): bench/results/*.json, *.md, speed_vs_size.png
# make bench-full - the full-size Phi-3.5-mini shape (random weights; ~25 GB disk, up to about an hour)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: setup demo test notebooks app screenshot bench bench-full clean-demo
Q4 := $(RUN_DIR)/gguf/model-Q4_K_M.gguf
NOTEBOOKS := S29_finetuning_llm.ipynb S29_phi3_inference.ipynb S29_phi3_QuantizeLLMs_checkpoint.ipynb \
             notebooks/lora_from_scratch.ipynb notebooks/nf4_from_scratch.ipynb notebooks/oasst1_trees.ipynb

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing pulls a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	# llama.cpp's converter, Phi-3 vocab and chat template, from the llama-cpp-python sources
	$(PY) -m qlora_pipeline.llamacpp
	# Debian's Chromium for the browser test (apt; skipped when present)
	scripts/install_chromium.sh
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/qlora-pipeline run --preset tiny --run-dir $(RUN_DIR)

test: setup
	$(PY) -m pytest -q

# Execute the six notebooks on the tiny preset into runs/notebooks/ (with outputs, for reading).
notebooks: setup
	$(PY) -m qlora_pipeline.notebook runs/notebooks $(NOTEBOOKS)

$(Q4): | setup
	$(MAKE) demo

app: setup $(Q4)
	$(VENV)/bin/qlora-pipeline app --model $(Q4)

screenshot: setup $(Q4)
	$(PY) -m qlora_pipeline.app_check screenshot --model $(Q4) --out S29-gradio.png

bench: setup $(Q4)
	$(PY) bench/ttft.py --model $(Q4)
	$(PY) bench/inference.py --run $(RUN_DIR)
	$(PY) bench/train_throughput.py
	$(PY) bench/plot.py

bench-full: setup
	$(PY) bench/fullsize.py
	$(PY) bench/plot.py

clean-demo:
	rm -rf $(RUN_DIR)
