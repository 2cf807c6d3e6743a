"""The from-scratch versions agree with the libraries they explain."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.course import concepts


def test_lora_layer_equals_peft():
    assert concepts.lora_matches_peft() < 1e-6


def test_merged_weight_equals_the_lora_layer():
    check = concepts.merge_check()
    assert check["max_abs_diff"] < 1e-4


def test_rank_below_the_true_rank_cannot_fit():
    sweep = concepts.toy_rank_sweep(ranks=(2, 4), true_rank=4, steps=300)
    assert sweep[4] < 1e-4 < sweep[2]


def test_nf4_levels_equal_bitsandbytes():
    import bitsandbytes.functional as F

    assert torch.allclose(concepts.nf4_levels(), F.get_4bit_type("nf4", device="cpu"), atol=1e-6)


def test_blockwise_codes_equal_bitsandbytes():
    import bitsandbytes.functional as F

    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    codes, absmax = concepts.quantize_blockwise(weight, concepts.nf4_levels(), 64)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(concepts.unpack_bnb_codes(packed), codes.reshape(-1))
    assert torch.allclose(absmax, state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bits_per_parameter_is_what_bitsandbytes_stores(double_quant):
    """The formula against the bytes bitsandbytes actually keeps: packed codes, the absmax values
    (8-bit with double quantization) and the scales of the scales."""
    import bitsandbytes.functional as F

    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert abs(8 * stored / weight.numel() - concepts.bits_per_parameter(64, double_quant=double_quant)) < 1e-3


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    errors = concepts.quantization_errors(torch.randn(256, 256, generator=torch.Generator().manual_seed(1)))
    assert errors["NF4"] < errors["FP4"] and errors["NF4"] < errors["int4"]
