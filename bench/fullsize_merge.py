"""Merge a random rank-16 adapter (all four Phi-3 target modules) into the full-size base, twice:
by streaming shard by shard (``merge_streaming``) and by peft's ``merge_and_unload``; each in
its own process, timed, with its peak RSS. Part of ``bench/fullsize.py`` (step ``merge``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gb, python_step  # noqa: E402
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


STREAM = f"""
from pathlib import Path
from qlora_pipeline.merge_streaming import stream_merge
stream_merge(Path({str(BASE)!r}), Path({str(ADAPTER)!r}), Path({str(ROOT / "merged-stream")!r}))
"""

PEFT = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(BASE)!r}, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, {str(ADAPTER)!r}).merge_and_unload()
model.save_pretrained({str(ROOT / "merged-peft")!r})
"""

COMPARE = f"""
import json, torch
from safetensors import safe_open
worst, n = 0.0, 0
with safe_open({str(ROOT / "merged-stream" / "model-00001-of-00004.safetensors")!r}, "pt") as a:
    import glob
    peft_files = glob.glob({str(ROOT / "merged-peft")!r} + "/*.safetensors")
    for name in a.keys():
        if "layers.0." not in name and "layers.1." not in name:
            continue
        for f in peft_files:
            with safe_open(f, "pt") as b:
                if name in b.keys():
                    x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
                    worst = max(worst, ((x - y).abs() / y.abs().clamp_min(1e-3)).max().item()); n += 1
print(json.dumps({{"tensors_compared": n, "max_relative_diff": worst}}))
"""


def step_merge() -> dict:
    make_adapter()
    largest_shard = max(f.stat().st_size for f in BASE.glob("*.safetensors"))
    stream = python_step(STREAM)
    peft = python_step(PEFT)
    compare = python_step(COMPARE)["result"]
    for folder in ("merged-stream", "merged-peft"):
        shutil.rmtree(ROOT / folder, ignore_errors=True)
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
