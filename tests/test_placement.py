"""Where the heavy transformers work runs: the GPU when there is one (torch monkeypatched here),
and a parity reference that is really fp32 without a fp32 copy of the model."""

from __future__ import annotations

import pytest


class Chosen(Exception):
    """Raised by a stand-in loader to report where the model was asked to go."""


def _cuda_present(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


@pytest.mark.parametrize(
    "cuda, stored, expected",
    [
        (True, "float16", ("cuda", "float16")),  # a T4: the 16-bit model on the GPU
        (False, "float16", ("cpu", "float32")),  # fp16 matmuls on a CPU are several times slower
        (False, "bfloat16", ("cpu", "bfloat16")),
        (False, "float32", ("cpu", "float32")),
    ],
)
def test_eval_placement_prefers_cuda_and_avoids_fp16_on_a_cpu(monkeypatch, cuda, stored, expected):
    import torch

    from qlora_pipeline.model import eval_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    device, dtype = eval_placement(getattr(torch, stored))
    assert (device, str(dtype).replace("torch.", "")) == expected


def test_hf_evaluation_loads_its_models_on_cuda_when_available(trained_run, test_config, monkeypatch):
    import qlora_pipeline.model as model_module
    from qlora_pipeline.evaluate import evaluate_hf

    _cuda_present(monkeypatch)

    def loader(base, mcfg, dtype=None, device="cpu"):
        raise Chosen(device, str(dtype))

    monkeypatch.setattr(model_module, "load_base_full_precision", loader)
    with pytest.raises(Chosen) as chosen:
        evaluate_hf(test_config, trained_run, log=lambda *a: None)
    assert chosen.value.args == ("cuda", "torch.float32")  # the tiny preset merges in fp32


def test_parity_reference_loads_on_cuda_when_available(trained_run, test_config, monkeypatch):
    import qlora_pipeline.model as model_module
    from qlora_pipeline.evaluation.parity import _hf_reference

    _cuda_present(monkeypatch)
    monkeypatch.setattr(
        model_module,
        "load_base_full_precision",
        lambda base, mcfg, dtype=None, device="cpu": (_ for _ in ()).throw(Chosen(device)),
    )
    with pytest.raises(Chosen) as chosen:
        _hf_reference(trained_run, test_config, [[1, 2, 3]], round_to_fp16=True)
    assert chosen.value.args == ("cuda",)


@pytest.mark.parametrize("free_gb, expected", [(14.0, "cuda"), (0.001, "cpu")])
def test_merge_runs_on_the_gpu_when_the_base_fits_its_free_memory(
    tiny_base, test_config, monkeypatch, free_gb, expected
):
    import torch

    from qlora_pipeline.merge import merge_device, use_streaming

    _cuda_present(monkeypatch)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gb * 1e9), int(15e9)))
    device = merge_device(test_config, str(tiny_base), log=lambda *a: None)
    assert device == expected
    if device == "cuda":  # the weights go to the GPU: nothing to stream through the RAM
        assert use_streaming(test_config, str(tiny_base), log=lambda *a: None, device=device) is False


@pytest.fixture(scope="module")
def merged_fp16(trained_run, tmp_path_factory):
    """The merged test model saved in fp16, as the Colab preset saves Phi-3.5."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("merged16")
    model = AutoModelForCausalLM.from_pretrained(trained_run / "merged", dtype=torch.float16)
    model.save_pretrained(out)
    return out


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


def test_layerwise_fp32_equals_a_fp32_copy_and_keeps_the_model_16_bit(merged_fp16, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.evaluation.fp32_reference import layerwise_fp32

    ids = tiny_tokenizer("The capital of France is Paris, and the sky is blue.")["input_ids"]
    fp32_copy = AutoModelForCausalLM.from_pretrained(merged_fp16, dtype=torch.float32).eval()
    expected = _logits(fp32_copy, ids)
    model16 = AutoModelForCausalLM.from_pretrained(merged_fp16, dtype=torch.float16).eval()
    fp16_compute = _logits(model16, ids)
    with layerwise_fp32(model16):
        widened = _logits(model16, ids)
        # Inside the block only the current layer is widened: the stored layers stay 16-bit.
        assert all(p.dtype == torch.float16 for p in model16.model.layers.parameters())
    assert {p.dtype for p in model16.parameters()} == {torch.float16}
    assert torch.allclose(widened, expected, atol=1e-5, rtol=0)
    # ...and it is not what fp16 arithmetic gives (else the check above would prove nothing).
    assert float((fp16_compute - expected).abs().max()) > 100 * float((widened - expected).abs().max())


def test_layerwise_fp32_rounds_only_matrices_for_the_f16_reference(trained_run, tiny_tokenizer):
    """The F16 GGUF stores matrices in F16 and norms in F32: the reference rounds the same ones."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.evaluation.fp32_reference import layerwise_fp32

    ids = tiny_tokenizer("What is the opposite of hot?")["input_ids"]
    rounded_copy = AutoModelForCausalLM.from_pretrained(trained_run / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        for param in rounded_copy.parameters():
            if param.dim() >= 2:
                param.copy_(param.half().float())
    model = AutoModelForCausalLM.from_pretrained(trained_run / "merged", dtype=torch.float32).eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with layerwise_fp32(model, round_to_fp16=True):
        widened = _logits(model, ids)
    assert torch.equal(widened, _logits(rounded_copy, ids))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored, unrounded


@pytest.mark.parametrize("cuda, gpu_build, expected", [(True, True, -1), (True, False, 0), (False, True, 0)])
def test_gguf_layers_go_to_the_gpu_only_with_a_gpu_build_and_a_gpu(monkeypatch, cuda, gpu_build, expected):
    import llama_cpp
    import torch

    from qlora_pipeline.evaluation.scoring import gguf_gpu_layers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: gpu_build)
    assert gguf_gpu_layers(-1) == expected
    assert gguf_gpu_layers(0) == 0  # the operator turned it off
