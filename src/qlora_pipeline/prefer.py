"""The ``prefer`` stage: DPO with TRL on the SFT adapter, from oasst1's ranked pairs.

    qlora-pipeline prefer --run-dir runs/demo        # after train; merge then takes its adapter

The policy is the SFT adapter, trainable; the reference is the same adapter, frozen. That is how
TRL's ``DPOTrainer`` handles a ``PeftModel`` passed without ``ref_model``: it copies the "default"
adapter into a "ref" adapter and computes the reference log-probabilities with that one active
(trl 1.16, ``DPOTrainer.__init__``). The base is the same 4-bit model training used, and the pairs
are tokenized by the training chat encoder (``pairs.encode_pairs``), so the tokens DPO scores are
the tokens SFT trained on.

Writes ``RUN/adapter-dpo/`` (the adapter, the tokenizer, ``preference.json``: pair accuracy,
margins and likelihood preference of base, SFT and DPO on the test pairs, and the SFT validation
loss before and after), ``RUN/prefer_log.jsonl`` and ``RUN/preference.png``. TRL's checkpoints go
to ``RUN/checkpoints-dpo/``; a killed run continues from the newest complete one.
With ``prefer.enabled`` off the stage removes those outputs, so merge takes the SFT adapter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from qlora_pipeline.config import TRAINING_SECTIONS, PipelineConfig
from qlora_pipeline.errors import DataError
from qlora_pipeline.layout import SPLITS, RunLayout
from qlora_pipeline.paths import atomic_dir, write_json_atomic, write_text_atomic

FINGERPRINT = "fingerprint.json"  # in checkpoints-dpo/: what its checkpoints were made with


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = True) -> dict:
    """The stage interface (``pipeline.Stage``). ``resume`` False starts over (``--force prefer``)."""
    layout = RunLayout(run_dir)
    if not cfg.prefer.enabled:
        remove_outputs(layout)
        log("[prefer] prefer.enabled is off: merge takes the SFT adapter")
        return {"skipped": True}
    return prefer(cfg, Path(run_dir), resume=resume, log=log)


def remove_outputs(layout: RunLayout, keep_checkpoints: bool = False) -> None:
    """The stage's results (and its checkpoints, unless kept: they carry the fingerprint of the
    SFT adapter they started from, so a retrained adapter never resumes them)."""
    folders = (layout.adapter_dpo,) if keep_checkpoints else (layout.adapter_dpo, layout.prefer_checkpoints)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    for file in (layout.prefer_log, layout.preference_plot):
        file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- resuming


def fingerprint(cfg: PipelineConfig, run_dir: Path) -> str:
    """The settings and the SFT adapter a DPO checkpoint belongs to."""
    digest = hashlib.sha256(cfg.section_hash(*TRAINING_SECTIONS, "prefer").encode())
    with open(RunLayout(run_dir).adapter / "adapter_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def complete_checkpoints(folder: Path) -> list[Path]:
    """TRL's ``checkpoint-N`` folders, oldest first, that finished saving: the trainer writes
    ``trainer_state.json`` last, so a kill during a save leaves a folder without a readable one."""
    found = []
    for path in folder.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            step = int(path.name.split("-")[1])
        except (OSError, ValueError, IndexError):
            continue
        found.append((step, path))
    return [path for _, path in sorted(found)]


def resume_point(cfg: PipelineConfig, run_dir: Path, resume: bool, log) -> Path | None:
    """The checkpoint to continue from, or None (older checkpoints are then removed)."""
    layout = RunLayout(run_dir)
    folder = layout.prefer_checkpoints
    expected = fingerprint(cfg, run_dir)
    stamp = folder / FINGERPRINT
    matches = stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == expected
    checkpoints = complete_checkpoints(folder) if matches and resume else []
    if checkpoints:
        log(f"[prefer] continuing from {checkpoints[-1].name} (--force prefer starts over)")
        return checkpoints[-1]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json_atomic(stamp, {"fingerprint": expected})
    return None


# ---------------------------------------------------------------------------- the stage


def _encoded_pairs(cfg: PipelineConfig, run_dir: Path, encoder, log) -> dict[str, list[dict]]:
    from qlora_pipeline.pairs import encode_pairs, pair_length_limit, read_pairs

    max_len = pair_length_limit(cfg)
    encoded = {}
    for split in SPLITS:
        path = RunLayout(run_dir).pairs(split)
        pairs = read_pairs(run_dir, split)
        if not pairs:
            raise DataError(
                f"{path} holds no preference pairs (no prompt in the {split} split has two differently "
                "ranked replies); use ranked data, or set prefer.enabled=false"
            )
        examples, counts = encode_pairs(encoder, pairs, max_len)
        if not examples:
            raise DataError(
                f"no {split} preference pairs fit prefer.max_length={max_len} in {path}; "
                "raise the limit, add ranked data, or set prefer.enabled=false"
            )
        if counts["dropped_too_long"]:
            log(f"[prefer] {split}: {counts['dropped_too_long']} pairs longer than {max_len} tokens dropped")
        cap = cfg.prefer.eval_max_pairs if split != "train" else None
        encoded[split] = examples[:cap]
    return encoded


def _dpo_args(cfg: PipelineConfig, run_dir: Path, device):
    from trl import DPOConfig

    from qlora_pipeline.pairs import pair_length_limit

    p = cfg.prefer
    return DPOConfig(
        output_dir=str(RunLayout(run_dir).prefer_checkpoints),
        beta=p.beta,
        loss_type=list(p.loss_type),
        learning_rate=p.learning_rate,
        num_train_epochs=p.epochs,
        max_steps=p.max_steps if p.max_steps is not None else -1,
        max_length=pair_length_limit(cfg),
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        warmup_steps=p.warmup_ratio,  # a float below 1 is a share of the steps (transformers 5)
        lr_scheduler_type="cosine",
        max_grad_norm=cfg.train.max_grad_norm,
        optim="paged_adamw_8bit" if device.name == "cuda" else "adamw_torch",
        eval_strategy="steps",
        eval_steps=p.eval_every,
        eval_on_start=True,  # step 0: policy = reference, so the curves start from no preference at all
        save_strategy="steps",
        save_steps=p.checkpoint_every,
        save_total_limit=cfg.train.keep_checkpoints,
        logging_steps=1,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        fp16=device.mixed_precision == "fp16",
        bf16=device.mixed_precision == "bf16",
        use_cpu=device.name == "cpu",
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        report_to="none",
        dataloader_num_workers=0,
    )


def dpo_trainer(cfg: PipelineConfig, run_dir: Path, model, tokenizer, pairs: dict[str, list[dict]], device):
    """TRL's DPOTrainer on the encoded pairs (``pairs['train']``, ``pairs['val']``); the concept
    notebook builds the same one to check its written-out loss against TRL's."""
    from datasets import Dataset
    from trl import DPOTrainer

    class EncodedPairsDPOTrainer(DPOTrainer):
        # The pairs arrive as token ids from the training chat encoder: TRL's own tokenizing
        # (apply_chat_template on the whole text) would read a "<|end|>" typed in a message as a
        # control token and label the template's trailing "\n<|endoftext|>", which SFT does not.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    sft_weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = EncodedPairsDPOTrainer(
        model=model,
        args=_dpo_args(cfg, run_dir, device),
        train_dataset=Dataset.from_list(pairs["train"]),
        eval_dataset=Dataset.from_list(pairs["val"]),
        processing_class=tokenizer,
    )
    # TRL casts the trainable adapter of a 4-bit model to bf16 (its __init__). SFT trained it in fp32
    # and the reference copy stays fp32: in bf16 the policy would differ from the reference before
    # any step, and an AdamW step of DPO's size (lr 5e-6: about 5e-6 per weight) is below bf16's
    # spacing for LoRA weights near 1e-2 (about 6e-5), so it would round away. The SFT weights as
    # they were, then; the optimizer is created later, by train(), on these tensors.
    for name, param in trainer.model.named_parameters():
        if name in sft_weights:
            param.data = sft_weights[name]
    return trainer


def _measure(cfg: PipelineConfig, model, test_pairs: list[dict], val_examples: list[dict], device) -> dict:
    """preference.json: base, SFT ("ref") and DPO ("default") on the test pairs, and the SFT
    validation loss with the SFT adapter and with the DPO adapter."""
    from trl.trainer.utils import use_adapter

    from qlora_pipeline.batches import evaluate_loss
    from qlora_pipeline.preference import pair_logps, preference_metrics

    scores, val_loss = {}, {}
    for name, adapter in (("base", None), ("sft", "ref"), ("dpo", "default")):
        with use_adapter(model, adapter):
            scores[name] = pair_logps(model, test_pairs, device.name)
            if name != "base":
                val_loss[name] = evaluate_loss(
                    model, val_examples, cfg.train.batch_tokens, device.name, cfg.train.eval_max_batches
                )
    result = preference_metrics(scores, cfg.prefer.beta)
    result["sft_val_loss"] = {
        "before": val_loss["sft"],
        "after": val_loss["dpo"],
        "rise": val_loss["dpo"] / val_loss["sft"] - 1,
    }
    return result


def _save(cfg, run_dir: Path, trainer, tokenizer, result: dict, log) -> None:
    from qlora_pipeline.preference import plot_curves, preference_line, training_curves

    layout = RunLayout(run_dir)
    history = trainer.state.log_history
    write_text_atomic(layout.prefer_log, "".join(json.dumps(row) + "\n" for row in history))
    plot_curves(training_curves(history), layout.preference_plot)
    with atomic_dir(layout.adapter_dpo) as tmp:
        trainer.model.save_pretrained(tmp, selected_adapters=["default"], safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "preference.json", result)
    log(f"[prefer] DPO adapter saved to {layout.adapter_dpo}; {preference_line(result)}")


def policy_model(cfg: PipelineConfig, base: str, adapter: Path, device):
    """The 4-bit base as training loaded it, with ``adapter`` as the trainable "default" adapter."""
    from peft import PeftModel

    from qlora_pipeline.model import load_base_for_training

    return PeftModel.from_pretrained(load_base_for_training(cfg.model, base, device), str(adapter), is_trainable=True)


def prefer(cfg: PipelineConfig, run_dir: Path, resume: bool = True, log=print) -> dict:
    """DPO on the SFT adapter; RUN/adapter-dpo/ and its measurements. Returns preference.json."""
    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.model import check_adapter_files, load_tokenizer, pick_device

    layout = RunLayout(run_dir)
    check_adapter_files(layout.adapter)
    device = pick_device(cfg.model.compute_dtype, cfg.train.mixed_precision)
    base = resolve_base(cfg, log=log)
    tokenizer = load_tokenizer(base, cfg.model.revision)
    encoder = ChatEncoder.from_hf(tokenizer)
    pairs = _encoded_pairs(cfg, run_dir, encoder, log)
    val_examples, _ = tokenize_conversations(
        encoder, read_split(run_dir, "val"), cfg.data.max_seq_len, cfg.data.overlong, split="val"
    )
    checkpoint = resume_point(cfg, run_dir, resume, log)
    model = policy_model(cfg, base, layout.adapter, device)
    trainer = dpo_trainer(cfg, run_dir, model, tokenizer, pairs, device)
    log(f"[prefer] DPO on {len(pairs['train'])} pairs ({len(pairs['val'])} validation, {len(pairs['test'])} test)")
    started = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    result = _measure(cfg, trainer.model, pairs["test"], val_examples, device)
    result.update(
        steps=trainer.state.global_step,
        train_pairs=len(pairs["train"]),
        val_pairs=len(pairs["val"]),
        seconds=round(time.time() - started, 1),
    )
    _save(cfg, run_dir, trainer, tokenizer, result, log)
    return result
