"""The ``train`` stage: QLoRA fine-tuning with a small accelerate loop.

    qlora-pipeline train --run-dir runs/demo                      # one process
    torchrun --nproc_per_node 2 -m qlora_pipeline.cli train --run-dir runs/demo   # data-parallel

Setup (base in 4-bit, LoRA attached and checked), train (packed batches, gradient accumulation,
warm-up + cosine, clipping, evaluation, early stopping, checkpoints), save (``RUN/adapter/``),
clean up. Why a loop of our own instead of ``trl.SFTTrainer``: every piece is visible to a
student, resume is exact (the batch plan is a pure function of the seed), and batches are
packed without padding (transformers' packed-sequence masks keep conversations apart).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipeline.batches import batch_plan, collate_packed, evaluate_loss, label_count, pack_examples, token_losses
from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.checkpoints import (
    LoopState,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
    training_fingerprint,
)
from qlora_pipeline.config import PipelineConfig, TrainConfig
from qlora_pipeline.data import read_split, tokenize_conversations
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.paths import (
    atomic_dir,
    save_figure_atomic,
    write_json_atomic,
)

# ---------------------------------------------------------------------------- state


def _lr_lambda(total_steps: int, warmup_steps: int):
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


# ---------------------------------------------------------------------------- the loop


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (then it checkpoints)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def plot_loss(log_path: Path, out_png: Path) -> None:
    """Training and validation loss against steps, from train_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (assistant tokens)", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("QLoRA fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, out_png)


def step_plan(examples: list[dict], tcfg: TrainConfig, world: int = 1) -> tuple[int, list[list[int]]]:
    """The number of optimizer steps, and every micro-batch they will take, in order."""
    per_epoch = len(pack_examples(examples, tcfg.batch_tokens, list(range(len(examples)))))
    micro_per_step = tcfg.gradient_accumulation_steps * world
    if tcfg.max_steps is not None:
        total_steps = tcfg.max_steps
    else:
        total_steps = max(1, math.ceil(tcfg.epochs * per_epoch / micro_per_step))
    epochs_needed = math.ceil(total_steps * micro_per_step / per_epoch) + 1
    return total_steps, batch_plan(examples, tcfg, epochs_needed)


def make_optimizer(params: list, tcfg: TrainConfig, device_name: str, total_steps: int):
    """AdamW (paged 8-bit on CUDA unless told otherwise) and linear warm-up + cosine decay."""
    import torch

    optimizer_name = tcfg.optimizer
    if optimizer_name == "auto":
        optimizer_name = "paged_adamw_8bit" if device_name == "cuda" else "adamw"
    if optimizer_name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    warmup = max(1, int(tcfg.warmup_ratio * total_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))


def optimizer_step(
    accelerator,
    model,
    examples: list[dict],
    micro_batches: list[list[int]],
    params: list,
    optimizer,
    scheduler,
    max_grad_norm: float,
) -> tuple[float, int]:
    """One optimizer step over ``micro_batches`` (gradient accumulation): every labelled token of
    the step weighs the same. Returns the step's loss and the tokens it read. The first notebook
    writes this step out in plain torch; a test checks the two give the same weights."""
    n_labels = sum(label_count(examples, idx) for idx in micro_batches)
    step_loss, tokens = 0.0, 0
    for j, indices in enumerate(micro_batches):
        ids, labels, pos = (t.to(accelerator.device) for t in collate_packed(examples, indices))
        last = j == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)  # all-reduce once per step
        with sync, accelerator.autocast():
            loss_sum, _ = token_losses(model, ids, labels, pos)
            loss = loss_sum / max(1, n_labels)
            accelerator.backward(loss)  # scaled by the fp16 loss scaler, when there is one
        step_loss += float(loss.detach())
        tokens += ids.numel()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales first
    optimizer.step()  # accelerate skips it when an fp16 gradient overflowed
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, tokens


@dataclass
class _Session:
    """What one training run holds: made by ``_setup``, used by the phases below."""

    cfg: PipelineConfig
    run_dir: Path
    accelerator: Any
    model: Any  # as accelerate prepared it (wrapped for data parallel)
    unwrapped: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    params: list
    train_examples: list[dict]
    train_counts: dict
    val_examples: list[dict]
    total_steps: int
    plan: list[list[int]]
    fingerprint: str
    lora_report: dict
    say: Callable
    state: LoopState = field(default_factory=LoopState)
    best_weights: dict | None = None
    started: float = 0.0
    tokens_at_start: int = 0

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def keep_best(self) -> bool:
        return self.cfg.train.early_stopping_patience is not None

    @property
    def log_path(self) -> Path:
        return RunLayout(self.run_dir).train_log


def _setup_data(cfg: PipelineConfig, encoder, splits: dict[str, list[dict]]) -> tuple[list[dict], dict, list[dict]]:
    """The train and validation conversations as token ids with labels, and the train split's counts."""
    max_len, overlong = cfg.data.max_seq_len, cfg.data.overlong
    train_examples, counts = tokenize_conversations(encoder, splits["train"], max_len, overlong, split="train")
    val_examples, _ = tokenize_conversations(encoder, splits["val"], max_len, overlong, split="val")
    return train_examples, counts, val_examples


def _setup_model(cfg: PipelineConfig, base: str, device, say):
    """The 4-bit base with LoRA attached (and checked in every layer), and the LoRA report."""
    from qlora_pipeline.base import base_weight_bytes
    from qlora_pipeline.model import attach_lora, format_lora_report, load_base_for_training
    from qlora_pipeline.runtime import tune_allocator

    # glibc's thresholds, raised for small local bases only, before anything is loaded.
    # Measured (2 cores): the tiny model trains 1,315-1,585 tokens/s with them raised at the
    # start vs 726-1,207 when raised after loading. On the full-size Phi-3.5 shape they cost
    # memory instead (bench/fullsize_qlora.py): raised before loading, 8.1 GB stays resident
    # after loading instead of 3.4 GB; raised after it, a QLoRA step peaks at 8.7 GB, not 5.9.
    weight_bytes = base_weight_bytes(base, cfg.model.revision)
    if weight_bytes is not None and weight_bytes < 1 << 30:
        tune_allocator()
    model = load_base_for_training(cfg.model, base, device)
    model, lora_report = attach_lora(model, cfg.lora, cfg.model, seed=cfg.train.seed)
    say(format_lora_report(lora_report))
    return model, lora_report


def _setup(cfg: PipelineConfig, run_dir: Path, resume: bool, log) -> _Session:
    """Device, data, model, optimizer, and the state to continue from (a checkpoint, or none)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.model import load_tokenizer, pick_device

    tcfg = cfg.train
    device = pick_device(cfg.model.compute_dtype, tcfg.mixed_precision)
    accelerator = Accelerator(mixed_precision=device.mixed_precision, cpu=device.name == "cpu")
    say = log if accelerator.is_main_process else (lambda *a, **k: None)
    set_seed(tcfg.seed)
    # cheap checks first: a missing split or checkpoint should not wait for a model to load
    splits = {name: read_split(run_dir, name) for name in ("train", "val")}
    fingerprint = training_fingerprint(cfg, run_dir)
    checkpoint = find_resumable(run_dir, fingerprint, log=say) if resume else None
    base = resolve_base(cfg, log=say)
    tokenizer = load_tokenizer(base, cfg.model.revision)
    train_examples, train_counts, val_examples = _setup_data(cfg, ChatEncoder.from_hf(tokenizer), splits)
    model, lora_report = _setup_model(cfg, base, device, say)
    total_steps, plan = step_plan(train_examples, tcfg, accelerator.num_processes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, tcfg, device.name, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    session = _Session(
        cfg=cfg,
        run_dir=run_dir,
        accelerator=accelerator,
        model=model,
        unwrapped=accelerator.unwrap_model(model),
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        train_examples=train_examples,
        train_counts=train_counts,
        val_examples=val_examples,
        total_steps=total_steps,
        plan=plan,
        fingerprint=fingerprint,
        lora_report=lora_report,
        say=say,
    )
    _setup_state(session, checkpoint)
    return session


def _setup_state(s: _Session, checkpoint: Path | None) -> None:
    """Continue from ``checkpoint`` (or start over, dropping older checkpoints); the log then
    holds exactly the steps done so far."""
    if checkpoint is not None:
        s.state, s.best_weights = load_checkpoint(
            checkpoint, s.unwrapped, s.optimizer, s.scheduler, s.accelerator.scaler
        )
        s.say(f"resuming from {checkpoint.name} (step {s.state.step} of {s.total_steps})")
    else:
        shutil.rmtree(RunLayout(s.run_dir).checkpoints, ignore_errors=True)
    if s.is_main:
        s.log_path.write_text("".join(json.dumps(r) + "\n" for r in s.state.history))


def _record(s: _Session, row: dict) -> None:
    s.state.history.append(row)
    if s.is_main:
        with open(s.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _evaluate(s: _Session) -> float:
    """Validation loss now; tracks the best step (and its weights, with early stopping on)."""
    tcfg, state = s.cfg.train, s.state
    val_loss = evaluate_loss(
        s.unwrapped, s.val_examples, tcfg.batch_tokens, s.accelerator.device, tcfg.eval_max_batches
    )
    if state.best_val_loss is None or val_loss < state.best_val_loss - 1e-6:
        state.best_val_loss, state.best_step = val_loss, state.step
        state.evals_without_improvement = 0
        if s.keep_best:
            s.best_weights = trainable_state(s.unwrapped)
    else:
        state.evals_without_improvement += 1
    _record(s, {"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
    return val_loss


def _train_step(s: _Session) -> float:
    """One optimizer step over this process's share of the step's micro-batches."""
    micro_per_step = s.cfg.train.gradient_accumulation_steps * s.world
    first = s.state.step * micro_per_step
    mine = s.plan[first : first + micro_per_step][s.accelerator.process_index :: s.world]
    step_loss, tokens = optimizer_step(
        s.accelerator, s.model, s.train_examples, mine, s.params, s.optimizer, s.scheduler, s.cfg.train.max_grad_norm
    )
    s.state.tokens_seen += tokens * s.world
    s.state.step += 1
    return step_loss


def _after_step(s: _Session, step_loss: float, bar) -> None:
    """Log the step, evaluate when due, and stop early when validation stopped improving."""
    tcfg, state = s.cfg.train, s.state
    last = state.step == s.total_steps
    tokens_per_s = (state.tokens_seen - s.tokens_at_start) / max(time.time() - s.started, 1e-9)
    bar.update(1)
    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
    if state.step % tcfg.log_every == 0 or last:
        _record(
            s,
            {
                "step": state.step,
                "loss": step_loss,
                "lr": s.scheduler.get_last_lr()[0],
                "tokens": state.tokens_seen,
                "tokens_per_s": round(tokens_per_s, 1),
            },
        )
    if state.step % tcfg.eval_every == 0 or last:
        bar.write(f"step {state.step}: validation loss {_evaluate(s):.4f}")
        if s.keep_best and state.evals_without_improvement >= tcfg.early_stopping_patience:
            state.stopped_early = True
            bar.write(f"early stopping: no improvement in {tcfg.early_stopping_patience} evaluations")


def _checkpoint(s: _Session) -> None:
    state = s.state
    save_checkpoint(
        s.run_dir,
        s.unwrapped,
        s.optimizer,
        s.scheduler,
        state,
        s.best_weights,
        s.cfg.train.keep_checkpoints,
        s.fingerprint,
        finished=state.step >= s.total_steps or state.stopped_early,
        scaler=s.accelerator.scaler,
    )


def _train_loop(s: _Session, stop_after_steps: int | None) -> bool:
    """Steps until done, stopped early, or interrupted (signal or ``stop_after_steps``); a
    checkpoint every ``checkpoint_every`` steps and at an interruption. True if interrupted."""
    from tqdm.auto import tqdm

    s.model.train()
    s.started, s.tokens_at_start = time.time(), s.state.tokens_seen
    bar = tqdm(total=s.total_steps, initial=s.state.step, desc="fine-tuning", unit="step", disable=not s.is_main)
    # closing the bar on errors too, so an error message is the last thing printed
    with _StopRequest() as stop, contextlib.closing(bar):
        while s.state.step < s.total_steps and not s.state.stopped_early:
            _after_step(s, _train_step(s), bar)
            interrupted = stop.requested or (stop_after_steps is not None and s.state.step >= stop_after_steps)
            if s.is_main and (s.state.step % s.cfg.train.checkpoint_every == 0 or interrupted):
                _checkpoint(s)
            s.accelerator.wait_for_everyone()
            if interrupted and s.state.step < s.total_steps:
                return True
    return False


def _summary(s: _Session) -> dict:
    state, seconds = s.state, time.time() - s.started
    history = state.history
    return {
        "steps": state.step,
        "total_steps": s.total_steps,
        "stopped_early": state.stopped_early,
        "best_step": state.best_step,
        "best_val_loss": state.best_val_loss,
        "base_val_loss_nf4": next((r["val_loss"] for r in history if r.get("step") == 0 and "val_loss" in r), None),
        "final_val_loss": next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None),
        "tokens_seen": state.tokens_seen,
        "train_seconds_this_process": round(seconds, 1),
        "tokens_per_s": round((state.tokens_seen - s.tokens_at_start) / max(seconds, 1e-9), 1),
        "examples": dict(s.train_counts),
        "lora": s.lora_report,
        "world_size": s.world,
    }


def _save(s: _Session, rank_state_dir: Path | None) -> dict:
    """The best weights back in place (with early stopping), then RUN/adapter/ and the plot."""
    import torch

    if s.keep_best and s.best_weights is not None:
        params_by_name = dict(s.unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in s.best_weights.items():
                params_by_name[name].copy_(tensor)
    if rank_state_dir is not None:
        from safetensors.torch import save_file

        Path(rank_state_dir).mkdir(parents=True, exist_ok=True)
        rank_file = Path(rank_state_dir) / f"rank-{s.accelerator.process_index}.safetensors"
        save_file(trainable_state(s.unwrapped), str(rank_file))
    summary = _summary(s)
    layout = RunLayout(s.run_dir)
    if s.is_main:
        with atomic_dir(layout.adapter) as tmp:
            s.unwrapped.save_pretrained(tmp, safe_serialization=True)
            s.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "training_summary.json", summary)
        plot_loss(s.log_path, layout.loss_plot)
        s.say(
            f"adapter saved to {layout.adapter} after {s.state.step} steps ({summary['tokens_per_s']:.0f} "
            f"tokens/s); validation loss {summary['base_val_loss_nf4']:.4f} -> {summary['best_val_loss']:.4f}"
        )
    s.accelerator.wait_for_everyone()
    return summary


def train(
    cfg: PipelineConfig,
    run_dir: Path,
    resume: bool = False,
    stop_after_steps: int | None = None,
    log=print,
    rank_state_dir: Path | None = None,
) -> dict:
    """Fine-tune LoRA adapters on RUN/data/train.jsonl; write RUN/adapter/ and return a summary.

    ``stop_after_steps`` interrupts the run after that many optimizer steps, with a checkpoint,
    as a preemption would (used by the resume test). ``rank_state_dir`` makes every process
    write its final LoRA weights there (the data-parallel test compares them).
    """
    s = _setup(cfg, Path(run_dir), resume, log)
    if s.state.step == 0 and not resume:
        base_val = _evaluate(s)  # LoRA's B starts at zero: this is the base model's loss
        s.say(f"validation loss before training: {base_val:.4f} (perplexity {math.exp(base_val):.2f})")
    if _train_loop(s, stop_after_steps):
        s.say(
            f"stopped at step {s.state.step} with a checkpoint; resume with: "
            f"qlora-pipeline run --run-dir {s.run_dir} --resume"
        )
        return {"interrupted": True, "step": s.state.step}
    return _save(s, rank_state_dir)


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage interface (``pipeline.Stage``): resume continues from the newest checkpoint."""
    return train(cfg, run_dir, resume=resume, log=log)
