"""Loading the base model (4-bit NF4 or full precision), its tokenizer, and attaching LoRA.

    from qlora_pipeline.model import load_base_for_training, attach_lora
    model = load_base_for_training(cfg.model, base_path)
    model, report = attach_lora(model, cfg.lora, cfg.model)

Hub models are loaded with ``trust_remote_code=False`` always: Phi-3 is native in transformers.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.config import LoraConfig, ModelConfig, PipelineConfig
from qlora_pipeline.errors import ModelError

log = logging.getLogger("qlora_pipeline")
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Device:
    """Where the model runs and in which dtype it computes."""

    name: str  # "cuda", "mps" or "cpu"
    compute_dtype: object  # a torch.dtype
    mixed_precision: str  # accelerate's: "bf16", "fp16" or "no"


_logged_device: set[tuple] = set()


def pick_device(compute_dtype: str = "auto", mixed_precision: str = "auto") -> Device:
    """CUDA, then MPS, then CPU; bf16 where the GPU has it, else fp16; fp32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        name = "cuda"
        # Without emulation: torch counts a T4's (sm_75) software bf16 as support, which is slow.
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        name, auto = "mps", torch.float16
    else:
        # CPU matmuls in fp16/bf16 are slower than fp32 on most CPUs and lose precision.
        name, auto = "cpu", torch.float32
    dtype = auto if compute_dtype == "auto" else getattr(torch, compute_dtype)
    if mixed_precision == "auto":
        mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if name == "cuda" else "no"
    else:
        mixed = mixed_precision
    device = Device(name, dtype, mixed)
    key = (name, str(dtype), mixed)
    if key not in _logged_device:
        _logged_device.add(key)
        extra = f" ({torch.cuda.get_device_name(0)})" if name == "cuda" else ""
        log.info(
            "device: %s%s, compute dtype %s, mixed precision %s", name, extra, str(dtype).replace("torch.", ""), mixed
        )
    return device


def load_tokenizer(base: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, revision=revision, trust_remote_code=False)
    except OSError as exc:
        raise ModelError(
            f"could not load a tokenizer from {base!r} ({str(exc).splitlines()[0][:160]}); "
            "check model.name_or_path, or log in with HF_TOKEN for gated models"
        ) from None
    restore_file_pipeline(tokenizer, base, revision)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Phi-3.5 ships pad == eos; padding is masked out of the loss, and masking EOS-as-pad
        # teaches a model never to stop. <unk> is never produced, so it is a safe pad.
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def restore_file_pipeline(tokenizer, base: str, revision: str | None = None) -> bool:
    """Give the tokenizer the normalizer, pre-tokenizer and decoder of its own ``tokenizer.json``.

    Transformers 5 builds a ``LlamaTokenizer``'s (Phi-3.5's hub class) pre-tokenizer itself:
    a Metaspace that marks only the start of the whole input as a word start, where the hub's
    tokenizer.json prepends "▁" to every piece of text between special tokens, as llama.cpp
    and SentencePiece do. Left as loaded, "<|user|>\nHello" gives 'Hello' (10994) where
    llama.cpp gives '▁Hello' (15043), and 15 of llama.cpp's 46 Phi-3 tokenizer vectors fail;
    serving sees llama.cpp's ids, so training must too. Returns whether anything changed.
    """
    from tokenizers import Tokenizer
    from transformers.utils import cached_file

    try:
        path = cached_file(base, "tokenizer.json", revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not path or backend is None:
        return False
    from_file = Tokenizer.from_file(path)
    changed = False
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        wanted = getattr(from_file, part)
        if str(getattr(backend, part)) != str(wanted):
            setattr(backend, part, wanted)
            changed = True
    return changed


def _from_pretrained(base: str, revision: str | None, **kwargs):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            base, revision=revision, trust_remote_code=False, use_safetensors=True, **kwargs
        )
    except SafetensorError as exc:
        raise broken_safetensors(Path(base), exc) from None
    except OSError as exc:
        raise ModelError(
            f"could not load model weights from {base!r} ({str(exc).splitlines()[0][:160]}); "
            "the pipeline loads only safetensors; check model.name_or_path"
        ) from None


def count_parameters(base: str) -> int:
    """Parameters of a saved model (local folder or Hub id) from its safetensors headers; no
    weights are loaded."""
    from safetensors import safe_open

    path = Path(base)
    if path.is_dir():
        total = 0
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    n = 1
                    for d in f.get_slice(name).get_shape():
                        n *= d
                    total += n
        return total
    from huggingface_hub import get_safetensors_metadata, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # already in the Hub cache (a second run, or an offline one): read the local headers
        return count_parameters(snapshot_download(base, local_files_only=True, allow_patterns=["*.safetensors"]))
    except LocalEntryNotFoundError:
        return sum(get_safetensors_metadata(base).parameter_count.values())  # headers only, over HTTP


def check_safetensors(file: Path, cause: Exception | None = None) -> None:
    """A ModelError naming ``file`` unless it is a complete safetensors file (its header and
    data cover the file). ``cause``: the error that led here, quoted instead of the check's own."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np"):
            pass
    except Exception as exc:  # safetensors raises its own error or OSError, depending on the damage
        raise ModelError(
            f"{file} is not a complete safetensors file ({str(cause or exc)[:100]}); "
            "it was probably cut short: copy or download it again"
        ) from None


def broken_safetensors(where: Path, exc: Exception) -> ModelError:
    """The error for an unreadable safetensors file, naming the file (the library's does not)."""
    files = [where] if where.is_file() else sorted(where.glob("*.safetensors"))
    for file in files:
        try:
            check_safetensors(file, cause=exc)
        except ModelError as error:
            return error
    return ModelError(f"could not read the safetensors weights in {where} ({str(exc)[:120]})")


def keep_nf4_layout(model) -> int:
    """Keep bitsandbytes' NF4 weights in one layout for the whole training; returns the layers.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weights for its fast kernel
    on the first eval-mode forward (an evaluation) and keeps them so; the training steps after
    that compute slightly differently from those of a freshly loaded model, so a resumed run
    would no longer equal an uninterrupted one (measured: the adapter differed after a resume
    at step 3 on such a CPU, and was equal with the repacking off).
    """
    layers = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            layers += 1
    return layers


def quantization_config(mcfg: ModelConfig, device: Device):
    """The ``BitsAndBytesConfig`` of the 4-bit base: NF4 weights, computed in the device's dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=mcfg.double_quant,  # 8-bit scales of the scales: ~0.37 bits/weight saved
        bnb_4bit_compute_dtype=device.compute_dtype,  # weights are widened to this for each matmul
        bnb_4bit_quant_storage=torch.uint8,
    )


def peft_lora_config(lcfg: LoraConfig):
    """peft's ``LoraConfig`` for the preset's adapters."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=list(lcfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_base_for_training(mcfg: ModelConfig, base: str, device: Device):
    """The base, frozen, ready for adapters: NF4 4-bit (QLoRA) or full precision (LoRA)."""
    if mcfg.quantize == "nf4":
        from peft import prepare_model_for_kbit_training

        quant = quantization_config(mcfg, device)
        model = _from_pretrained(
            base,
            mcfg.revision,
            quantization_config=quant,
            device_map={"": device.name},
            dtype=device.compute_dtype,
            attn_implementation=mcfg.attn_implementation,
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=mcfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep_nf4_layout(model)
    else:
        model = _from_pretrained(
            base, mcfg.revision, dtype=device.compute_dtype, attn_implementation=mcfg.attn_implementation
        ).to(device.name)
        for param in model.parameters():
            param.requires_grad_(False)
        if mcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False  # the cache is useless in training and breaks packed sequences
    return model


def load_base_full_precision(base: str, mcfg: ModelConfig, dtype=None, device: str = "cpu"):
    """The base at 16/32 bits, for merging and evaluation (never merge into 4-bit layers).

    On a GPU the weights go straight from the safetensors files to the device (``device_map``),
    so a 7.6 GB model never sits in Colab's 12.7 GB of RAM as well."""
    placement = {} if device == "cpu" else {"device_map": device}
    model = _from_pretrained(
        base, mcfg.revision, dtype=dtype or "auto", attn_implementation=mcfg.attn_implementation, **placement
    )
    model.eval()
    return model


def eval_placement(dtype) -> tuple[str, object]:
    """Device and dtype for transformers' evaluation, the merge check and the parity reference.

    CUDA when there is one, in the model's 16-bit dtype (a T4 holds a 7.6 GB Phi-3.5 in fp16;
    the CPU would take hours). On a CPU, fp16 becomes fp32: CPUs run fp16 matmuls several times
    slower than fp32. bf16 stays bf16 there (half the memory, and fast where the CPU has it)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", dtype
    return "cpu", torch.float32 if dtype == torch.float16 else dtype


def free_memory() -> None:
    """Return the memory of models dropped with ``del`` now: Python's cycles, then CUDA's cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_lora_targets(model, target_modules: tuple[str, ...]) -> dict[str, int]:
    """Count, per target, the layers in which it names a module; fail unless every layer has each."""
    import torch

    layers: set[int] = set()
    found: dict[str, set[int]] = defaultdict(set)
    linear_names: Counter = Counter()
    for name, module in model.named_modules():
        match = _LAYER_RE.search(f".{name}.")
        if not match:
            continue
        layer = int(match.group(1))
        layers.add(layer)
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) or module.__class__.__name__ in ("Linear4bit", "Linear8bitLt"):
            linear_names[leaf] += 1
        if leaf in target_modules:
            found[leaf].add(layer)
    problems = []
    for target in target_modules:
        missing = sorted(layers - found.get(target, set()))
        if missing:
            where = (
                "any layer"
                if len(missing) == len(layers)
                else f"layers {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
            problems.append(f"{target!r} matches no module in {where}")
    if problems:
        raise ModelError(
            f"LoRA target modules do not fit this model: {'; '.join(problems)}; "
            f"its linear layers are {', '.join(sorted(linear_names))} "
            "(set lora.target_modules to some of these)"
        )
    return {target: len(found[target]) for target in target_modules}


def attach_lora(model, lcfg: LoraConfig, mcfg: ModelConfig, seed: int = 0):
    """Wrap the frozen base in peft LoRA adapters; return (model, per-module report)."""
    import torch
    from peft import get_peft_model

    per_target_layers = check_lora_targets(model, lcfg.target_modules)
    torch.manual_seed(seed)  # adapter A matrices start random: make them reproducible
    model = get_peft_model(model, peft_lora_config(lcfg))
    trainable: Counter = Counter()
    for name, param in model.named_parameters():
        if param.requires_grad:
            module = next((t for t in lcfg.target_modules if f".{t}." in name), "other")
            trainable[module] += param.numel()
    total = sum(p.numel() for p in model.parameters())
    report = {
        "targets": {
            t: {"layers": per_target_layers[t], "trainable_params": trainable.get(t, 0)} for t in lcfg.target_modules
        },
        "trainable_params": sum(trainable.values()),
        "total_params": total,
    }
    if trainable.get("other"):
        report["other_trainable_params"] = trainable["other"]
    return model, report


def format_lora_report(report: dict) -> str:
    lines = ["LoRA target check (every layer must match):", f"  {'module':<14}{'layers':>8}{'trainable':>12}"]
    for target, info in report["targets"].items():
        lines.append(f"  {target:<14}{info['layers']:>8}{info['trainable_params']:>12,}")
    share = 100 * report["trainable_params"] / max(1, report["total_params"])
    lines.append(f"  trainable {report['trainable_params']:,} of {report['total_params']:,} parameters ({share:.2f}%)")
    return "\n".join(lines)


def merge_dtype(cfg: PipelineConfig, base: str):
    """The dtype to merge in: the configured one, else the base's own (fp32 for tiny, bf16 for Phi-3.5)."""
    import torch
    from transformers import AutoConfig

    if cfg.merge.dtype != "auto":
        return getattr(torch, cfg.merge.dtype)
    config = AutoConfig.from_pretrained(base, revision=cfg.model.revision, trust_remote_code=False)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def check_adapter_files(adapter_dir: Path) -> None:
    """The adapter's weights are a complete safetensors file (never a pickle checkpoint)."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        pickle = (Path(adapter_dir) / "adapter_model.bin").is_file()
        raise ModelError(
            f"{adapter_dir} has "
            + ("only a pickle checkpoint (adapter_model.bin)" if pickle else "no adapter_model.safetensors")
            + "; the pipeline loads only safetensors: save the adapter "
            "with save_pretrained(safe_serialization=True)"
        )
    check_safetensors(weights)


def load_adapter(model, adapter_dir: Path):
    """Base + adapter; a clear error when the adapter was made for another model."""
    from peft import PeftModel

    check_adapter_files(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except RuntimeError as exc:  # size mismatch in load_state_dict
        first = str(exc).splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise ModelError(
            f"the adapter in {adapter_dir} does not fit this base model ({detail[:200]}); "
            "merge with the base it was trained on (model.name_or_path)"
        ) from None


def model_logits(model, examples: list[dict], device: str = "cpu") -> list:
    """Logits (on the CPU, fp32) of ``model`` for each example's input ids."""
    import torch

    out = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]], device=device)
            out.append(model(input_ids=ids).logits.float().cpu())
    return out


def compare_logits(reference: list, candidate: list) -> dict:
    """Max |logit difference| and argmax agreement of two lists of logits for the same ids."""
    max_abs, agree, total = 0.0, 0, 0
    for a, b in zip(reference, candidate):
        max_abs = max(max_abs, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[-2]
    return {"max_abs_logit_diff": max_abs, "argmax_agreement": agree / max(1, total), "tokens": total}
