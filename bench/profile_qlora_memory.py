"""Where the memory of a full-size CPU QLoRA step goes: anonymous memory sampled every 20 ms,
tagged with the phase (loading, forward through layer i, backward through layer i, optimizer).

    .venv/bin/python bench/profile_qlora_memory.py     # after make bench-full (the base)

Writes bench/results/profile_qlora_memory.json and .md. The glibc thresholds are left at their
defaults here (see bench/fullsize_qlora.py for what raising them costs).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gb, machine, save  # noqa: E402
from fullsize import BASE  # noqa: E402


def main() -> int:
    import psutil
    import torch

    from qlora_pipeline.config import LoraConfig, ModelConfig
    from qlora_pipeline.model import attach_lora, load_base_for_training, pick_device

    torch.set_num_threads(2)
    phase = ["load"]
    peaks: dict[str, int] = {}
    order: list[str] = []
    me = psutil.Process()

    def sample():
        while True:
            info = me.memory_info()
            key = phase[0]
            if key not in peaks:
                order.append(key)
            peaks[key] = max(peaks.get(key, 0), info.rss - info.shared)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    mcfg = ModelConfig(quantize="nf4", gradient_checkpointing=True)
    model = load_base_for_training(mcfg, str(BASE), pick_device())
    model, _ = attach_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05), mcfg)
    model.train()
    layers = model.base_model.model.model.layers
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: phase.__setitem__(0, f"forward {i:02d}"))
        layer.register_full_backward_pre_hook(lambda m, g, i=i: phase.__setitem__(0, f"backward {i:02d}"))
    head = model.base_model.model.lm_head
    head.register_forward_pre_hook(lambda m, a: phase.__setitem__(0, "lm_head + loss"))
    params = {"lm_head/embed dtype": str(head.weight.dtype).replace("torch.", "")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 32000, (1, 256), generator=torch.Generator().manual_seed(0))
    phase[0] = "after load"
    time.sleep(0.2)
    loss = model(input_ids=ids, labels=ids).loss
    phase[0] = "backward start"
    loss.backward()
    phase[0] = "optimizer"
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phase[0] = "done"
    time.sleep(0.2)
    rows = [[key, gb(peaks[key])] for key in order if key in peaks]
    # Keep the table short: every 4th layer plus the non-layer phases.
    short = [r for r in rows if not r[0].split()[-1].isdigit() or int(r[0].split()[-1]) % 4 == 0]
    save(
        "profile_qlora_memory",
        {"machine": machine(), "peaks_by_phase": peaks, "order": order, **params},
        short,
        ["phase", "peak anonymous memory"],
        "Full-size QLoRA step on the CPU: memory by phase",
        f"NF4 base, LoRA r=16 on four targets, sequence 256, gradient checkpointing; non-quantized weights "
        f"(embeddings, lm_head, norms) held in {params['lm_head/embed dtype']}.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
