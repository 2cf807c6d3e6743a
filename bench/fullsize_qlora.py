"""One QLoRA step on the full-size shape on the CPU: NF4 base (bitsandbytes), LoRA r=16 on the
four target modules, sequence 256, batch 1, gradient checkpointing, AdamW. Loaded and trained
with the pipeline's own ``model`` functions. Part of ``bench/fullsize.py`` (step ``qlora``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gb, python_step  # noqa: E402
from fullsize import BASE  # noqa: E402

STEP = f"""
import json, threading, time, psutil, torch
phase = ["load"]
peaks = {{}}
def sample():
    me = psutil.Process()
    while True:
        info = me.memory_info()
        peaks[phase[0]] = max(peaks.get(phase[0], 0), info.rss - info.shared)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
from qlora_pipeline.config import LoraConfig, ModelConfig
from qlora_pipeline.model import attach_lora, load_base_for_training, pick_device
from qlora_pipeline.runtime import tune_allocator
torch.set_num_threads(2)
t = time.perf_counter()
mcfg = ModelConfig(quantize="nf4", gradient_checkpointing=True)
model = load_base_for_training(mcfg, {str(BASE)!r}, pick_device())
model, report = attach_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05), mcfg)
load_s = time.perf_counter() - t
import psutil
info = psutil.Process().memory_info()
after_load_anon = info.rss - info.shared
phase[0] = "steps"
model.train()  # gradient checkpointing only acts in training mode
if {{tune}}:
    tune_allocator()  # raised after loading: what that costs (the train stage leaves large bases alone)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(3, 32000, (1, 256), generator=torch.Generator().manual_seed(0))
times = []
for step in range(2):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
time.sleep(0.1)
print(json.dumps({{"peak_anon_by_phase": peaks, "load_seconds": load_s, "after_load_anon_bytes": after_load_anon, "step_seconds": times, "loss": loss.item(),
                  "trainable_params": report["trainable_params"], "total_params": report["total_params"]}}))
"""


def step_qlora(tune: bool = False) -> dict:
    run = python_step(STEP.replace("{tune}", str(tune)))
    result = run["result"]
    return {
        **result,
        "peak_rss_bytes": run["peak_rss_bytes"],
        "peak_anon_bytes": run["peak_anon_bytes"],
        "goal_bytes": 4e9,
        "summary": {
            "peak RSS": gb(run["peak_rss_bytes"]),
            "peak anonymous memory": gb(run["peak_anon_bytes"]),
            "after loading (anonymous)": gb(result["after_load_anon_bytes"]),
            "peak anonymous while loading / during the steps": f"{gb(result['peak_anon_by_phase']['load'])} / {gb(result['peak_anon_by_phase']['steps'])}",
            "goal": "<= 4.00 GB",
            "seconds per step (2nd step)": f"{result['step_seconds'][-1]:.0f}",
            "first step": f"{result['step_seconds'][0]:.0f} s",
            "load + quantize": f"{result['load_seconds']:.0f} s",
        },
    }
