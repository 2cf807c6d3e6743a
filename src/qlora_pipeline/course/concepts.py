"""From-scratch versions of the ideas the course teaches, small enough to read in a notebook.

    from qlora_pipeline.course.concepts import LoRALinear, nf4_levels, quantize_blockwise

These are for understanding, not for training: the pipeline itself uses peft and bitsandbytes.
Each one is checked against the library it explains (tests/test_concepts.py), so the notebooks
that show them (``notebooks/lora_from_scratch.ipynb``, ``notebooks/nf4_from_scratch.ipynb``)
cannot drift into teaching something the libraries do not do.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

# ---------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * x A^T B^T, with W frozen and only A (r x in), B (out x r) trained.

    B starts at zero, so at step 0 the layer computes exactly what the frozen layer did.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft's default initialisation of A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/r) B A: one matrix, so the merged layer costs exactly what the base did."""
        return self.base.weight + self.scale * (self.B @ self.A)


def toy_rank_sweep(
    ranks=(1, 2, 4, 8, 16),
    true_rank: int = 4,
    dim: int = 64,
    steps: int = 300,
    alpha_over_r: float = 2.0,
    seed: int = 0,
) -> dict[int, float]:
    """Fit LoRA adapters of several ranks to a weight change of rank ``true_rank``; final MSE per rank.

    Below the true rank the adapter cannot express the change; at or above it the error falls
    to (near) zero: the rank is a capacity knob, alpha/r the step-size scale.
    """
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(dim, dim, generator=gen) / math.sqrt(dim))
    delta = (torch.randn(dim, true_rank, generator=gen) @ torch.randn(true_rank, dim, generator=gen)) / dim
    x = torch.randn(512, dim, generator=gen)
    with torch.no_grad():
        target = x @ (base.weight + delta).T
    results = {}
    for r in ranks:
        torch.manual_seed(seed)
        layer = LoRALinear(base, r=r, alpha=alpha_over_r * r)
        opt = torch.optim.Adam([layer.A, layer.B], lr=1e-2)
        for _ in range(steps):
            loss = ((layer(x) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            results[r] = float(((layer(x) - target) ** 2).mean())
    return results


# ---------------------------------------------------------------------------- NF4


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels of the QLoRA paper, built from quantiles of N(0, 1).

    8 levels for the positive half and 7 for the negative half (so that 0 is exactly
    representable), each at evenly spaced quantiles, then scaled into [-1, 1]. The ``offset``
    0.9677 is the paper's choice: the mean of the quantiles 1 - 1/(2*15) and 1 - 1/(2*16).
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


def fp4_levels() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) levels, scaled into [-1, 1]."""
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    levels = torch.cat([magnitudes, -magnitudes]).unique().sort().values
    return levels / levels.abs().max()


def int4_levels() -> torch.Tensor:
    """Symmetric 4-bit integers -7..7, scaled into [-1, 1] (absmax quantization)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def quantize_blockwise(weight: torch.Tensor, levels: torch.Tensor, blocksize: int = 64):
    """Block-wise absmax quantization: each block of ``blocksize`` values is scaled by its largest
    magnitude, then every value is rounded to the nearest level. Returns (codes, absmax)."""
    flat = weight.reshape(-1, blocksize).float()
    absmax = flat.abs().max(dim=1, keepdim=True).values.clamp_min(1e-12)
    scaled = flat / absmax
    codes = (scaled.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(torch.uint8)
    return codes, absmax.squeeze(1)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, shape) -> torch.Tensor:
    return (levels[codes.long()] * absmax.unsqueeze(1)).reshape(shape)


def unpack_bnb_codes(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes stores two 4-bit codes per byte, the first in the high nibble."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage cost of 4-bit block-wise quantization, scales included.

    Without double quantization each block of 64 carries a 32-bit absmax: 4 + 32/64 = 4.5 bits.
    Double quantization stores those absmax values in 8 bits, with one 32-bit scale per 256 of
    them: 4 + 8/64 + 32/(64*256) = 4.127 bits.
    """
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


def lora_matches_peft(seed: int = 0, r: int = 4, alpha: float = 8.0) -> float:
    """Max |difference| between LoRALinear and peft's LoRA on the same weights (both adapters non-zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(64, 32))
    ours = LoRALinear(nn.Linear(64, 32), r=r, alpha=alpha)
    ours.base.load_state_dict(net.proj.state_dict())
    with torch.no_grad():
        ours.B.normal_()  # B starts at zero; make the update visible
    wrapped = get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
    layer = wrapped.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.A)
        layer.lora_B["default"].weight.copy_(ours.B)
    x = torch.randn(16, 64)
    with torch.no_grad():
        return float((ours(x) - wrapped(x)).abs().max())


def merge_check(seed: int = 0, r: int = 8, alpha: float = 16.0) -> dict:
    """Merged layer vs LoRA layer: max |output difference| and the time of each forward pass."""
    import time

    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(1024, 1024, bias=False), r=r, alpha=alpha)
    with torch.no_grad():
        layer.B.normal_(std=0.02)
    merged = nn.Linear(1024, 1024, bias=False)
    with torch.no_grad():
        merged.weight.copy_(layer.merged_weight())
    x = torch.randn(256, 1024)

    def timed(fn) -> float:
        fn(x)
        started = time.perf_counter()
        for _ in range(20):
            fn(x)
        return (time.perf_counter() - started) / 20

    with torch.no_grad():
        diff = float((layer(x) - merged(x)).abs().max())
        return {"max_abs_diff": diff, "lora_seconds": timed(layer), "merged_seconds": timed(merged)}


def quantization_errors(weight: torch.Tensor, blocksize: int = 64) -> dict[str, float]:
    """Mean |error| of NF4, FP4 and int4 block-wise quantization of the same weights."""
    errors = {}
    for name, levels in (("NF4", nf4_levels()), ("FP4", fp4_levels()), ("int4", int4_levels())):
        codes, absmax = quantize_blockwise(weight, levels, blocksize)
        restored = dequantize_blockwise(codes, absmax, levels, weight.shape)
        errors[name] = float((restored - weight.float()).abs().mean())
    return errors


QKV_0 = "layers.0.self_attn.qkv_proj.weight"


def first_layer_qkv(base: str) -> tuple[str, torch.Tensor]:
    """Layer 0's fused attention weight of a base model (a saved folder or a Hub id), as fp32.

    A Hub id is not a folder: its safetensors index names the shard that holds the tensor, and only
    that shard is downloaded (huggingface_hub's cache), not the whole 7.6 GB model."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(base)
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        shards = (
            [index.parent / s for s in json.loads(index.read_text())["weight_map"].values()] if index.is_file() else []
        )
        shards = shards or sorted(folder.glob("*.safetensors"))
    else:
        from huggingface_hub import hf_hub_download

        weight_map = json.loads(Path(hf_hub_download(base, "model.safetensors.index.json")).read_text())["weight_map"]
        shard = next(file for name, file in weight_map.items() if name.endswith(QKV_0))
        shards = [Path(hf_hub_download(base, shard))]
    for shard in dict.fromkeys(shards):
        with safe_open(str(shard), framework="pt") as f:
            name = next((k for k in f.keys() if k.endswith(QKV_0)), None)
            if name:
                return name, f.get_tensor(name).float()
    raise ValueError(f"{base} has no tensor ending in {QKV_0}: not a Phi-3 model")


# ---------------------------------------------------------------------------- preference_from_ranks


def dpo_batch(cfg, pair: dict, policy_adapter: Path, reference_adapter: Path):
    """(model, trainer, batch) for one preference pair: TRL's DPOTrainer built as the prefer stage
    builds it (``prefer.dpo_trainer``), its policy (the "default" adapter) loaded from
    ``policy_adapter`` and its reference (the "ref" adapter TRL adds) from ``reference_adapter``,
    and TRL's collated batch of the pair (row 0: prompt + chosen, row 1: prompt + rejected)."""
    import tempfile

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.model import load_tokenizer, pick_device
    from qlora_pipeline.pairs import encode_pairs
    from qlora_pipeline.prefer import dpo_trainer, policy_model

    base = resolve_base(cfg)
    tokenizer = load_tokenizer(base, cfg.model.revision)
    device = pick_device(cfg.model.compute_dtype, cfg.train.mixed_precision)
    [example], _ = encode_pairs(ChatEncoder.from_hf(tokenizer), [pair], max_len=1 << 20)
    model = policy_model(cfg, base, Path(policy_adapter), device)
    scratch = Path(tempfile.mkdtemp(prefix="dpo-batch-"))  # the trainer's output folder: nothing is saved
    trainer = dpo_trainer(cfg, scratch, model, tokenizer, {"train": [example], "val": [example]}, device)
    reference = load_file(str(Path(reference_adapter) / "adapter_model.safetensors"))
    set_peft_model_state_dict(trainer.model, reference, adapter_name="ref")
    batch = {k: v.to(device.name) for k, v in trainer.data_collator([example]).items()}
    return trainer.model, trainer, batch
