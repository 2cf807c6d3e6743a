"""fp32 logits of a 16-bit model without a fp32 copy of it: the parity reference on Colab.

The GGUF parity check compares llama.cpp's logits with transformers' computed in fp32. A fp32
copy of Phi-3.5-mini is 15.3 GB: more than Colab's 12.7 GB of RAM and its T4's 15 GB. But the
merged weights are 16-bit, so each one is exactly representable in fp32: holding the model at
16 bits and widening one decoder layer at a time, just before it runs, computes exactly what a
fp32 copy computes, at the memory of the 16-bit model plus one fp32 layer. Neither transformers
nor accelerate widens weights per layer (accelerate's hooks move them between devices, not
dtypes), so these few hooks are written here; a test checks the logits equal a fp32 copy's.
"""

from __future__ import annotations

from contextlib import contextmanager


def widen(tensor, round_to_fp16: bool):
    """The fp32 value of a stored weight; matrices first rounded to fp16 when the F16 GGUF is the
    target (llama.cpp's converter stores matrices in F16 and keeps vectors, the norms, in F32)."""
    import torch

    if round_to_fp16 and tensor.dim() >= 2:
        tensor = tensor.to(torch.float16)
    return tensor.to(torch.float32)


def _layer_hooks(layer, round_to_fp16: bool) -> list:
    """Widen ``layer``'s weights for its forward, then put the stored 16-bit tensors back."""
    stored: dict = {}

    def before(module, args):
        for name, param in module.named_parameters():
            stored[name] = param.data
            param.data = widen(param.data, round_to_fp16)

    def after(module, args, output):
        for name, param in module.named_parameters():
            param.data = stored.pop(name)  # the original tensor, not a round trip through fp32

    return [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]


def _fp32_rotary(model) -> None:
    """Rotary frequencies in fp32 (rebuilt from the config if loading left them in 16 bits)."""
    import torch

    rotary = model.model.rotary_emb
    if any(buf.dtype != torch.float32 for buf in rotary.buffers()):
        device = next(rotary.buffers()).device
        model.model.rotary_emb = type(rotary)(config=model.config).to(device)


@contextmanager
def layerwise_fp32(model, round_to_fp16: bool = False):
    """Within the block, ``model`` computes in fp32 while its decoder layers stay stored at 16 bits.

    Everything outside the decoder layers (embeddings, final norm, output layer: about 0.4 GB
    of Phi-3.5's 7.6 GB) is widened for the whole block."""
    layers = model.model.layers
    in_layers = {id(p) for p in layers.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_layers]
    kept = [p.data for p in outside]
    hooks = [hook for layer in layers for hook in _layer_hooks(layer, round_to_fp16)]
    try:
        for param in outside:
            param.data = widen(param.data, round_to_fp16)
        _fp32_rotary(model)
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for param, data in zip(outside, kept):
            param.data = data
