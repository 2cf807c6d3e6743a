"""Training: LoRA target checks, the loop's outputs, exact resume, data-parallel agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, copy_run, make_config
from safetensors.torch import load_file

from qlora_pipeline.batches import pack_examples
from qlora_pipeline.errors import ModelError, PipelineError
from qlora_pipeline.pipeline import save_run_config
from qlora_pipeline.train import train


def _adapter_tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_wrong_lora_targets_fail_with_the_real_module_names(test_config, tiny_base):
    from qlora_pipeline.model import attach_lora, load_base_for_training, pick_device

    # The original course's list: Phi-3 fuses q/k/v and gate/up, so these never match.
    cfg = make_config("lora.target_modules=[q_proj,k_proj,v_proj,gate_proj,up_proj]")
    model = load_base_for_training(cfg.model, str(tiny_base), pick_device())
    with pytest.raises(ModelError) as info:
        attach_lora(model, cfg.lora, cfg.model)
    message = str(info.value)
    assert "'q_proj' matches no module in any layer" in message
    assert "qkv_proj" in message and "gate_up_proj" in message


def test_default_targets_match_every_layer(test_config, tiny_base):
    from qlora_pipeline.model import attach_lora, load_base_for_training, pick_device

    model = load_base_for_training(test_config.model, str(tiny_base), pick_device())
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "Linear4bit"  # QLoRA: NF4 base
    model, report = attach_lora(model, test_config.lora, test_config.model)
    layers = test_config.tiny.num_layers
    assert {t: v["layers"] for t, v in report["targets"].items()} == {
        "qkv_proj": layers,
        "o_proj": layers,
        "gate_up_proj": layers,
        "down_proj": layers,
    }
    r = test_config.lora.r
    h, f = test_config.tiny.hidden_size, test_config.tiny.intermediate_size
    assert report["targets"]["o_proj"]["trainable_params"] == layers * r * (h + h)
    assert report["targets"]["gate_up_proj"]["trainable_params"] == layers * r * (h + 2 * f)


def test_packing_respects_the_token_budget():
    examples = [{"input_ids": [0] * n} for n in (100, 120, 50, 300, 10)]
    batches = pack_examples(examples, 256, list(range(5)))
    assert batches == [[0, 1], [2], [3], [4]]
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_training_writes_a_peft_adapter_log_and_plot(trained_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained_run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(adapter))
    assert any("lora_B" in name for name, _ in model.named_parameters())
    # LoRA B starts at zero; training must have moved it.
    assert any(t.abs().max() > 0 for name, t in _adapter_tensors(trained_run).items() if "lora_B" in name)
    log = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in log if "val_loss" in r] == [0, 3, 6]
    assert (trained_run / "loss.png").stat().st_size > 1000


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(prepared_run, tmp_path, test_config):
    cfg = make_config("lora.dropout=0.1")  # dropout makes the RNG state matter
    straight = copy_run(prepared_run, tmp_path / "straight")
    train(cfg, straight, log=lambda *a, **k: None)
    interrupted = copy_run(prepared_run, tmp_path / "interrupted")
    result = train(cfg, interrupted, stop_after_steps=3, log=lambda *a, **k: None)
    assert result == {"interrupted": True, "step": 3}
    assert not (interrupted / "adapter").exists()
    train(cfg, interrupted, resume=True, log=lambda *a, **k: None)
    a, b = _adapter_tensors(straight), _adapter_tensors(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # The log row by row (step, loss, learning rate, tokens, evaluations), minus the timings.
    rows_a, rows_b = _log_rows(straight), _log_rows(interrupted)
    assert [row.keys() for row in rows_a] == [row.keys() for row in rows_b] and rows_a
    for row_a, row_b in zip(rows_a, rows_b):
        assert row_a == pytest.approx(row_b, rel=1e-5), (row_a, row_b)


TIMINGS = {"tokens_per_s"}  # the only log values that depend on the clock


def _log_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_resume_without_a_checkpoint_is_a_clear_error(prepared_run, tmp_path, test_config):
    run = copy_run(prepared_run, tmp_path / "run")
    with pytest.raises(PipelineError, match="no complete checkpoint"):
        train(test_config, run, resume=True, log=lambda *a, **k: None)


def train_two_ranks(run, ranks_dir) -> None:
    """Train ``run`` with torchrun on two CPU processes (tests/helpers/ddp_train.py); each rank's final
    LoRA weights go to ``ranks_dir``."""
    from qlora_pipeline.course.app_check import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    port = str(free_port())  # a fixed port collides with a run still closing
    script = REPO / "tests" / "helpers" / "ddp_train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    result = subprocess.run([*cmd, str(script), str(run), str(ranks_dir)], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_data_parallel_run_ends_with_identical_weights(prepared_run, tmp_path, test_config):
    run = copy_run(prepared_run, tmp_path / "ddp")
    save_run_config(make_config("train.max_steps=4"), run)
    train_two_ranks(run, tmp_path / "ranks")
    rank0 = load_file(str(tmp_path / "ranks" / "rank-0.safetensors"))
    rank1 = load_file(str(tmp_path / "ranks" / "rank-1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    summary = json.loads((run / "adapter" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


def test_a_corrupt_checkpoint_is_skipped_with_a_warning_naming_it(prepared_run, tmp_path):
    cfg = make_config("train.keep_checkpoints=3")
    straight = copy_run(prepared_run, tmp_path / "straight")
    train(cfg, straight, log=lambda *a, **k: None)
    run = copy_run(prepared_run, tmp_path / "run")
    train(cfg, run, stop_after_steps=4, log=lambda *a, **k: None)
    newest = run / "checkpoints" / "step-000004"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    messages = []
    train(cfg, run, resume=True, log=messages.append)
    assert f"warning: skipping incomplete or corrupt checkpoint {newest}" in messages
    assert "resuming from step-000002 (step 2 of 6)" in messages
    a, b = _adapter_tensors(straight), _adapter_tensors(run)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_refuses_a_checkpoint_of_other_settings(prepared_run, tmp_path):
    run = copy_run(prepared_run, tmp_path / "run")
    train(make_config(), run, stop_after_steps=2, log=lambda *a, **k: None)
    with pytest.raises(PipelineError, match="step-000002 was made with other training settings or data"):
        train(make_config("train.learning_rate=0.001"), run, resume=True, log=lambda *a, **k: None)


def test_run_does_not_silently_discard_an_interrupted_training(prepared_run, tmp_path, test_config):
    from qlora_pipeline.pipeline import run_pipeline

    run = copy_run(prepared_run, tmp_path / "run")
    train(test_config, run, stop_after_steps=2, log=lambda *a, **k: None)
    with pytest.raises(
        PipelineError,
        match="training was interrupted and .*step-000002 can continue it; "
        "add --resume to continue, or --force train to start over",
    ):
        run_pipeline(test_config, run, log=lambda *a: None, until="train")
    lines = []
    run_pipeline(test_config, run, log=lines.append, until="train", resume=True)
    assert "resuming from step-000002 (step 2 of 6)" in lines


def test_the_fp16_loss_scalers_state_survives_a_checkpoint(tmp_path):
    """A resumed fp16 run continues with the scale and growth tracker it had, not 65536 again."""
    from qlora_pipeline.checkpoints import LoopState, load_checkpoint, save_checkpoint

    def parts(lr=0.1):
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return model, optimizer, scheduler, torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)

    model, optimizer, scheduler, scaler = parts()
    loss = model(torch.ones(1, 4)).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update(new_scale=512.0)  # as after overflows had halved it
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    scaler.step(optimizer)
    scaler.update()  # one good step: the growth tracker counts it
    saved = scaler.state_dict()
    assert saved["scale"] == 512.0 and saved["_growth_tracker"] == 1
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, LoopState(step=2), None, keep=2, scaler=scaler)

    model2, optimizer2, scheduler2, fresh = parts()
    assert fresh.get_scale() == 2.0**16
    load_checkpoint(path, model2, optimizer2, scheduler2, fresh)
    assert fresh.state_dict() == saved
    model3, optimizer3, scheduler3, _ = parts()
    state, _ = load_checkpoint(path, model3, optimizer3, scheduler3, None)  # bf16/fp32 runs have no scaler
    assert state.step == 2


def test_a_notebook_resumes_from_the_newest_checkpoint_unless_told_to_start_fresh(prepared_run, tmp_path):
    from qlora_pipeline.pipeline import resume_training

    cfg = make_config()
    run = copy_run(prepared_run, tmp_path / "run")
    said = []
    assert resume_training(cfg, run, log=said.append) is False and said == []  # nothing to continue
    train(cfg, run, stop_after_steps=3, log=lambda *a, **k: None)  # the VM disconnected at step 3
    assert resume_training(cfg, run, log=said.append) is True
    assert said[-1].startswith("[train] continuing from") and "step-000003" in said[-1]
    assert resume_training(cfg, run, fresh=True, log=said.append) is False
    assert (
        resume_training(make_config("train.learning_rate=0.001"), run, log=lambda *a: None) is False
    )  # other settings


def test_a_target_missing_from_one_layer_is_refused(test_config, tiny_base):
    """Every target in every layer: a model where one layer lacks down_proj is refused, naming it."""
    from qlora_pipeline.model import check_lora_targets, load_base_for_training, pick_device

    model = load_base_for_training(test_config.model, str(tiny_base), pick_device("float32", "no"))
    mlp = model.model.layers[1].mlp
    mlp.down_projection = mlp.down_proj  # the same layer under another name, in layer 1 only
    del mlp.down_proj
    with pytest.raises(ModelError, match=r"'down_proj' matches no module in layers \[1\]"):
        check_lora_targets(model, test_config.lora.target_modules)


def test_packed_conversations_do_not_see_each_other(trained_run, test_config, tiny_tokenizer):
    """The loss of conversations packed into one row equals their loss one per row (the position
    ids keep attention inside each conversation; a cache or a plain causal mask would not)."""
    from qlora_pipeline.batches import evaluate_loss
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.model import load_base_full_precision

    examples, _ = tokenize_conversations(
        ChatEncoder.from_hf(tiny_tokenizer),
        read_split(trained_run, "val")[:12],
        test_config.data.max_seq_len,
        test_config.data.overlong,
    )
    model = load_base_full_precision(str(trained_run / "merged"), test_config.model)
    longest = max(len(ex["input_ids"]) for ex in examples)
    packed = evaluate_loss(model, examples, 4096, "cpu")  # all twelve in one or two rows
    alone = evaluate_loss(model, examples, longest, "cpu")  # one conversation per row
    assert abs(packed - alone) < 1e-4, (packed, alone)


def test_data_parallel_ranks_split_the_micro_batches(prepared_run, tmp_path, test_config, tiny_tokenizer):
    """Each of two ranks takes half of every step's micro-batches: together they read exactly
    the tokens of the planned micro-batches once (each rank running all of them would double it)."""
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.train import step_plan

    cfg = make_config("train.max_steps=2", "train.gradient_accumulation_steps=2", "train.eval_every=2")
    run = copy_run(prepared_run, tmp_path / "ddp")
    save_run_config(cfg, run)
    train_two_ranks(run, tmp_path / "ranks")
    examples, _ = tokenize_conversations(
        ChatEncoder.from_hf(tiny_tokenizer), read_split(run, "train"), cfg.data.max_seq_len, cfg.data.overlong
    )
    _, plan = step_plan(examples, cfg.train, world=2)
    planned = plan[: 2 * cfg.train.gradient_accumulation_steps * 2]
    # each rank counts its own row lengths times the world size; the two ranks' rows are the plan's
    per_rank = [sum(len(examples[i]["input_ids"]) for batch in planned[rank::2] for i in batch) for rank in (0, 1)]
    summary = json.loads((run / "adapter" / "training_summary.json").read_text())
    assert summary["tokens_seen"] == 2 * per_rank[0]
    assert abs(per_rank[0] - per_rank[1]) < max(per_rank)  # two halves, not one rank taking all


# The test preset's first steps, pinned (as torchtune's recipe tests pin theirs): a silent change
# in the data, the chat template, the label mask, packing, the optimizer or the schedule moves
# them. Recorded on the CPU from this code; fp32 throughout, so the tolerance is tight.
PINNED_LOSSES = [10.37501, 9.86017, 9.45094, 9.18694, 9.20521, 9.15238]
PINNED_TOKENS = [224, 460, 705, 957, 1195, 1439]
PINNED_VAL_LOSSES = {0: 10.42961, 3: 9.34295, 6: 9.18259}


def test_the_first_training_losses_are_the_pinned_ones(trained_run):
    rows = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["tokens"] for r in steps] == PINNED_TOKENS
    assert [r["loss"] for r in steps] == pytest.approx(PINNED_LOSSES, rel=2e-4)
    assert {r["step"]: r["val_loss"] for r in rows if "val_loss" in r} == pytest.approx(PINNED_VAL_LOSSES, rel=2e-4)
