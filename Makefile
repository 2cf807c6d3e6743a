# make setup  - create .venv and install the pinned set (first time ~10 min: llama-cpp-python compiles)
# make demo   - setup, then the whole pipeline on the built-in tiny model (runs/demo)
# make test   - setup, then ruff (lint and format), the import contracts and the test suite (the notebooks included)
# make notebooks - execute the notebooks into runs/notebooks/ with their outputs
# make app    - serve the chat app on the demo's Q4_K_M at http://127.0.0.1:7860
# make screenshot - S29-gradio.png from the running app after one exchange (real browser)
# make rehearsal - the phi35-colab-t4 preset through the real hub code path, offline, on CPU:
#                  the twin hub (runs/twin-hub, cached) as HF_HOME, prepare through evaluate; then the
#                  three S29 notebooks as on Colab (own working dir and kernel each, a shared "Drive")
# make journey - the student's whole path as one story: a stand-in Colab (Drive, the secret HF_TOKEN) and
#                  a stand-in Hub; notebooks 1 -> 2 -> 3 on their own VMs (3 again with Drive off), then
#                  the pushed Space installed in a fresh venv from its requirements.txt and asked a question
# make course-repo REPO=OWNER/NAME - the course's GitHub repository in COURSE_REPO, the notebooks'
#                  set-up cells, the README's Colab badges and the Space README
# make bench  - benchmarks on the tiny model (a few minutes): bench/results/*.json, *.md, speed_vs_size.png
# make mutation - mutmut over the functions behind the correctness claims (wall time in its report;
#                 resumable; --recheck after adding tests): bench/results/mutation.{json,md}
# make bench-imatrix - KL with and without the importance matrix at five types (bench/results/imatrix.md)
# make bench-full - the full-size Phi-3.5-mini shape (random weights; ~25 GB disk, up to about an hour)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/demo
# llama-cpp-python compiles llama.cpp. A -march=native build uses whatever the build machine
# has, AMX included, which faults in VMs that report it but do not run it (Q8_0 died with
# "Illegal instruction" here) and breaks a cached wheel on another CPU: build for x86-64-v3.
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

.PHONY: setup demo test notebooks app screenshot bench bench-imatrix bench-full clean-demo rehearsal journey course-repo mutation
TWIN_HUB ?= runs/twin-hub
# Only what a CPU needs: fp32 compute (no fp16 autocast on a CPU), a few steps, capped evaluation.
REHEARSAL_OVERRIDES := model.compute_dtype=float32 train.mixed_precision=no train.max_steps=4 \
	train.eval_every=2 train.checkpoint_every=2 train.eval_max_batches=4 eval.kld_max_tokens=2000 \
	eval.parity_tokens=1000
Q4 := $(RUN_DIR)/gguf/model-Q4_K_M.gguf
NOTEBOOKS := S29_finetuning_llm.ipynb S29_phi3_inference.ipynb S29_phi3_QuantizeLLMs_checkpoint.ipynb \
             notebooks/lora_from_scratch.ipynb notebooks/nf4_from_scratch.ipynb notebooks/oasst1_trees.ipynb \
             notebooks/preference_from_ranks.ipynb

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing pulls a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install --quiet torch==2.13.0
	# no wheel cache: a wheel built with other flags (or natively elsewhere) must not be reused
	$(PY) -m pip show llama-cpp-python 2>/dev/null | grep -qx "Version: $(LLAMA_CPP_VERSION)" || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(PY) -m pip install --quiet --no-cache-dir llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	# llama.cpp's converter, Phi-3 vocab and chat template, from the llama-cpp-python sources
	$(PY) -m qlora_pipeline.gguf.llamacpp
	# Debian's Chromium for the browser test (apt; skipped when present)
	scripts/install_chromium.sh
	# Debian's Go for the Modelfile test (Go's text/template renders its TEMPLATE, as Ollama does)
	scripts/install_go.sh
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/qlora-pipeline run --preset tiny --run-dir $(RUN_DIR)

test: setup
	@scripts/install_go.sh  # a .venv from before Go joined the set-up gets it too (nothing when present)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	# what may import what ([tool.importlinter] in pyproject.toml), and no import cycle in src/
	$(VENV)/bin/lint-imports
	$(PY) scripts/import_cycles.py
	$(PY) -m pytest -q

# Execute the six notebooks on the tiny preset into runs/notebooks/ (with outputs, for reading).
notebooks: setup
	$(PY) -m qlora_pipeline.course.notebook runs/notebooks $(NOTEBOOKS)

$(Q4): | setup
	$(MAKE) demo

app: setup $(Q4)
	$(VENV)/bin/qlora-pipeline app --model $(Q4)

screenshot: setup $(Q4)
	$(PY) -m qlora_pipeline.course.app_check screenshot --model $(Q4) --out S29-gradio.png

bench: setup $(Q4)
	$(PY) bench/ttft.py --model $(Q4)
	$(PY) bench/inference.py --run $(RUN_DIR)
	$(PY) bench/train_throughput.py
	$(PY) bench/plot.py

bench-imatrix: setup $(Q4)
	$(PY) bench/imatrix.py --run $(RUN_DIR)

bench-full: setup
	$(PY) bench/fullsize.py
	$(PY) bench/plot.py

mutation: setup
	$(PY) bench/mutation.py

rehearsal: setup
	$(VENV)/bin/qlora-pipeline hub-twin --out $(TWIN_HUB)
	@echo "rehearsal: preset phi35-colab-t4 from HF_HOME=$(TWIN_HUB) (offline); CPU overrides: $(REHEARSAL_OVERRIDES)"
	HF_HOME=$(abspath $(TWIN_HUB)) HF_HUB_OFFLINE=1 $(VENV)/bin/qlora-pipeline run --preset phi35-colab-t4 \
		--run-dir runs/rehearsal $(REHEARSAL_OVERRIDES)
	@echo "rehearsal: the three S29 notebooks, each in its own working directory and kernel, sharing only a Drive folder"
	HF_HOME=$(abspath $(TWIN_HUB)) HF_HUB_OFFLINE=1 $(PY) -m qlora_pipeline.course.rehearsal runs/rehearsal-notebooks \
		--preset phi35-colab-t4 $(foreach o,$(REHEARSAL_OVERRIDES) eval.hf_max_tokens=2000,--override $(o))

journey: setup
	$(VENV)/bin/qlora-pipeline hub-twin --out $(TWIN_HUB)
	$(PY) -m qlora_pipeline.course.journey runs/journey --twin-hub $(TWIN_HUB) --preset phi35-colab-t4 \
		$(foreach o,$(REHEARSAL_OVERRIDES) eval.hf_max_tokens=2000,--override $(o))

course-repo: setup
	@test -n "$(REPO)" || { echo "error: give the repository: make course-repo REPO=OWNER/NAME"; exit 2; }
	$(PY) scripts/make_notebooks.py --repo $(REPO)

clean-demo:
	rm -rf $(RUN_DIR)
