"""Configuration: frozen dataclasses, YAML presets and ``key=value`` overrides.

    from qlora_pipeline.config import load_config
    cfg = load_config("tiny", ["train.max_steps=20", "lora.r=4"])

A preset is a YAML file in the package's ``presets/`` folder (or any path). Every field of every section has a
docstring, and ``__post_init__`` rejects values that cannot work with one sentence that names
the key and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from qlora_pipeline.errors import ConfigError, check_setting
from qlora_pipeline.prefer_config import PreferConfig

# Package data (pyproject's package-data), so that an installed wheel has its presets too.
PRESETS_DIR = Path(str(resources.files("qlora_pipeline") / "presets"))
PHI3_FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def check_system_prompt(text: str | None) -> None:
    """Refuse, before training, a system prompt the Ollama Modelfile cannot carry unchanged: Ollama's
    parser (parser/parser.go) ends a \"\"\"-quoted value at a \"\"\" and drops characters Go's
    strconv.IsPrint rejects (spaces, tabs and line breaks apart)."""
    if text and '"""' in text:
        raise ConfigError('data.system_prompt contains """, which an Ollama Modelfile cannot quote; remove it')
    dropped = sorted({c for c in text or "" if not c.isprintable() and c not in " \t\n\r"})
    if dropped:
        names = ", ".join(f"U+{ord(c):04X}" for c in dropped[:5])
        raise ConfigError(f"data.system_prompt contains characters Ollama drops ({names}); remove them")


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    check_setting(condition, key, value, allowed)


@dataclass(frozen=True)
class TinyConfig:
    """The built-in Phi-3-shaped stand-in model (used when ``model.name_or_path`` is ``tiny``)."""

    hidden_size: int = 256
    """Width of the residual stream; a multiple of 256 so llama.cpp's K-quants apply to every row."""
    intermediate_size: int = 768
    """FFN width; a multiple of 256 for the same reason."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (head size = hidden_size / num_heads)."""
    max_position_embeddings: int = 4096
    """Context length written into the config (and later the GGUF)."""
    pretrain_steps: int = 300
    """Steps of plain language-model pre-training on the bundled prose; 0 keeps random weights."""
    pretrain_seq_len: int = 64
    """Tokens per pre-training sequence (the prose is packed)."""
    pretrain_batch_size: int = 8
    """Sequences per pre-training step."""
    pretrain_lr: float = 3e-3
    """Peak learning rate of pre-training (AdamW, cosine decay)."""
    seed: int = 0
    """Seed for initialisation and data order; the same recipe gives the same weights."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size"):
            value = getattr(self, name)
            _check(
                value > 0 and value % 256 == 0,
                f"tiny.{name}",
                value,
                "use a positive multiple of 256 (llama.cpp K-quants need 256-wide rows)",
            )
        _check(self.num_layers >= 1, "tiny.num_layers", self.num_layers, "use at least 1")
        _check(
            self.num_heads >= 1 and self.hidden_size % self.num_heads == 0,
            "tiny.num_heads",
            self.num_heads,
            "use a divisor of tiny.hidden_size",
        )
        _check(self.pretrain_steps >= 0, "tiny.pretrain_steps", self.pretrain_steps, "use 0 or more")
        _check(self.pretrain_lr > 0, "tiny.pretrain_lr", self.pretrain_lr, "use a positive number")


@dataclass(frozen=True)
class DataConfig:
    """Where the oasst1 rows come from and how trees become training conversations."""

    source: str = "sample"
    """``sample`` (bundled oasst1-format file), ``hub`` (``hub_dataset`` via datasets) or ``files``."""
    hub_dataset: str = "OpenAssistant/oasst1"
    """Dataset id on the Hugging Face Hub, used when ``source`` is ``hub``."""
    data_files: tuple[str, ...] = ()
    """Local .jsonl/.json/.parquet files of oasst1 message rows, used when ``source`` is ``files``."""
    languages: tuple[str, ...] = ("en",)
    """Keep trees whose root message is in one of these languages (oasst1 ``lang`` codes)."""
    system_prompt: str | None = None
    """Optional system turn put in front of every conversation."""
    val_fraction: float = 0.1
    """Share of trees for validation (when the source has no validation split of its own)."""
    test_fraction: float = 0.1
    """Share of trees held out for the final evaluation."""
    max_seq_len: int = 512
    """Longest tokenized conversation used for training and evaluation."""
    overlong: str = "truncate"
    """``truncate`` (cut at the last whole turn that fits) or ``drop`` longer conversations."""
    max_conversations: int | None = None
    """Cap per split after filtering (handy for quick runs on the full dataset); None keeps all."""
    seed: int = 0
    """Seed of the tree-level split."""

    def __post_init__(self) -> None:
        _check(self.source in ("sample", "hub", "files"), "data.source", self.source, "use sample, hub or files")
        _check(
            self.source != "files" or bool(self.data_files),
            "data.data_files",
            self.data_files,
            "give at least one file when data.source is files (--data-files PATH)",
        )
        _check(
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
            "data.val_fraction/test_fraction",
            (self.val_fraction, self.test_fraction),
            "use fractions in [0, 1) that sum to less than 1",
        )
        _check(self.max_seq_len >= 16, "data.max_seq_len", self.max_seq_len, "use at least 16 tokens")
        _check(self.overlong in ("truncate", "drop"), "data.overlong", self.overlong, "use truncate or drop")
        check_system_prompt(self.system_prompt)
        _check(len(self.languages) > 0, "data.languages", self.languages, "list at least one language code")
        for lang in self.languages:
            _check(
                isinstance(lang, str) and re.fullmatch(r"[a-z]{2,3}(-[A-Z]{2})?", lang) is not None,
                "data.languages",
                lang,
                "use oasst1 language codes such as en, de, es, pt-BR",
            )


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how it is loaded for training."""

    name_or_path: str = "tiny"
    """``tiny`` (built in), a Hub id such as ``microsoft/Phi-3.5-mini-instruct``, or a local folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; None takes the default branch."""
    quantize: str = "nf4"
    """``nf4`` (QLoRA: 4-bit NormalFloat base via bitsandbytes) or ``none`` (plain LoRA)."""
    double_quant: bool = True
    """Quantize the NF4 block scales too (about 0.37 bits per parameter saved)."""
    compute_dtype: str = "auto"
    """dtype of the matmuls: ``auto`` (bf16 where supported, else fp16 on GPU, fp32 on CPU)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``)."""

    def __post_init__(self) -> None:
        _check(self.quantize in ("nf4", "none"), "model.quantize", self.quantize, "use nf4 or none")
        _check(
            self.compute_dtype in ("auto", "float32", "float16", "bfloat16"),
            "model.compute_dtype",
            self.compute_dtype,
            "use auto, float32, float16 or bfloat16",
        )


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapters (peft)."""

    r: int = 16
    """Rank of the update B·A."""
    alpha: int = 32
    """Scale numerator: the update is multiplied by alpha / r (usually 2 * r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] = PHI3_FUSED_TARGETS
    """Module names to adapt; Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", self.r, "use a rank of at least 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "use a positive number (usually 2 * lora.r)")
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "use a value in [0, 1)")
        _check(
            len(self.target_modules) > 0,
            "lora.target_modules",
            self.target_modules,
            f"list module names, e.g. {list(PHI3_FUSED_TARGETS)}",
        )


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (accelerate)."""

    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    epochs: float = 1.0
    """Passes over the training conversations (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; None derives them from epochs."""
    batch_tokens: int = 2048
    """Tokens per micro-batch: conversations are packed without padding up to this budget."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    warmup_ratio: float = 0.05
    """Share of steps with linear warm-up before the cosine decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 turns clipping off)."""
    eval_every: int = 50
    """Evaluate validation loss every N optimizer steps (and at the end)."""
    eval_max_batches: int | None = None
    """Cap on validation micro-batches per evaluation; None uses the whole split."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement; None never stops early."""
    checkpoint_every: int = 50
    """Save the full training state every N optimizer steps."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    optimizer: str = "auto"
    """``adamw`` (torch), ``paged_adamw_8bit`` (bitsandbytes, CUDA) or ``auto`` (paged 8-bit on CUDA)."""
    mixed_precision: str = "auto"
    """``auto`` (bf16 where supported, else fp16 on GPU, none on CPU), ``no``, ``fp16`` or ``bf16``."""
    seed: int = 0
    """Seed of data order, dropout and adapter initialisation."""
    log_every: int = 5
    """Write a line to train_log.jsonl every N optimizer steps."""

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "use a positive number")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "use 0 or more")
        _check(self.epochs > 0, "train.epochs", self.epochs, "use a positive number")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            "train.max_steps",
            self.max_steps,
            "use at least 1, or null to derive it from train.epochs",
        )
        _check(self.batch_tokens >= 16, "train.batch_tokens", self.batch_tokens, "use at least 16")
        _check(
            self.gradient_accumulation_steps >= 1,
            "train.gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "use at least 1",
        )
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "use a value in [0, 1)")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "use 0 or more")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "use at least 1")
        _check(
            self.optimizer in ("auto", "adamw", "paged_adamw_8bit"),
            "train.optimizer",
            self.optimizer,
            "use auto, adamw or paged_adamw_8bit",
        )
        _check(
            self.mixed_precision in ("auto", "no", "fp16", "bf16"),
            "train.mixed_precision",
            self.mixed_precision,
            "use auto, no, fp16 or bf16",
        )


@dataclass(frozen=True)
class MergeConfig:
    """Merging the adapter into a full-precision copy of the base."""

    dtype: str = "auto"
    """dtype of the merged model: ``auto`` (the base's own: fp32 for tiny, bf16 for Phi-3.5)."""
    check_samples: int = 8
    """Validation conversations used to compare merged and adapter logits."""
    streaming: Any = "auto"
    """Merge shard by shard (peak memory: one shard) instead of peft's in-memory merge: true,
    false, or ``auto`` (streaming when the base is larger than half the free memory)."""

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("auto", "float32", "float16", "bfloat16"),
            "merge.dtype",
            self.dtype,
            "use auto, float32, float16 or bfloat16",
        )
        _check(self.streaming in (True, False, "auto"), "merge.streaming", self.streaming, "use true, false or auto")
        _check(self.check_samples >= 1, "merge.check_samples", self.check_samples, "use at least 1")


@dataclass(frozen=True)
class ExportConfig:
    """GGUF conversion and quantization (llama.cpp)."""

    quant_types: tuple[str, ...] = ("Q8_0", "Q5_K_M", "Q4_K_M")
    """Quantized files to make from the F16 GGUF; any type llama.cpp knows (Q4_K_M, Q6_K, IQ4_XS, ...)."""
    model_name: str | None = None
    """``general.name`` written into the GGUF; None derives it from the base (it must contain Phi-3)."""
    threads: int = 0
    """CPU threads for quantization; 0: the CPUs this process may use."""
    imatrix_tokens: int = 50_000
    """Tokens of training conversations the importance matrix of ``<TYPE>-imat`` variants is
    collected over (the merged model runs over them once)."""
    output_type: str | None = None
    """Type of ``output.weight`` in every quantized file (llama.cpp's ``--output-tensor-type``),
    e.g. Q8_0; None keeps llama.cpp's choice for the file type."""
    token_embedding_type: str | None = None
    """Type of ``token_embd.weight`` (``--token-embedding-type``); None: llama.cpp's choice."""
    lora: bool = False
    """Also write the LoRA as a GGUF adapter (``gguf/adapter-F16.gguf``, llama.cpp's
    ``convert_lora_to_gguf.py``) and the base it applies to (``gguf/base-F16.gguf``)."""
    modelfile_variant: str | None = None
    """The GGUF that ``gguf/Modelfile`` (Ollama) names; None: Q4_K_M (or Q4_K_M-imat), else the last type."""
    tensor_types: tuple[str, ...] = ()
    """Per-tensor overrides ``PATTERN=TYPE`` (``--tensor-type``): PATTERN a regular expression
    searched in GGUF tensor names, e.g. ``ffn_down=Q6_K`` or ``blk\\.0\\.=Q8_0``."""

    def __post_init__(self) -> None:
        _check(
            len(self.quant_types) > 0, "export.quant_types", self.quant_types, "list at least one type, e.g. [Q4_K_M]"
        )
        _check(self.threads >= 0, "export.threads", self.threads, "use 0 (the usable CPUs) or more")
        _check(self.imatrix_tokens >= 1, "export.imatrix_tokens", self.imatrix_tokens, "use 1 or more")
        _check(
            self.modelfile_variant is None or self.modelfile_variant in ("F16", *self.quant_types),
            "export.modelfile_variant",
            self.modelfile_variant,
            f"name F16 or one of export.quant_types ({', '.join(self.quant_types)})",
        )
        for rule in self.tensor_types:
            _check(
                "=" in rule and all(rule.rpartition("=")[::2]),
                "export.tensor_types",
                rule,
                "write each as PATTERN=TYPE, e.g. ffn_down=Q6_K",
            )


@dataclass(frozen=True)
class EvalConfig:
    """Measuring every variant and running GGUF files."""

    n_ctx: int = 2048
    """Context length for every llama.cpp model opened (Phi-3.5 GGUFs default to 131,072: out of memory)."""
    threads: int = 0
    """CPU threads for llama.cpp evaluation and the speed measurement; 0: the CPUs this process may
    use (affinity and cgroup quota), not the host's core count."""
    gguf_gpu_layers: int = -1
    """Layers of each GGUF that llama.cpp offloads to the GPU during evaluation when it was built
    with GPU support and a GPU is present (-1: all); ignored on a CPU-only build."""
    hf_max_tokens: int = 0
    """Tokens of each split (validation, test) on which transformers' base, adapter and merged models
    are scored; 0: the whole split. The Colab preset caps it so the sequence fits one session."""
    kld_max_tokens: int = 4000
    """Tokens of the test split used for perplexity, KL divergence and top-1 agreement of GGUF variants."""
    parity_tokens: int = 2000
    """Tokens of the test split on which F16 GGUF logits are compared with transformers' merged model."""
    long_parity_tokens: int = 0
    """Length of one test sequence compared past the original context (LongRoPE's long factors
    on both sides, llama.cpp at twice that context); 0 skips it (a full-size fp32 reference on
    5k tokens is slow on a CPU)."""
    speed_prompt_tokens: int = 64
    """Length of the fixed prompt for the speed measurement."""
    speed_new_tokens: int = 64
    """Tokens generated (greedy) per speed run."""
    speed_runs: int = 5
    """Speed runs per variant; the median is reported."""
    samples: int = 4
    """Held-out prompts answered by every variant, side by side."""
    f32_parity: bool = False
    """Also convert to a temporary F32 GGUF and compare it with transformers (the converter exact; 4x F16's size)."""
    sample_max_tokens: int = 48
    """Longest sample answer."""
    heldout_questions: str = "sample"
    """Questions scored by exact match for base, adapter, merged and every GGUF: ``sample`` (the
    bundled questions about facts the tiny base knows and the fine-tuning sample never asks),
    ``general`` (one-word questions a pre-trained Phi-3.5 answers), ``none``, or a .jsonl file
    of {"question", "answer"} lines."""
    heldout_max_tokens: int = 32
    """Longest answer to a held-out question (greedy)."""

    def __post_init__(self) -> None:
        _check(self.n_ctx >= 64, "eval.n_ctx", self.n_ctx, "use at least 64 tokens")
        _check(self.threads >= 0, "eval.threads", self.threads, "use 0 (the usable CPUs) or more")
        _check(self.hf_max_tokens >= 0, "eval.hf_max_tokens", self.hf_max_tokens, "use 0 (whole split) or more")
        for name in (
            "kld_max_tokens",
            "parity_tokens",
            "speed_prompt_tokens",
            "speed_new_tokens",
            "speed_runs",
            "sample_max_tokens",
            "heldout_max_tokens",
        ):
            _check(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), "use at least 1")
        _check(self.samples >= 0, "eval.samples", self.samples, "use 0 or more")
        _check(
            self.long_parity_tokens >= 0,
            "eval.long_parity_tokens",
            self.long_parity_tokens,
            "use 0 (off) or a length above the model's original context",
        )


@dataclass(frozen=True)
class PipelineConfig:
    """One run of the pipeline: every section, as resolved from a preset and overrides."""

    preset: str = "tiny"
    """Name of the preset this configuration came from."""
    tiny: TinyConfig = field(default_factory=TinyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prefer: PreferConfig = field(default_factory=PreferConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A short hash of some sections, used to tell whether a stage's inputs changed."""
        import hashlib

        payload = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _coerce(value: Any, type_hint: Any, key: str) -> Any:
    """Turn a YAML value into the field's type (lists become tuples, ints become floats)."""
    origin = get_origin(type_hint)
    args = get_args(type_hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}=null is invalid: this setting needs a value")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid: give a list, e.g. [a, b] or a,b")
        return tuple(_coerce(v, args[0], key) for v in value)
    if args and type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, key)
    if type_hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: use true or false")
    if type_hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is invalid: use a whole number")
        return value
    if type_hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid: use a number")
        return float(value)
    if type_hint is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full, [f"{prefix}{n}" for n in names])
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping of settings, got {value!r}")
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def all_keys(cls: type = PipelineConfig, prefix: str = "") -> list[str]:
    """Every dotted key a preset or override may set."""
    keys = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def preset_path(preset: str) -> Path:
    """The YAML file of a preset name (``tiny``) or a path to one."""
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"preset file {candidate} does not exist; give a YAML file or a preset name")
        return candidate
    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(names)} or give a .yaml path")
    return path


def _field_type(key: str) -> Any:
    """The type hint of a dotted key (``train.mixed_precision`` -> str)."""
    cls: Any = PipelineConfig
    for part in key.split("."):
        cls = get_type_hints(cls)[part]
    return cls


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=20", "lora.target_modules=[qkv_proj]"]`` -> nested dict."""
    nested: dict[str, Any] = {}
    valid = all_keys()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write it like train.max_steps=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise _unknown_key(key, valid)
        hint = _field_type(key)
        optional = type(None) in get_args(hint)
        if optional and raw.strip() in ("", "null", "~"):
            value = None
        elif hint is str or (optional and str in get_args(hint)):
            value = raw.strip()  # as typed: YAML would read train.mixed_precision=no as False
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def merge_settings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(values: dict[str, Any]) -> PipelineConfig:
    return _build(PipelineConfig, values, "")


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> PipelineConfig:
    """Resolve a preset plus ``key=value`` overrides into a validated PipelineConfig."""
    path = preset_path(preset)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {path} is not valid YAML ({exc.__class__.__name__}); fix the file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"preset {path} must be a mapping of sections (data:, model:, ...)")
    values.setdefault("preset", path.stem)
    values = merge_settings(values, parse_overrides(overrides or []))
    return config_from_dict(values)


# The sections whose change means a different trained adapter: the train stage's fingerprint (what
# a checkpoint may resume) and the pipeline's record of the stages that depend on it read this one
# tuple, so they cannot drift apart.
TRAINING_SECTIONS = ("data", "tiny", "model", "lora", "train")
