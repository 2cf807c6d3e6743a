"""Measuring preference: how base, SFT adapter and DPO adapter score oasst1's ranked pairs.

    scores = pair_logps(model, examples, device)     # per pair: log p(chosen), log p(rejected), lengths
    preference_metrics(scores_by_model, beta)        # what the prefer stage writes to preference.json

Two measures, because they answer different questions:

* **implicit reward accuracy** (DPO's own): the share of pairs whose margin is positive, where the
  margin is ``beta * ((log p_policy(chosen) - log p_ref(chosen)) - (log p_policy(rejected) -
  log p_ref(rejected)))``. It compares a model with its reference, so it is given for the SFT
  adapter against the base and for the DPO adapter against the SFT adapter (TRL's
  ``rewards/accuracies``). Zero margins count as wrong.
* **likelihood preference**: the share of pairs where one model alone gives the chosen reply the
  higher log-probability per token. It needs no reference, so base, SFT and DPO compare on it.

TRL computes the first inside its trainer for the batch it trains on; nothing in TRL scores three
models on a held-out split per pair, so the log-probabilities are gathered here (one forward pass
per sequence, the same sum over completion tokens that TRL's loss uses).
"""

from __future__ import annotations

import json
from pathlib import Path

MODELS = ("base", "sft", "dpo")
REFERENCE = {"sft": "base", "dpo": "sft"}  # the reference each implicit reward is measured against


def pair_logps(model, examples: list[dict], device, batch_pairs: int = 8) -> list[dict]:
    """Per pair: the summed log-probabilities of the chosen and the rejected completion given the
    prompt, and their token counts."""
    import torch

    out = []
    model.eval()
    for start in range(0, len(examples), batch_pairs):
        batch = examples[start : start + batch_pairs]
        sequences = [(e["prompt_ids"], e[kind]) for kind in ("chosen_ids", "rejected_ids") for e in batch]
        width = max(len(p) + len(c) for p, c in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        completion = torch.zeros_like(ids, dtype=torch.bool)
        for row, (prompt, reply) in enumerate(sequences):
            ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
            mask[row, : len(prompt) + len(reply)] = 1
            completion[row, len(prompt) : len(prompt) + len(reply)] = True
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        targets = completion[:, 1:].to(device)
        sums = (logps * targets).sum(dim=1).tolist()
        counts = targets.sum(dim=1).tolist()
        n = len(batch)
        for i in range(n):
            out.append(
                {
                    "chosen": sums[i],
                    "rejected": sums[n + i],
                    "chosen_tokens": counts[i],
                    "rejected_tokens": counts[n + i],
                }
            )
    return out


def likelihood_preference(scores: list[dict]) -> float:
    """Share of pairs where the model gives the chosen reply the higher log-probability per token."""
    wins = sum(s["chosen"] / s["chosen_tokens"] > s["rejected"] / s["rejected_tokens"] for s in scores)
    return wins / len(scores)


def mean_logp_gap(scores: list[dict]) -> float:
    """Mean of (log p per token of chosen - of rejected): how strongly, not only how often, the
    model alone prefers the chosen reply (it keeps moving where the share is already 100%)."""
    gaps = [s["chosen"] / s["chosen_tokens"] - s["rejected"] / s["rejected_tokens"] for s in scores]
    return sum(gaps) / len(gaps)


def margins(policy: list[dict], reference: list[dict], beta: float) -> list[float]:
    """DPO's implicit reward margin per pair (TRL's ``rewards/margins`` before averaging)."""
    return [beta * ((p["chosen"] - r["chosen"]) - (p["rejected"] - r["rejected"])) for p, r in zip(policy, reference)]


def preference_metrics(scores: dict[str, list[dict]], beta: float) -> dict:
    """For each model: likelihood preference; for SFT and DPO also reward accuracy and mean margin
    against their reference."""
    result: dict = {"pairs": len(scores["base"]), "beta": beta}
    for name in MODELS:
        entry = {
            "likelihood_preference": likelihood_preference(scores[name]),
            "mean_logp_gap": mean_logp_gap(scores[name]),
        }
        if name in REFERENCE:
            m = margins(scores[name], scores[REFERENCE[name]], beta)
            entry.update(
                reference=REFERENCE[name],
                reward_accuracy=sum(x > 0 for x in m) / len(m),
                mean_margin=sum(m) / len(m),
            )
        result[name] = entry
    return result


def training_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Reward accuracy and margins over steps, on train and validation, from TRL's log history."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in log_history:
        for split, prefix in (("train", ""), ("val", "eval_")):
            for metric in ("accuracies", "margins"):
                key = f"{prefix}rewards/{metric}"
                if key in row:
                    curves.setdefault(f"{split} {metric}", []).append((row["step"], row[key]))
    return curves


def plot_curves(curves: dict[str, list[tuple[int, float]]], out_png: Path) -> None:
    """Reward accuracy (left) and mean margin (right) over DPO steps, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_pipeline.paths import save_figure_atomic

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in zip(axes, ("accuracies", "margins"), ("implicit reward accuracy", "mean reward margin")):
        for split, style in (("train", "-"), ("val", "o-")):
            points = curves.get(f"{split} {metric}", [])
            if points:
                ax.plot(*zip(*points), style, label=split, alpha=0.85)
        ax.set_xlabel("DPO step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.suptitle("Preference tuning (DPO against the SFT adapter)")
    fig.tight_layout()
    save_figure_atomic(fig, out_png)


def preference_line(pref: dict) -> str:
    """The one-line summary the stage logs and the run summary prints."""
    like = " / ".join(
        f"{name} {100 * pref[name]['likelihood_preference']:.0f}% (gap {pref[name]['mean_logp_gap']:+.2f})"
        for name in MODELS
    )
    loss = pref.get("sft_val_loss", {})
    rise = f"; SFT validation loss {loss['before']:.4f} -> {loss['after']:.4f}" if loss else ""
    return (
        f"preference on {pref['pairs']} test pairs: likelihood preference {like}; DPO reward accuracy "
        f"{100 * pref['dpo']['reward_accuracy']:.0f}% (mean margin {pref['dpo']['mean_margin']:+.3f}){rise}"
    )


def read_preference(adapter_dir: Path) -> dict | None:
    path = Path(adapter_dir) / "preference.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
