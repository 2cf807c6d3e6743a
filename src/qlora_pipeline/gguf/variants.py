"""GGUF variants: file types by name, the importance-matrix suffix, per-tensor overrides, sizes.

from qlora_pipeline.gguf.variants import F16, gguf_path, split_variant
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.errors import ConfigError
from qlora_pipeline.layout import RunLayout

F16 = "F16"


def gguf_path(run_dir: Path, quant: str) -> Path:
    return RunLayout(run_dir).gguf(quant)


def quant_types() -> dict[str, int]:
    """Every file type llama.cpp can quantize to, by its usual name (Q4_K_M, Q8_0, F16, ...)."""
    import llama_cpp

    types = {
        name[len("LLAMA_FTYPE_MOSTLY_") :]: getattr(llama_cpp, name)
        for name in dir(llama_cpp)
        if name.startswith("LLAMA_FTYPE_MOSTLY_")
    }
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


IMATRIX_SUFFIX = "-imat"
# File types that llama.cpp refuses to quantize without an importance matrix: those with tensors
# of the types src/llama-quant.cpp's tensor_requires_imatrix names (IQ1/IQ2 types, IQ3_XXS, and
# Q2_K inside Q2_K_S); IQ3_XS mixes in IQ3_XXS tensors. tests/test_imatrix.py checks this list
# against llama.cpp itself.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})


def split_variant(variant: str) -> tuple[str, bool]:
    """``"Q4_K_M-imat"`` -> ``("Q4_K_M", True)``: the llama.cpp file type, and whether the run's
    importance matrix weighs the quantization."""
    if variant.endswith(IMATRIX_SUFFIX):
        return variant[: -len(IMATRIX_SUFFIX)], True
    return variant, False


def check_quant_types(names: tuple[str, ...]) -> None:
    valid = quant_types()
    unknown = [n for n in names if split_variant(n)[0] not in valid]
    if unknown:
        raise ConfigError(
            f"unknown quantization type {', '.join(unknown)}; llama.cpp knows {', '.join(sorted(valid))} "
            f"(add {IMATRIX_SUFFIX} to quantize with the run's importance matrix)"
        )
    for name in names:
        quant, with_matrix = split_variant(name)
        if quant in NEEDS_IMATRIX and not with_matrix:
            raise ConfigError(
                f"export.quant_types: {quant} needs an importance matrix; write {quant}{IMATRIX_SUFFIX} instead"
            )
        if with_matrix and quant in (F16, "F32", "BF16"):
            raise ConfigError(f"export.quant_types: {name} is not quantized, so no importance matrix applies")


def ggml_type(name: str, key: str) -> int:
    """A tensor type's number (``Q6_K`` -> 14), from gguf-py's list of llama.cpp's types."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType[name.upper()].value
    except KeyError:
        known = ", ".join(t.name for t in GGMLQuantizationType)
        raise ConfigError(f"{key}: unknown tensor type {name!r}; llama.cpp knows {known}") from None


@dataclass(frozen=True)
class TensorTypes:
    """The export config's per-tensor type choices, as llama.cpp's quantize parameters take them."""

    output: int | None = None
    token_embedding: int | None = None
    patterns: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_config(cls, ecfg) -> TensorTypes:
        import re

        patterns = []
        for rule in ecfg.tensor_types:
            pattern, _, name = rule.rpartition("=")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"export.tensor_types: {pattern!r} is not a regular expression ({exc})") from None
            patterns.append((pattern, ggml_type(name, "export.tensor_types")))
        return cls(
            output=ggml_type(ecfg.output_type, "export.output_type") if ecfg.output_type else None,
            token_embedding=(
                ggml_type(ecfg.token_embedding_type, "export.token_embedding_type")
                if ecfg.token_embedding_type
                else None
            ),
            patterns=tuple(patterns),
        )

    def describe(self) -> dict:
        return {"output": self.output, "token_embedding": self.token_embedding, "patterns": list(self.patterns)}


# Nominal bits per weight of llama.cpp's common types (its quantize tool's table, rounded down):
# a first guess for the free-space check. A file that turns out bigger and fills the disk is
# still caught when the write fails.
BITS_PER_WEIGHT = {
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "Q8_0": 8.5,
    "Q6_K": 6.5,
    "Q5_K_M": 5.6,
    "Q5_K_S": 5.5,
    "Q5_1": 6,
    "Q5_0": 5.5,
    "Q4_K_M": 4.8,
    "Q4_K_S": 4.5,
    "Q4_1": 5,
    "Q4_0": 4.5,
    "Q3_K_L": 4.2,
    "Q3_K_M": 3.9,
    "Q3_K_S": 3.4,
    "Q2_K": 2.9,
}


def gguf_size_estimate(weights: int, quant: str) -> int:
    return int(weights * BITS_PER_WEIGHT.get(quant, 4) / 8)
