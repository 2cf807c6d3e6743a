"""The ``prefer`` section: preference tuning (DPO with TRL) of the SFT adapter (``prefer.py``).

Its own module to keep ``config.py`` small; ``config.PipelineConfig.prefer`` holds one.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_pipeline.errors import check_setting as _check

# TRL 1.16's DPOConfig.loss_type values (its docstring); several may be combined.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


@dataclass(frozen=True)
class PreferConfig:
    """Preference tuning (DPO with TRL) of the SFT adapter on oasst1's ranked pairs."""

    enabled: bool = False
    """Run the ``prefer`` stage between train and merge; merge then takes its adapter."""
    beta: float = 0.1
    """How far the policy may move from the reference (the SFT adapter): higher stays closer."""
    loss_type: tuple[str, ...] = ("sigmoid",)
    """TRL's loss: ``sigmoid`` is DPO's; several combine (``[sigmoid, sft]``)."""
    learning_rate: float = 5e-6
    """Peak learning rate (the adapter's weights only)."""
    epochs: float = 1.0
    """Passes over the training pairs (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; None derives them from epochs."""
    max_length: int | None = None
    """Longest prompt + reply in tokens; pairs over it are dropped. None: data.max_seq_len."""
    batch_size: int = 4
    """Pairs per micro-batch (each pair is two sequences)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    warmup_ratio: float = 0.1
    """Share of steps with linear warm-up before the cosine decay."""
    eval_every: int = 20
    """Reward accuracy and margins on the validation pairs every N steps."""
    checkpoint_every: int = 20
    """Save TRL's full training state every N steps (a kill resumes from the newest)."""
    eval_max_pairs: int | None = None
    """Cap on validation and test pairs measured; None measures them all."""

    def __post_init__(self) -> None:
        _check(self.beta > 0, "prefer.beta", self.beta, "use a positive number (0.1 is usual)")
        unknown = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        _check(
            bool(self.loss_type) and not unknown,
            "prefer.loss_type",
            list(self.loss_type),
            f"use one or more of {', '.join(DPO_LOSS_TYPES)}",
        )
        _check(self.learning_rate > 0, "prefer.learning_rate", self.learning_rate, "use a positive number")
        _check(self.epochs > 0, "prefer.epochs", self.epochs, "use a positive number")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            "prefer.max_steps",
            self.max_steps,
            "use at least 1, or null to derive it from prefer.epochs",
        )
        _check(
            self.max_length is None or self.max_length >= 16,
            "prefer.max_length",
            self.max_length,
            "use at least 16, or null for data.max_seq_len",
        )
        _check(0 <= self.warmup_ratio < 1, "prefer.warmup_ratio", self.warmup_ratio, "use a value in [0, 1)")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"prefer.{name}", getattr(self, name), "use at least 1")
        _check(
            self.eval_max_pairs is None or self.eval_max_pairs >= 1,
            "prefer.eval_max_pairs",
            self.eval_max_pairs,
            "use at least 1, or null for every pair",
        )
