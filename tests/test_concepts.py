"""The from-scratch versions agree with the libraries they explain."""

from __future__ import annotations

import torch

from qlora_pipeline import concepts


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


def test_double_quantization_bits():
    assert concepts.bits_per_parameter(64) == 4.5
    assert abs(concepts.bits_per_parameter(64, double_quant=True) - 4.127) < 1e-3


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    errors = concepts.quantization_errors(torch.randn(256, 256, generator=torch.Generator().manual_seed(1)))
    assert errors["NF4"] < errors["FP4"] and errors["NF4"] < errors["int4"]
