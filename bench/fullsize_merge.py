"""Merge a random rank-16 adapter (all four Phi-3 target modules) into the full-size base, twice:
by streaming shard by shard (``merge_streaming``) and by peft's ``merge_and_unload``; each in
its own process, timed, with its peak RSS. Part of ``bench/fullsize.py`` (step ``merge``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gb, run_step  # noqa: E402
from fullsize import BASE, ROOT  # noqa: E402

ADAPTER = ROOT / "adapter-r16"
TARGETS = {
    "self_attn.qkv_proj": (9216, 3072),
    "self_attn.o_proj": (3072, 3072),
    "mlp.gate_up_proj": (16384, 3072),
    "mlp.down_proj": (3072, 8192),
}


def make_adapter(r: int = 16, alpha: int = 32, layers: int = 32) -> None:
    """A peft-format LoRA adapter with random A and B (B is zero after peft's init: that would merge nothing)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for module, (out_features, in_features) in TARGETS.items():
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_features, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, r, generator=generator) * 0.01
    ADAPTER.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ADAPTER / "adapter_model.safetensors"))
    (ADAPTER / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": [m.split(".")[-1] for m in TARGETS],
                "bias": "none",
                "base_model_name_or_path": str(BASE),
                "inference_mode": True,
                "use_rslora": False,
                "use_dora": False,
                "fan_in_fan_out": False,
            },
            indent=1,
        )
    )


def step_merge() -> dict:
    make_adapter()
    largest_shard = max(f.stat().st_size for f in BASE.glob("*.safetensors"))
    streamed, merged = ROOT / "merged-stream", ROOT / "merged-peft"
    stream = run_step("merge_streaming", base=str(BASE), adapter=str(ADAPTER), out=str(streamed))
    peft = run_step("merge_peft", base=str(BASE), adapter=str(ADAPTER), out=str(merged))
    first_shard = streamed / "model-00001-of-00004.safetensors"
    compare = run_step("compare_merges", streamed_shard=str(first_shard), peft_dir=str(merged))["result"]
    for folder in (streamed, merged):
        shutil.rmtree(folder, ignore_errors=True)
    goal = 2.0e9 + largest_shard
    return {
        "streaming": {k: stream[k] for k in ("seconds", "peak_rss_bytes", "peak_anon_bytes")},
        "peft": {k: peft[k] for k in ("seconds", "peak_rss_bytes", "peak_anon_bytes")},
        "largest_shard_bytes": largest_shard,
        "goal_bytes": goal,
        "agreement": compare,
        "summary": {
            "streaming peak RSS": gb(stream["peak_rss_bytes"]),
            "in": f"{stream['seconds']:.0f} s",
            "peft peak RSS": gb(peft["peak_rss_bytes"]),
            "peft in": f"{peft['seconds']:.0f} s",
            "peak anonymous memory, streaming / peft": (
                f"{gb(stream['peak_anon_bytes'])} / {gb(peft['peak_anon_bytes'])}"
            ),
            "goal": f"<= {gb(goal)} (2 GB + largest shard)",
            "max relative diff streaming vs peft (layers 0-1, bf16)": f"{compare['max_relative_diff']:.2e}",
        },
    }
