"""One QLoRA step on the full-size shape on the CPU: NF4 base (bitsandbytes), LoRA r=16 on the
four target modules, sequence 256, batch 1, gradient checkpointing, AdamW. Loaded and trained
with the pipeline's own ``model`` functions. Part of ``bench/fullsize.py`` (step ``qlora``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gb, run_step  # noqa: E402
from fullsize import BASE  # noqa: E402


def step_qlora(tune: bool = False) -> dict:
    run = run_step("qlora_step", base=str(BASE), tune=tune)
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
