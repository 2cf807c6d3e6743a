"""The measured steps of the benchmarks, each run in a fresh interpreter of its own:

    .venv/bin/python -m bench.steps NAME ['{"argument": value, ...}']     # from the repository root
    .venv/bin/python -m bench.steps --list

A benchmark times a step and reads its peak RSS from outside (``common.run_step``), so a step
must not share a process with the benchmark, with another step or with what an earlier step
loaded. It prints its result as one JSON line, then the peak RSS of any process it started
(llama.cpp's converter runs as a child of the export code) as the last line.

Every step calls the package's own functions where the pipeline has one (loading, LoRA,
conversion, quantization, decode speed, the train stage); what is written here is only the
harness around them.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

STEPS: dict = {}


def step(fn):
    """Register ``fn`` under its name; its keyword arguments come from the command line's JSON."""
    STEPS[fn.__name__] = fn
    return fn


def _quiet(*_args, **_kwargs) -> None:
    pass


# --- the full-size shape (bench/fullsize.py and the scripts beside it) ---


@step
def build_fullsize(out: str) -> dict:
    """The random-weight Phi-3.5-mini (bench/fullsize_model.py), shard by shard."""
    from bench.fullsize_model import build

    return build(Path(out))


@step
def convert(model: str, out: str, name: str, end_of_turn_id: int) -> dict:
    """llama.cpp's converter to F16, as the export stage runs it."""
    from qlora_pipeline.gguf.convert import convert_to_gguf

    convert_to_gguf(Path(model), Path(out), name, end_of_turn_id)
    return {"bytes": Path(out).stat().st_size}


@step
def quantize(source: str, out: str, quant: str, threads: int) -> dict:
    """llama.cpp's quantizer, as the export stage runs it."""
    from qlora_pipeline.gguf.convert import quantize_gguf

    quantize_gguf(Path(source), Path(out), quant, threads)
    return {"bytes": Path(out).stat().st_size}


@step
def copy_bandwidth(gib: int = 1, threads: int = 2, repeats: int = 5) -> dict:
    """STREAM-style copy bandwidth: bytes read + written per second by ``threads`` threads, each
    copying its own ``gib`` GiB array (numpy releases the GIL while it copies); the best of ``repeats``."""
    import threading

    import numpy as np

    size = gib * 2**30
    sources = [np.ones(size // 8) for _ in range(threads)]
    targets = [np.empty_like(s) for s in sources]
    for source, target in zip(sources, targets):
        np.copyto(target, source)  # touch every page first
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(t, s)) for s, t in zip(sources, targets)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, threads * 2 * size / (time.perf_counter() - started))
    return {"copy_bytes_per_s": best}


@step
def decode_speed(model: str, threads: int, tokens: int, runs: int = 2, prompt: str = "The history of the city begins"):
    """The scorecard's own measurement (``speed.decode_speed``) of a GGUF at ``threads``."""
    from llama_cpp import Llama

    from qlora_pipeline.evaluation.speed import decode_speed as measure

    llm = Llama(model_path=model, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    return measure(llm, llm.tokenize(prompt.encode(), add_bos=True), tokens, runs)


@step
def merge_streaming(base: str, adapter: str, out: str) -> dict:
    """The merge stage's shard-by-shard merge."""
    from qlora_pipeline.merge_streaming import stream_merge

    stream_merge(Path(base), Path(adapter), Path(out))
    return {}


@step
def merge_peft(base: str, adapter: str, out: str) -> dict:
    """peft's ``merge_and_unload`` on the whole model in memory: what the streaming merge replaces."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return {}


@step
def compare_merges(streamed_shard: str, peft_dir: str, layers: tuple = (0, 1)) -> dict:
    """Largest relative difference between the two merges, over the tensors of ``layers`` found
    in ``streamed_shard`` (its first shard holds the first layers)."""
    from safetensors import safe_open

    wanted = tuple(f"layers.{i}." for i in layers)
    peft_files = sorted(Path(peft_dir).glob("*.safetensors"))
    worst, compared = 0.0, 0
    with safe_open(streamed_shard, "pt") as streamed:
        for name in streamed.keys():
            if not any(w in name for w in wanted):
                continue
            for file in peft_files:
                with safe_open(str(file), "pt") as merged:
                    if name in merged.keys():
                        x, y = streamed.get_tensor(name).float(), merged.get_tensor(name).float()
                        worst = max(worst, ((x - y).abs() / y.abs().clamp_min(1e-3)).max().item())
                        compared += 1
    return {"tensors_compared": compared, "max_relative_diff": worst}


class _PhaseMemory:
    """Peak anonymous memory (RSS minus shared) per named phase, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.05):
        import threading

        import psutil

        self.phase, self.peaks, self.interval = "load", {}, interval
        self._process = psutil.Process()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            info = self._process.memory_info()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), info.rss - info.shared)
            time.sleep(self.interval)

    def anonymous_now(self) -> int:
        info = self._process.memory_info()
        return info.rss - info.shared


@step
def qlora_step(base: str, tune: bool = False, steps: int = 2, seq_len: int = 256) -> dict:
    """QLoRA on the full-size shape: the pipeline's loading (NF4) and LoRA (r 16, four targets),
    gradient checkpointing, AdamW; seconds per step and peak anonymous memory per phase."""
    import torch

    from qlora_pipeline.config import LoraConfig, ModelConfig
    from qlora_pipeline.model import attach_lora, load_base_for_training, pick_device
    from qlora_pipeline.runtime import tune_allocator

    memory = _PhaseMemory()
    torch.set_num_threads(2)
    started = time.perf_counter()
    model_cfg = ModelConfig(quantize="nf4", gradient_checkpointing=True)
    model = load_base_for_training(model_cfg, base, pick_device())
    model, report = attach_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05), model_cfg)
    load_seconds = time.perf_counter() - started
    after_load = memory.anonymous_now()
    memory.phase = "steps"
    model.train()  # gradient checkpointing only acts in training mode
    if tune:
        tune_allocator()  # raised after loading: what that costs (the train stage leaves large bases alone)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 32000, (1, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    time.sleep(2 * memory.interval)  # one more sample after the last step
    return {
        "peak_anon_by_phase": dict(memory.peaks),
        "load_seconds": load_seconds,
        "after_load_anon_bytes": after_load,
        "step_seconds": times,
        "loss": loss.item(),
        "trainable_params": report["trainable_params"],
        "total_params": report["total_params"],
    }


# --- the tiny model's training (bench/train_throughput.py) ---


@step
def prepare_run(run: str, overrides: list) -> dict:
    """The pipeline up to ``prepare`` (data split) in ``run``."""
    from qlora_pipeline.config import load_config
    from qlora_pipeline.pipeline import run_pipeline

    run_pipeline(load_config("tiny", overrides), Path(run), log=_quiet, until="prepare")
    return {}


@step
def train_ours(run: str, overrides: list) -> dict:
    """The train stage, as ``qlora-pipeline train`` runs it; its figures from its own log."""
    from qlora_pipeline.config import load_config
    from qlora_pipeline.layout import RunLayout
    from qlora_pipeline.pipeline import run_stage, save_run_config

    cfg = load_config("tiny", overrides)
    save_run_config(cfg, Path(run))
    started = time.perf_counter()
    run_stage("train", cfg, Path(run))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in RunLayout(Path(run)).train_log.read_text().splitlines()]
    last_step = [r for r in rows if "loss" in r][-1]
    last_val = [r for r in rows if "val_loss" in r][-1]
    return {
        "steps": last_step["step"],
        "tokens": last_step["tokens"],
        "tokens_per_s": last_step["tokens_per_s"],
        "val_loss": last_val["val_loss"],
        "wall_seconds": wall,
    }


@step
def train_trl(run: str, overrides: list, batch: int, steps: int, padding_free: bool) -> dict:
    """TRL's SFTTrainer on the same base, LoRA, examples, labels and schedule as ``train_ours``."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.batches import evaluate_loss
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.config import load_config
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.model import attach_lora, load_base_for_training, load_tokenizer, pick_device
    from qlora_pipeline.runtime import tune_allocator

    cfg = load_config("tiny", overrides)
    base = resolve_base(cfg, log=_quiet)
    tokenizer = load_tokenizer(base)
    encoder = ChatEncoder.from_hf(tokenizer)

    def examples(split: str) -> list:
        return tokenize_conversations(encoder, read_split(Path(run), split), cfg.data.max_seq_len, cfg.data.overlong)[0]

    train, val = examples("train"), examples("val")
    device = pick_device()
    model = load_base_for_training(cfg.model, base, device)
    model, _ = attach_lora(model, cfg.lora, cfg.model, seed=cfg.train.seed)
    tune_allocator()  # as our train stage does, after loading
    args = SFTConfig(
        output_dir=str(Path(run) / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=cfg.train.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.train.warmup_ratio,  # a float < 1: a ratio
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        max_length=None if padding_free else cfg.data.max_seq_len,  # the examples are cut already
        padding_free=padding_free,
        seed=cfg.train.seed,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in train])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    metrics = trainer.train().metrics
    wall = time.perf_counter() - started
    tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
    model.eval()
    return {
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "tokens_per_s": tokens / metrics["train_runtime"],
        "val_loss": evaluate_loss(model, val, cfg.train.batch_tokens, device.name),
        "wall_seconds": wall,
        "train_runtime": metrics["train_runtime"],
    }


@step
def training_memory(overrides: list, mode: str, seq_len: int = 512) -> dict:
    """Two training steps of the tiny model by ``mode``: "qlora"/"lora" (LoRA on the configured
    base) or "full" (every parameter trained); the benchmark reads the peak RSS."""
    import torch

    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.config import load_config
    from qlora_pipeline.model import attach_lora, load_base_for_training, pick_device
    from qlora_pipeline.runtime import tune_allocator

    cfg = load_config("tiny", overrides)
    model = load_base_for_training(cfg.model, resolve_base(cfg, log=_quiet), pick_device())
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model, _ = attach_lora(model, cfg.lora, cfg.model, seed=0)
    model.train()
    tune_allocator()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, 32000, (1, seq_len), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"trainable": sum(p.numel() for p in params), "base_params": base_params}


@step
def import_libraries() -> dict:
    """Only the imports every training step pays for: the baseline of the memory table."""
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return {}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.strip() if argv[:1] != ["--list"] else "")
        for name, fn in STEPS.items():
            print(f"  {name:18} {(fn.__doc__ or '').splitlines()[0]}")
        return 0 if argv else 2
    name, arguments = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    if name not in STEPS:
        print(f"error: no step named {name!r}; `python -m bench.steps --list` names them", file=sys.stderr)
        return 2
    print(json.dumps(STEPS[name](**arguments)), flush=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"children_peak_rss_bytes": children}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
