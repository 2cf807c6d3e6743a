"""The optimizer step that S29_finetuning_llm.ipynb writes out in plain torch is the package's step:
the notebook's cell, run as it stands, and train.optimizer_step give the same adapter weights."""

from __future__ import annotations

import json

import pytest
from conftest import REPO


def _cell(notebook: str, tag: str) -> str:
    cells = json.loads((REPO / notebook).read_text())["cells"]
    return next("".join(c["source"]) for c in cells if tag in c.get("metadata", {}).get("tags", []))


def _lora_model(cfg, base, device):
    from qlora_pipeline.model import attach_lora, load_base_for_training

    model, _ = attach_lora(load_base_for_training(cfg.model, str(base), device), cfg.lora, cfg.model, seed=0)
    return model


@pytest.mark.parametrize(
    "optimizer_name, max_grad_norm",
    [
        ("sgd", 0.0),  # plain SGD without clipping: the weights move by the gradient itself
        ("sgd", 0.01),  # ...with clipping
        ("adamw", 0.3),  # what training uses on a CPU
    ],
)
def test_the_notebooks_written_out_step_equals_the_packages_step(
    prepared_run, tiny_base, tiny_tokenizer, optimizer_name, max_grad_norm
):
    """SGD makes the comparison sensitive to the gradient's scale (a missing division, a lost
    micro-batch): Adam's first step is nearly sign(gradient) whatever its scale."""
    import torch
    from accelerate import Accelerator
    from conftest import make_config

    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.model import pick_device
    from qlora_pipeline.train import make_optimizer, optimizer_step, step_plan

    # Accumulation and clipping both matter: 3 micro-batches, and a norm small enough to clip.
    cfg = make_config("train.gradient_accumulation_steps=3", f"train.max_grad_norm={max_grad_norm}")
    device = pick_device(cfg.model.compute_dtype, cfg.train.mixed_precision)
    examples, _ = tokenize_conversations(
        ChatEncoder.from_hf(tiny_tokenizer), read_split(prepared_run, "train"), cfg.data.max_seq_len, cfg.data.overlong
    )
    total_steps, plan = step_plan(examples, cfg.train)

    def fresh():
        model = _lora_model(cfg, tiny_base, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(params, cfg.train, device.name, total_steps)
        if optimizer_name == "sgd":
            optimizer = torch.optim.SGD(params, lr=0.5)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
        return model, params, optimizer, scheduler

    model_a, params_a, optimizer_a, scheduler_a = fresh()
    start = {n: p.detach().clone() for n, p in model_a.named_parameters() if p.requires_grad}
    namespace = {
        "cfg": cfg,
        "device": device,
        "plan": plan,
        "examples": examples,
        "model_4bit": model_a,
        "params": params_a,
        "optimizer": optimizer_a,
        "scheduler": scheduler_a,
        "collate_packed": __import__("qlora_pipeline.batches", fromlist=["collate_packed"]).collate_packed,
    }
    torch.manual_seed(1)  # LoRA dropout draws the same masks in both
    exec(compile(_cell("S29_finetuning_llm.ipynb", "optimizer-step"), "optimizer-step cell", "exec"), namespace)

    model_b, params_b, optimizer_b, scheduler_b = fresh()
    accelerator = Accelerator(mixed_precision=device.mixed_precision, cpu=True)
    model_b, optimizer_b = accelerator.prepare(model_b, optimizer_b)
    model_b.train()
    torch.manual_seed(1)
    optimizer_step(
        accelerator,
        model_b,
        examples,
        plan[: cfg.train.gradient_accumulation_steps],
        params_b,
        optimizer_b,
        scheduler_b,
        cfg.train.max_grad_norm,
    )

    after_a = dict(model_a.named_parameters())
    after_b = dict(accelerator.unwrap_model(model_b).named_parameters())
    moved = [n for n in start if not torch.equal(after_a[n], start[n])]
    # The step changed every B (A has no gradient while B is still zero, as LoRA starts)...
    assert moved and sorted(moved) == sorted(n for n in start if "lora_B" in n)
    for name in start:  # ...and the two steps changed them the same way
        assert torch.allclose(after_a[name], after_b[name], atol=1e-7, rtol=0), name
    assert scheduler_a.get_last_lr() == scheduler_b.get_last_lr()
    assert namespace["step_tokens"] > 0 and namespace["step_seconds"] > 0
