"""Write the six course notebooks (without outputs) and the README's notebook table.

    python scripts/make_notebooks.py                      # the notebooks, from the files below
    python scripts/make_notebooks.py --repo OWNER/NAME    # `make course-repo REPO=OWNER/NAME`

The notebooks are generated so that their cells stay thin calls into ``qlora_pipeline`` and the
repository URL lives in one place, the file ``COURSE_REPO``: the Colab set-up cell, the README's
"Open in Colab" badges and the Space README take it from there, and ``--repo`` rewrites all of
them. While it is the placeholder, the set-up cell stops with one line saying how to set it.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "your-org/qlora-gguf-course"
REPO = (ROOT / "COURSE_REPO").read_text(encoding="utf-8").strip()  # `make course-repo REPO=...` sets it
BRANCH = "main"

SETUP_FIRST_LINE = "# Set-up. On Colab: fetch the course code"


def bootstrap(repo: str, llama_cpp: bool = False) -> str:
    """The set-up cell for the course at github.com/``repo`` (``llama_cpp``: the notebook loads a GGUF)."""
    return f'''# Set-up. On Colab: fetch the course code and its pinned packages (Colab's own torch is kept).
# Locally (`make setup`) the package is already installed and this does nothing.
import importlib.util, os, subprocess, sys
REPO = "{repo}"  # the course's GitHub OWNER/NAME (`make course-repo REPO=...` rewrites it)
# (course/.installed: written once the install finished, so an interrupted one is done again)
if importlib.util.find_spec("qlora_pipeline") is None or (os.path.isdir("course") and not os.path.exists("course/.installed")):
    if REPO == "{PLACEHOLDER}":
        raise SystemExit("REPO is still the placeholder: set it above to the GitHub OWNER/NAME of your copy of the course "
                         "(or run `make course-repo REPO=OWNER/NAME` in a clone and push)")
    if not os.path.isdir("course"):
        subprocess.run(["git", "clone", "--depth", "1", f"https://github.com/{{REPO}}", "course"], check=True)
    sys.path.insert(0, os.path.abspath("course/src"))
    from qlora_pipeline.course.colab import install_course_packages  # llama-cpp-python: a prebuilt wheel where one exists
    install_course_packages("course/requirements.txt", llama_cpp={llama_cpp})
    open("course/.installed", "w").close()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "course"], check=True)
if os.path.isdir("course/src/qlora_pipeline"):
    os.chdir("course")  # also after a kernel restart, when the package is already installed
from qlora_pipeline.course.notebook import choose_preset, environment_report
ENV = environment_report()
PRESET = choose_preset(PRESET, ENV)  # None: phi35-colab-t4 on a GPU, tiny on a CPU
from qlora_pipeline.course.colab import course_run_dir  # on Colab: RUN_DIR on Google Drive, which outlives this VM
RUN_DIR = course_run_dir(RUN_DIR, USE_DRIVE)'''


BOOTSTRAP = bootstrap(REPO)
BOOTSTRAP_GGUF = bootstrap(REPO, llama_cpp=True)  # notebook 3: the only one that loads a GGUF


def code(source: str, *tags: str):
    cell = new_code_cell(source.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def md(source: str):
    return new_markdown_cell(source.strip("\n"))


def params(extra: str = "", run_dir: str = "runs/notebooks/s29") -> object:
    return code(
        f"""# Parameters (papermill fills these in). PRESET None: "phi35-colab-t4" on a GPU (Colab's T4), "tiny" on a
# CPU. OVERRIDES takes key=value settings, for example ["train.epochs=2", "lora.r=8"].
PRESET = None
RUN_DIR = "{run_dir}"
USE_DRIVE = True  # on Colab, keep RUN_DIR on Google Drive (each notebook runs on a new VM)
OVERRIDES = []
{extra}""",
        "parameters",
    )


# The journey's one input is a Hugging Face write token (the Colab secret HF_TOKEN): every name
# below is derived from it and from RUN_DIR, and the same in all three notebooks.
HUB_PARAMS = """# The Hub: with a write token as the Colab secret HF_TOKEN (key icon, left bar), each notebook
# pushes what the next one needs; names come from your user name and RUN_DIR (None: derived).
PUSH_TO_HUB = None  # None: push when a token is found; True: stop if there is none; False: never
PRIVATE = False  # True: private repos (the Space then gets your token as a secret to read them)
HF_USER = None
ADAPTER_REPO = None
MERGED_REPO = None
GGUF_REPO = None
SPACE_REPO = None"""

REPOS_CELL = """from qlora_pipeline.hub import course_repos

repos = course_repos(RUN_DIR, PUSH_TO_HUB, PRIVATE, HF_USER, adapter=ADAPTER_REPO, merged=MERGED_REPO,
                     gguf=GGUF_REPO, space=SPACE_REPO)"""

FLUSH_CELL = """from qlora_pipeline.course.colab import flush_drive

flush_drive()  # on Colab: Drive's pending writes, before this VM goes away"""


S29_FINETUNING = [
    md("""# S29 · Fine-tuning Phi-3.5 with QLoRA on OpenAssistant

**What you will do:** load `microsoft/Phi-3.5-mini-instruct` in 4-bit NF4, attach LoRA adapters,
turn oasst1 message trees into conversations, take one training step by hand, then train only
the adapters and measure what they changed. With `PRESET = "tiny"` the same code runs on a
built-in 20M-parameter twin of Phi-3.5 (its tokenizer, chat template and LongRoPE) on any CPU.

- **LoRA** freezes a weight matrix W and learns a low-rank update: W + (alpha/r)·B·A with
  B (out × r) and A (r × in). For r = 16 that is well under 1% of the parameters.
- **QLoRA** keeps the frozen base in 4 bits so it fits a small GPU; the adapters and the
  computation stay in 16 bits.
- **NF4** ("4-bit NormalFloat") puts its 16 levels at quantiles of a normal distribution, where
  trained weights actually lie; block-wise scales (and scales of scales: double quantization)
  cost about 0.13 extra bits per weight.

On Colab, `RUN_DIR` lives on your Google Drive, so the next two notebooks (each on a new VM) and a
re-run after a disconnect find this notebook's work."""),
    params(
        HUB_PARAMS
        + "\n# START_FRESH: True trains from step 0 even if RUN_DIR holds a checkpoint of this configuration\n"
        "START_FRESH = False\nANSWER_TOKENS = 48  # longest before/after answer"
    ),
    code(BOOTSTRAP),
    code(REPOS_CELL),
    md("## The base model in 4 bits, and the LoRA check"),
    code("""import pandas as pd
from qlora_pipeline.config import load_config
from qlora_pipeline.model import load_tokenizer
from qlora_pipeline.base import resolve_base
from qlora_pipeline.course.notebook import count_parameters, memory_table
from qlora_pipeline.pipeline import check_run_dir, save_run_config

cfg = load_config(PRESET, OVERRIDES)
check_run_dir(RUN_DIR)
save_run_config(cfg, RUN_DIR)  # the next two notebooks read the run's configuration from here
base = resolve_base(cfg)
tokenizer = load_tokenizer(base)
n_params = count_parameters(base)
print(f"base: {base} ({n_params / 1e6:.1f}M parameters)")
pd.DataFrame(memory_table(n_params))"""),
    md(
        "The two objects QLoRA is made of, built from the preset: how bitsandbytes stores the frozen "
        "base, and which layers peft gives adapters."
    ),
    code(
        """import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from qlora_pipeline.model import pick_device

device = pick_device(cfg.model.compute_dtype, cfg.train.mixed_precision)
bnb_config = BitsAndBytesConfig(
    load_in_4bit=True,                               # the frozen base in 4 bits
    bnb_4bit_quant_type="nf4",                       # NormalFloat-4: levels at normal quantiles
    bnb_4bit_use_double_quant=cfg.model.double_quant,  # quantize the scales too (~0.37 bits saved per weight)
    bnb_4bit_compute_dtype=device.compute_dtype,     # matmuls in 16 bits (fp16 on a T4)
    bnb_4bit_quant_storage=torch.uint8,
)
lora_config = LoraConfig(
    r=cfg.lora.r,                                    # rank of the update B·A
    lora_alpha=cfg.lora.alpha,                       # the update is scaled by alpha / r
    lora_dropout=cfg.lora.dropout,
    target_modules=list(cfg.lora.target_modules),    # Phi-3's fused layers: qkv_proj, gate_up_proj, ...
    bias="none",
    task_type="CAUSAL_LM",
)
print(bnb_config)
lora_config""",
        "constructors",
    ),
    code("""from qlora_pipeline.model import attach_lora, format_lora_report, load_base_for_training

model_4bit = load_base_for_training(cfg.model, base, device)  # from_pretrained(..., quantization_config=bnb_config)
print(f"4-bit model in memory: {model_4bit.get_memory_footprint() / 1e6:.1f} MB "
      f"(the embeddings and the output layer stay in 16/32 bits)")
model_4bit, lora_report = attach_lora(model_4bit, cfg.lora, cfg.model)  # get_peft_model(model_4bit, lora_config)
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the usual
# ["q_proj", "k_proj", "v_proj", ...] list matches nothing, and attach_lora says so.
print(format_lora_report(lora_report))"""),
    md("## oasst1: from message trees to conversations"),
    code("""from qlora_pipeline.data import build_conversations, load_rows
from qlora_pipeline.course.notebook import draw_tree, pick_branching_tree, tree_text
from qlora_pipeline.pipeline import run_stage

stats = run_stage("prepare", cfg, RUN_DIR)
rows = load_rows(cfg.data)["train"]
tree_id = pick_branching_tree(rows, cfg.data.languages)
tree_rows = [r for r in rows if r["message_tree_id"] == tree_id]
print(tree_text(rows, tree_id))
conversation = build_conversations(tree_rows, cfg.data.languages, cfg.data.system_prompt).conversations
kept_ids = [r["message_id"] for r in tree_rows if any(r["text"] == m["content"] for m in conversation[0]["messages"])]
draw_tree(rows, tree_id, best_path=kept_ids)
conversation[0]["messages"]"""),
    code("""display(pd.DataFrame([stats["conversations"], stats["turns"]], index=["conversations", "turns"]))
pd.Series(stats["dropped"], name="dropped").to_frame()"""),
    md("""One training example as the model sees it. Only the text in **[[double brackets]]** is
trained on: the assistant's words and the `<|end|>` that closes its turn (so the model learns to
stop). User and system text and the template's tags are context, not targets."""),
    code("""from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.data import read_split, tokenize_conversations
from qlora_pipeline.course.notebook import label_mask_view

examples, _ = tokenize_conversations(ChatEncoder.from_hf(tokenizer), read_split(RUN_DIR, "train"),
                                     cfg.data.max_seq_len, cfg.data.overlong)
print(label_mask_view(tokenizer, examples[0]))"""),
    md("""## One packed batch

No padding: conversations are laid end to end in one row of up to `batch_tokens` tokens. The
position ids restart at 0 where a conversation starts, which tells the attention kernel where one
ends (nothing attends across the boundary), and the first token of each conversation is never a
target, so no loss crosses it either."""),
    code("""from qlora_pipeline.course.notebook import packed_batch_table
from qlora_pipeline.batches import collate_packed
from qlora_pipeline.train import step_plan

total_steps, plan = step_plan(examples, cfg.train)  # every micro-batch of the run, in order (seeded)
input_ids, labels, position_ids = collate_packed(examples, plan[0])
print(f"micro-batch 0: {len(plan[0])} conversations in one row of {input_ids.shape[1]} tokens "
      f"(budget {cfg.train.batch_tokens}); {total_steps} optimizer steps of "
      f"{cfg.train.gradient_accumulation_steps} micro-batches each")
packed_batch_table(tokenizer, input_ids, labels, position_ids)"""),
    md("""## One optimizer step, written out

This is what the package's training loop does for every step (a test checks the two give the
same weights): forward, loss on the targets only, a scaled backward per micro-batch (the
gradients add up: gradient accumulation), clipping, the optimizer step (paged 8-bit AdamW on a
GPU) and the learning-rate schedule (linear warm-up, cosine decay). On a T4, fp16 autocast and
a loss scaler: small fp16 gradients would underflow to zero without it."""),
    code("""from qlora_pipeline.train import make_optimizer

params = [p for p in model_4bit.parameters() if p.requires_grad]  # the LoRA matrices only
optimizer, scheduler = make_optimizer(params, cfg.train, device.name, total_steps)
print(type(optimizer).__name__, f"lr {scheduler.get_last_lr()[0]:.2e} (warm-up starts low)")"""),
    code(
        """import time
import torch
import torch.nn.functional as F
from qlora_pipeline.batches import label_count

micro_batches = plan[: cfg.train.gradient_accumulation_steps]  # the first optimizer step
n_targets = sum(label_count(examples, indices) for indices in micro_batches)  # every target weighs the same
scaler = torch.amp.GradScaler(device.name, enabled=device.mixed_precision == "fp16")
autocast = dict(device_type=device.name, dtype=device.compute_dtype, enabled=device.mixed_precision != "no")
started = time.perf_counter()
model_4bit.train()
for indices in micro_batches:
    input_ids, labels, position_ids = (t.to(device.name) for t in collate_packed(examples, indices))
    with torch.autocast(**autocast):
        logits = model_4bit(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    # token t predicts token t+1; labels are -100 where there is no target
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum") / n_targets
    scaler.scale(loss).backward()  # adds to .grad: the micro-batches accumulate
if cfg.train.max_grad_norm > 0:
    scaler.unscale_(optimizer)  # the true gradients again, before clipping them
    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
scaler.step(optimizer)  # skipped if an fp16 gradient overflowed (the scaler then lowers its scale)
scaler.update()
scheduler.step()
optimizer.zero_grad(set_to_none=True)
if device.name == "cuda":
    torch.cuda.synchronize()
step_seconds = time.perf_counter() - started
step_tokens = sum(len(examples[i]["input_ids"]) for indices in micro_batches for i in indices)
print(f"one optimizer step: {step_tokens} tokens in {step_seconds:.1f} s; the last micro-batch's share of the "
      f"step's loss: {float(loss.detach()):.4f}")""",
        "optimizer-step",
    ),
    md(
        "How long the rest will take, from that step and one forward pass on this machine (printed "
        "again by notebooks 2 and 3 before their long steps):"
    ),
    code("""from qlora_pipeline.model import free_memory
from qlora_pipeline.course.notebook import forward_tokens_per_s
from qlora_pipeline.course.timing import estimate, format_estimate, save_estimate, step_counts

model_4bit.eval()
forward_rate = forward_tokens_per_s(model_4bit, input_ids, position_ids, device)
table = estimate(step_counts(cfg, RUN_DIR, ChatEncoder.from_hf(tokenizer)), step_tokens / step_seconds, forward_rate)
save_estimate(RUN_DIR, table)
print(format_estimate(table))
del model_4bit, optimizer, scheduler, params, logits, loss  # the training stage loads its own model
free_memory()"""),
    md("## Training (packed batches, warm-up + cosine, checkpoints you can resume from)"),
    code("""from IPython.display import Image
from qlora_pipeline.pipeline import resume_training

# After a disconnect, running the notebook again continues from the newest checkpoint in RUN_DIR.
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()  # the peak below is training's, not the cells' before it
summary = run_stage("train", cfg, RUN_DIR, resume=resume_training(cfg, RUN_DIR, fresh=START_FRESH))
free_memory()
run_stage("prefer", cfg, RUN_DIR, resume=not START_FRESH)  # DPO when prefer.enabled (see below), else nothing
free_memory()
Image(f"{RUN_DIR}/loss.png")"""),
    code(
        """print(f"peak GPU memory during training (and DPO, when on): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")""",
        "gpu",
    ),
    md("## Did it help? Perplexity and answers before and after"),
    code("""from qlora_pipeline.evaluate import evaluate_hf

scores = evaluate_hf(cfg, RUN_DIR, with_merged=False)  # on the GPU when there is one, capped by the preset
pd.DataFrame({"validation loss": [scores["base_val_loss"], scores["adapter_val_loss"]],
              "test perplexity": [scores["base_ppl"], scores["adapter_ppl"]]}, index=["base", "base + adapter"])"""),
    code("""from qlora_pipeline.model import load_adapter
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.course.notebook import hf_answers, load_for_answers

prompts = [c["messages"][0]["content"] for c in read_split(RUN_DIR, "test")[:4]]
base_model = load_for_answers(cfg, base)
before = hf_answers(base_model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
adapter = RunLayout(RUN_DIR).adapter_for(cfg.prefer.enabled)  # RUN_DIR/adapter, or adapter-dpo after DPO
after = hf_answers(load_adapter(base_model, adapter), tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
del base_model
free_memory()
pd.DataFrame({"prompt": prompts, "base": before, "fine-tuned": after})"""),
    md(
        "The adapter is saved in `RUN_DIR/adapter` (PEFT format, safetensors). With your token it is pushed "
        "(with the run's configuration and a model card: `qlora-pipeline push --what adapter`), so that the "
        "next notebooks can start from the Hub as well as from Drive.\n\n"
        "*Preference tuning, optional:* with `prefer.enabled=true` in `OVERRIDES`, the training cell also runs "
        "DPO (TRL) on this adapter from oasst1's ranked sibling replies, and notebooks 2 and 3 merge, "
        "quantize and serve that adapter (`notebooks/preference_from_ranks.ipynb` explains it; the "
        "README gives its T4 time). The tiny preset has it on; the Phi-3.5 presets leave it off."
    ),
    code("""from qlora_pipeline.publish import push_run_part

push_run_part(RUN_DIR, "adapter", repos)"""),
    code(FLUSH_CELL),
]

S29_INFERENCE = [
    md("""# S29 · Chat with the adapter, then merge it into the base

Uses the adapter that `S29_finetuning_llm.ipynb` trained: from `RUN_DIR` (on Colab, your Google
Drive), or from the Hub repo it was pushed to (`ADAPTER_REPO`). The adapter is merged into the
**16-bit** base (never into the 4-bit one, which would round the update away), and we check that
the merged model computes what base + adapter computed."""),
    params(HUB_PARAMS + "\nSYSTEM_PROMPT = None\nANSWER_TOKENS = 48  # longest answer"),
    code(BOOTSTRAP),
    code(REPOS_CELL),
    code("""import pandas as pd
from qlora_pipeline.model import free_memory, load_tokenizer
from qlora_pipeline.base import resolve_base
from qlora_pipeline.course.notebook import hf_answers, load_for_answers
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.pipeline import continue_run, run_stage
from qlora_pipeline.course.timing import print_estimate

cfg = continue_run(RUN_DIR, {"adapter": repos.adapter})  # from Drive, or pulled from the Hub
print_estimate(RUN_DIR, "S29_phi3_inference")
base = resolve_base(cfg)
tokenizer = load_tokenizer(base)
adapter = RunLayout(RUN_DIR).adapter_for(cfg.prefer.enabled)  # the one merge takes (adapter-dpo after DPO)
model = load_for_answers(cfg, base, adapter)  # base + adapter, on the GPU when there is one
questions = ["What is the capital of France?", "What sound does a cow make?", "What is the opposite of hot?"]
answers = hf_answers(model, tokenizer, questions, max_new_tokens=ANSWER_TOKENS, system=SYSTEM_PROMPT)
pd.DataFrame({"question": questions, "answer": answers})"""),
    md("""## Merge, and check the merged model against base + adapter

peft's `merge_and_unload` adds (alpha/r)·B·A into each adapted weight and removes the LoRA
modules: the result is a plain Phi-3 model, as fast as the base."""),
    code("""merged = model.merge_and_unload()
lora_left = [name for name, _ in merged.named_modules() if "lora" in name]
print(type(merged).__name__, f"LoRA modules left: {len(lora_left)}")
same = hf_answers(merged, tokenizer, questions, max_new_tokens=ANSWER_TOKENS, system=SYSTEM_PROMPT) == answers
print("same greedy answers as base + adapter:", same)
del model, merged  # the merge stage loads its own copy: never two full-size models at once
free_memory()"""),
    md(
        "The merge stage does the same in the preset's dtype, checks logits of merged against base + "
        "adapter, and writes `RUN_DIR/merged` atomically:"
    ),
    code("""check = run_stage("merge", cfg, RUN_DIR)
free_memory()
pd.Series(check, name="merged vs base + adapter").to_frame()"""),
    code("""import os
from qlora_pipeline.layout import RunLayout

merged_dir = RunLayout(RUN_DIR).merged  # on Colab: this VM's disk, not Drive (it is 7.6 GB at full size)
print(merged_dir)
sorted(os.listdir(merged_dir))"""),
    md(
        "The merged model (7.6 GB at full size) stays on this VM's disk, not on Drive (15 GB free): it goes "
        "to the Hub, with its merge check, for notebook 3."
    ),
    code("""from qlora_pipeline.publish import push_run_part

push_run_part(RUN_DIR, "merged", repos)"""),
    code(FLUSH_CELL),
]

S29_QUANTIZE = [
    md("""# S29 · GGUF, Q4/Q5 quantization, and what it cost

Converts the merged model with llama.cpp's own `convert_hf_to_gguf.py`, quantizes it with
llama.cpp's quantizer, and measures every variant on held-out conversations: perplexity, KL
divergence and top-1 agreement against F16, file size, bits per weight and generation speed.
Then the same prompt goes through each variant, and you chat with the one you choose."""),
    params(
        HUB_PARAMS + '\nTEMPERATURE = 0.7\nREPEAT_PENALTY = 1.1\nMAX_TOKENS = 64\nCHOSEN = "Q4_K_M"\nN_GPU_LAYERS = 0'
    ),
    code(BOOTSTRAP_GGUF),
    code(REPOS_CELL),
    code("""import pandas as pd
from IPython.display import Image
from qlora_pipeline.export import export_calls
from qlora_pipeline.pipeline import continue_run, run_stage
from qlora_pipeline.course.timing import print_estimate

# the merged model from the Hub (notebook 2 pushed it, with its merge check): the very files that
# check passed, without a second merge's memory peak; without a Hub copy it is merged again here
cfg = continue_run(RUN_DIR, {"adapter": repos.adapter, "merged": repos.merged})
print_estimate(RUN_DIR, "S29_phi3_QuantizeLLMs_checkpoint")
print("the export stage runs exactly these:")
for call in export_calls(cfg, RUN_DIR):
    print(" ", call)"""),
    code("""manifest = run_stage("export", cfg, RUN_DIR)
pd.DataFrame(manifest["files"]).T"""),
    code("""report = run_stage("evaluate", cfg, RUN_DIR)
columns = ["bytes", "bits_per_weight", "ppl", "kld_vs_f16", "top1_vs_f16", "tokens_per_s"]
display(pd.DataFrame(report["gguf"]).T[columns])
Image(f"{RUN_DIR}/scorecard.png")"""),
    md(
        "GGUF logits against transformers in fp32 (relative: max |diff| / max |logit|) at the serving "
        "context, and past Phi-3.5's 4,096-token original context, where LongRoPE's long factors apply, "
        "when `eval.long_parity_tokens` is set (the tiny preset sets it; the Colab preset leaves it at 0 "
        "to save T4 time, so its table has no long rows); then the chat prompt ids of every route against "
        "llama.cpp's chat handler, and the held-out questions."
    ),
    code("""from qlora_pipeline.evaluation.report import parity_rows
from qlora_pipeline.evaluation.routes import format_routes

display(pd.DataFrame({key: row for key, row in parity_rows(report["parity"])}).T)
print("chat prompt ids:", format_routes(report["parity"]["chat_prompt_ids"]))
if report.get("heldout"):
    display(pd.Series(report["heldout"]["exact_match"], name="held-out exact match").to_frame())"""),
    md("## The same prompt through every variant"),
    code("""from qlora_pipeline.serve.chat import SamplingParams
from qlora_pipeline.course.notebook import gguf_answers

params = SamplingParams(temperature=TEMPERATURE, repeat_penalty=REPEAT_PENALTY, max_tokens=MAX_TOKENS)
messages = [{"role": "user", "content": "What is the capital of France?"}]  # a held-out fact
variants = ["F16"] + list(cfg.export.quant_types)
answers = gguf_answers(RUN_DIR, variants, messages, params, n_ctx=cfg.eval.n_ctx)
pd.DataFrame([{"variant": v, "answer": a, "tokens/s": s} for v, (a, s) in answers.items()])"""),
    md("## Chat with the variant you chose"),
    code("""from qlora_pipeline.serve.chat import LlamaChat
from qlora_pipeline.gguf.variants import gguf_path

assert CHOSEN in variants, f"CHOSEN = {CHOSEN!r} is not one of the exported variants {variants}: pick one"
chat = LlamaChat(gguf_path(RUN_DIR, CHOSEN), n_ctx=cfg.eval.n_ctx, n_gpu_layers=N_GPU_LAYERS)
history = []
for question in ["What is the capital of Italy?", "And what is the opposite of big?"]:
    history.append({"role": "user", "content": question})
    answer = chat.answer(history, params)
    history.append({"role": "assistant", "content": answer})
    print(f"you> {question}\\nassistant> {answer}")
chat.close()"""),
    md("""Chat in a terminal with `qlora-pipeline chat --model GGUF`, where GGUF is `gguf_path(RUN_DIR, CHOSEN)`
(on Colab the GGUFs are on this VM's disk, not on Drive).

## Publish the GGUF files, and your Space

`qlora-pipeline push --what gguf`: the quantized GGUFs, the Ollama `Modelfile` and a model card
with this run's training settings and scorecard, to the repo the Space reads (`MODEL_REPO`). The
F16 (a reference, as large as the merged model) stays here. Then your Space is created (or
updated) from the course's app, with `MODEL_REPO` set: open the link it prints and chat."""),
    code("""from qlora_pipeline.publish import push_run_part

push_run_part(RUN_DIR, "gguf", repos)"""),
    code("""from qlora_pipeline.space import publish_space

if repos.push:
    print(f"your Space: {publish_space(repos.space, repos.gguf, repos.private)} (it builds for a few minutes)")"""),
    code(FLUSH_CELL),
]

LORA_FROM_SCRATCH = [
    md("""# LoRA from scratch

A LoRA layer in a few lines of torch, shown to compute exactly what peft's does; what rank and
alpha trade; and why a merged adapter costs nothing at inference."""),
    params(run_dir="runs/notebooks/lora-from-scratch"),
    code(BOOTSTRAP),
    code("""import inspect
from qlora_pipeline.course.concepts import LoRALinear
print(inspect.getsource(LoRALinear))"""),
    code("""from qlora_pipeline.course.concepts import lora_matches_peft
print(f"max |ours - peft| on the same weights: {lora_matches_peft():.2e}")"""),
    md("""## Rank: capacity. A weight change of rank 4, fitted by adapters of rank 1 to 16

Below the rank of the change the adapter cannot express it; at or above, the error vanishes.
(alpha is set to 2·r, the usual choice, so the update's scale does not change with r.)"""),
    code("""import matplotlib.pyplot as plt
from qlora_pipeline.course.concepts import toy_rank_sweep

sweep = toy_rank_sweep()
plt.figure(figsize=(5, 3))
plt.semilogy(list(sweep), list(sweep.values()), "o-")
plt.xlabel("LoRA rank r"); plt.ylabel("final MSE"); plt.title("true update has rank 4")
plt.grid(alpha=0.3); plt.show()
sweep"""),
    md("## Merging: W + (alpha/r)·B·A is one matrix, so inference costs what the base did"),
    code("""from qlora_pipeline.course.concepts import merge_check
merge_check()"""),
]

NF4_FROM_SCRATCH = [
    md("""# NF4 from scratch

The 16 NormalFloat-4 levels built from normal quantiles, block-wise absmax quantization of a
real weight matrix (the tiny model's), compared with bitsandbytes; what double quantization
saves; and NF4 against FP4 and int4 on the same weights."""),
    params(run_dir="runs/notebooks/nf4-from-scratch"),
    code(BOOTSTRAP),
    code("""import bitsandbytes.functional as bnbf
import torch
from qlora_pipeline.course.concepts import nf4_levels

ours = nf4_levels()
theirs = bnbf.get_4bit_type("nf4", device="cpu")
print("our levels:        ", [round(v, 4) for v in ours.tolist()])
print("max |ours - bnb|:  ", float((ours - theirs).abs().max()))"""),
    code("""from qlora_pipeline.course.concepts import quantize_blockwise, unpack_bnb_codes
from qlora_pipeline.config import load_config
from qlora_pipeline.base import resolve_base

from qlora_pipeline.course.concepts import first_layer_qkv

# the base's layer-0 attention weight, from its folder or (phi35 presets) the one shard that holds it
name, weight = first_layer_qkv(resolve_base(load_config(PRESET, OVERRIDES)))
codes, absmax = quantize_blockwise(weight, ours, blocksize=64)
packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
same = (unpack_bnb_codes(packed) == codes.reshape(-1)).float().mean()
print(f"{name} {tuple(weight.shape)}: {100 * float(same):.3f}% of codes identical to bitsandbytes; "
      f"max |absmax difference| {float((absmax - state.absmax).abs().max()):.1e}")"""),
    code("""from qlora_pipeline.course.concepts import bits_per_parameter
print(f"NF4, block 64, fp32 scales:        {bits_per_parameter(64):.3f} bits per parameter")
print(f"NF4 + double quantization (8-bit scales, block 256): {bits_per_parameter(64, True):.3f}")"""),
    code("""import matplotlib.pyplot as plt
from qlora_pipeline.course.concepts import quantization_errors

errors = quantization_errors(weight)
plt.figure(figsize=(4.5, 3))
plt.bar(list(errors), list(errors.values()), color=["tab:green", "tab:orange", "tab:red"])
plt.ylabel("mean |error|"); plt.title("4-bit formats on the same weights (block 64)")
plt.show()
errors"""),
]

OASST1_TREES = [
    md("""# oasst1 trees

OpenAssistant stores messages, not conversations: every prompt has ranked replies, each with
follow-ups. Here is one tree, the path the `prepare` stage takes through it (best rank at each
step), and what the filters drop."""),
    params(run_dir="runs/notebooks/oasst1-trees"),
    code(BOOTSTRAP),
    code("""from qlora_pipeline.config import load_config
from qlora_pipeline.data import build_conversations, load_rows
from qlora_pipeline.course.notebook import draw_tree, pick_branching_tree, tree_text

cfg = load_config(PRESET, OVERRIDES)
rows = load_rows(cfg.data)["train"]
tree_id = pick_branching_tree(rows, cfg.data.languages)
print(tree_text(rows, tree_id))"""),
    code("""tree_rows = [r for r in rows if r["message_tree_id"] == tree_id]
conversation = build_conversations(tree_rows, cfg.data.languages).conversations[0]["messages"]
kept = [r["message_id"] for r in tree_rows if any(r["text"] == m["content"] for m in conversation)]
draw_tree(rows, tree_id, best_path=kept)
conversation"""),
    code("""import json
import matplotlib.pyplot as plt
from qlora_pipeline.pipeline import check_run_dir, run_stage

check_run_dir(RUN_DIR)
stats = run_stage("prepare", cfg, RUN_DIR)
plt.figure(figsize=(6, 3))
plt.barh(list(stats["dropped"]), list(stats["dropped"].values()))
plt.xlabel("count"); plt.title("what the filters dropped (stats.json)"); plt.show()
print(json.dumps(stats["conversations"]))"""),
]

PREFERENCE_FROM_RANKS = [
    md("""# Preference from ranks: DPO on oasst1's sibling replies

SFT learns from one reply per prompt. oasst1's volunteers ranked *all* the replies to a prompt:
the best against the worst is a preference pair. DPO (Rafailov et al., 2023) teaches the model
to move probability from the rejected reply to the chosen one, measured against a frozen
reference (here the SFT adapter), with no reward model and no sampling. This notebook shows one
sibling group and its pair, writes DPO's loss out in plain torch, checks it against TRL's on the
same batch, then runs the `prefer` stage through the package. The data is the course's bundled
sample in oasst1's exact format (written for this project: the real oasst1 needs the Hub), whose
ranks follow one clear rule: a complete sentence beats a bare name or a hedge."""),
    params(run_dir="runs/notebooks/preference-from-ranks"),
    code(BOOTSTRAP),
    code("""from qlora_pipeline.config import load_config
from qlora_pipeline.data import load_rows
from qlora_pipeline.pairs import build_pairs
from qlora_pipeline.course.notebook import tree_text

# This lesson trains SFT and then DPO, so it always uses the tiny model (PRESET is not read): fp32
# everywhere, so the loss written out below can equal TRL's to the last digits on a GPU too.
cfg = load_config("tiny", OVERRIDES + ["prefer.enabled=true", "model.compute_dtype=float32", "train.mixed_precision=no"])
rows = load_rows(cfg.data)["train"]
pairs = build_pairs(rows, cfg.data.languages).pairs
pair = next(p for p in pairs if p["rejected_rank"] >= 2)  # a group of three or more ranked replies
print(tree_text(rows, pair["tree_id"]))
print(f"\\n{len(pairs)} pairs in the sample; this one:")
pair"""),
    md("""## The SFT adapter DPO starts from

DPO needs a policy to train and a reference to measure it against: both start as the SFT adapter.
`prepare` writes the pairs beside the conversations (same tree split), `train` makes the adapter."""),
    code("""from qlora_pipeline.pipeline import check_run_dir, run_stage

check_run_dir(RUN_DIR)
stats = run_stage("prepare", cfg, RUN_DIR)
run_stage("train", cfg, RUN_DIR)
stats["pairs"]"""),
    md("""## DPO's loss, written out

For a prompt x, chosen reply y_w and rejected reply y_l, with log-probabilities summed over the
reply's tokens:

margin = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)),
loss = −log σ(β · margin).

Here the policy π is the trainable adapter and π_ref the frozen SFT adapter, both on the same 4-bit
base: TRL copies the adapter it is given into a second one named "ref" and switches to it for the
reference. `dpo_batch` builds TRL's trainer as the stage does and collates the pair the way TRL
does (row 0: prompt + chosen, row 1: prompt + rejected)."""),
    code("""import torch
import torch.nn.functional as F
from trl.trainer.utils import use_adapter
from qlora_pipeline.course.concepts import dpo_batch

def completion_logps(model, batch):
    \"\"\"log p of each row's reply: the sum over its tokens (completion_mask) of log softmax.\"\"\"
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)

def dpo_loss_by_hand(model, batch, beta):
    with torch.no_grad():
        policy_chosen, policy_rejected = completion_logps(model, batch)
        with use_adapter(model, "ref"):  # the reference: the frozen copy
            ref_chosen, ref_rejected = completion_logps(model, batch)
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return margin, -F.logsigmoid(beta * margin)

def check_against_trl(policy_adapter):
    model, trainer, batch = dpo_batch(cfg, pair, policy_adapter, f"{RUN_DIR}/adapter")
    margin, ours = dpo_loss_by_hand(model, batch, cfg.prefer.beta)
    with torch.no_grad():
        theirs = trainer.compute_loss(model, batch)
    difference = abs(float(ours) - float(theirs))
    print(f"margin {float(margin):+.4f}: DPO loss by hand {float(ours):.6f}, TRL {float(theirs):.6f}, "
          f"|difference| {difference:.1e}")
    assert difference < 1e-4, "the written-out loss must equal TRL's"

check_against_trl(f"{RUN_DIR}/adapter")  # policy = reference: margin 0, loss log 2"""),
    md("""At the start the policy *is* the reference, so the margin is zero and the loss is
log 2 ≈ 0.693: DPO has not preferred anything yet.

## The stage: DPO over every training pair

`run_stage("prefer")` trains with TRL's `DPOTrainer`, then measures base, SFT and DPO on the
test pairs and writes `adapter-dpo/` (merge, export and the app take it from there)."""),
    code("""import json
from IPython.display import Image

result = run_stage("prefer", cfg, RUN_DIR)
check_against_trl(f"{RUN_DIR}/adapter-dpo")  # the trained policy against the SFT reference
print(json.dumps({k: result[k] for k in ("base", "sft", "dpo", "sft_val_loss")}, indent=1))
Image(f"{RUN_DIR}/preference.png")"""),
]

NOTEBOOKS = {
    "S29_finetuning_llm.ipynb": (S29_FINETUNING, "QLoRA on oasst1: NF4 base, LoRA check, data, training, before/after"),
    "S29_phi3_inference.ipynb": (S29_INFERENCE, "chat with base + adapter, merge into the 16-bit base, check it"),
    "S29_phi3_QuantizeLLMs_checkpoint.ipynb": (S29_QUANTIZE, "GGUF F16 → Q8_0/Q5_K_M/Q4_K_M, the scorecard, chat"),
    "notebooks/lora_from_scratch.ipynb": (LORA_FROM_SCRATCH, "a LoRA layer in torch vs peft, rank/alpha, merging"),
    "notebooks/nf4_from_scratch.ipynb": (NF4_FROM_SCRATCH, "NF4 levels, block-wise quantization vs bitsandbytes"),
    "notebooks/oasst1_trees.ipynb": (OASST1_TREES, "oasst1 trees, ranked paths, what the filters drop"),
    "notebooks/preference_from_ranks.ipynb": (
        PREFERENCE_FROM_RANKS,
        "a ranked sibling group, DPO's loss by hand vs TRL's, the prefer stage",
    ),
}


def write_notebooks() -> None:
    for rel, (cells, _) in NOTEBOOKS.items():
        nb = new_notebook(cells=cells)
        stem = Path(rel).stem.replace("_", "-")
        for i, cell in enumerate(nb.cells):
            cell.id = f"{stem}-{i:02d}"  # stable ids: regenerating gives the same file
            if cell.source.startswith(SETUP_FIRST_LINE):  # for the REPO of now (set_course_repo may change it)
                cell.source = bootstrap(REPO, llama_cpp="llama_cpp=True" in cell.source)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nb.metadata["accelerator"] = "GPU"
        nb.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
        path = ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(path))


def readme_table(timings: dict[str, str]) -> str:
    lines = ["| notebook | what it teaches | T4 | CPU (tiny) |", "| --- | --- | --- | --- |"]
    for rel, (_, what) in NOTEBOOKS.items():
        badge = (
            f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{rel})"
        )
        t4, cpu = timings.get(rel, ("not measured", "not measured"))
        lines.append(f"| `{rel}` {badge} | {what} | {t4} | {cpu} |")
    return "\n".join(lines)


def update_readme(timings: dict[str, str]) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = f"<!-- notebooks:start -->\n{readme_table(timings)}\n<!-- notebooks:end -->"
    text = re.sub(r"<!-- notebooks:start -->.*<!-- notebooks:end -->", block, text, flags=re.S)
    readme.write_text(text, encoding="utf-8")


def set_course_repo(repo: str) -> None:
    """Write ``repo`` to COURSE_REPO and everywhere it shows: notebooks, README badges, Space README."""
    global REPO, BOOTSTRAP
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise SystemExit(f"error: REPO={repo!r} is not a GitHub OWNER/NAME, e.g. REPO=me/qlora-gguf-course")
    for doc in (ROOT / "README.md", ROOT / "app" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        doc.write_text(
            text.replace(f"github/{REPO}/", f"github/{repo}/").replace(f"github.com/{REPO}", f"github.com/{repo}"),
            encoding="utf-8",
        )
    (ROOT / "COURSE_REPO").write_text(repo + "\n", encoding="utf-8")
    REPO, BOOTSTRAP = repo, bootstrap(repo)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=None, help="the course's GitHub OWNER/NAME (written to COURSE_REPO)")
    args = parser.parse_args(argv)
    if args.repo:
        set_course_repo(args.repo)
    write_notebooks()
    print(f"wrote {len(NOTEBOOKS)} notebooks for github.com/{REPO}")


if __name__ == "__main__":
    main()
