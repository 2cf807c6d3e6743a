"""Merge a LoRA adapter into a base checkpoint one tensor at a time, never holding the whole model.

peft's ``merge_and_unload`` needs the whole base in memory (7.6 GB in bf16 for Phi-3.5-mini,
plus what loading costs), which is what kills the usual recipe on Colab's free tier. The update
itself is simple: each adapted weight W becomes W + s·B·A with s = alpha/r (alpha/√r with
rsLoRA). peft has no shard-wise merge, so this module does that arithmetic by hand: for each
tensor of each shard, read it, add the update to the adapted weights (computed in fp32, stored
in the shard's dtype), append it to the output shard, free it. A test checks the result equals
peft's ``merge_and_unload`` on the tiny model.

The safetensors files are read and written here with plain file I/O rather than the
safetensors package: its ``save_file`` serializes a whole shard in memory (a second copy of
it) and ``safe_open`` maps the input, whose touched pages stay in the process's memory. The
format is simple (an 8-byte header length, a JSON header of dtypes, shapes and offsets, then
the raw bytes) and the files written are read back by safetensors in the tests.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from qlora_pipeline.errors import ModelError

CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


def read_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    """The adapter's config and its LoRA pairs keyed by the base weight's name: {name: (A, B)}."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ModelError(
            f"{adapter_dir} is a DoRA adapter; the streaming merge handles plain LoRA only (set merge.streaming=false)"
        )
    if config.get("fan_in_fan_out"):
        raise ModelError(f"{adapter_dir} uses fan_in_fan_out (Conv1D layers); set merge.streaming=false")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                base_name = key[: -len(marker)].removeprefix("base_model.model.") + ".weight"
                pairs.setdefault(base_name, {})[part] = tensor
                break
        else:
            raise ModelError(
                f"{adapter_dir} holds {key!r}, which is not a LoRA A/B matrix (modules_to_save?); "
                "set merge.streaming=false to merge it with peft"
            )
    incomplete = [name for name, pair in pairs.items() if len(pair) != 2]
    if incomplete:
        raise ModelError(f"{adapter_dir} lacks A or B for {incomplete[0]}; the adapter file is damaged")
    return config, {name: (pair["lora_A"], pair["lora_B"]) for name, pair in pairs.items()}


def lora_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def shard_files(base_dir: Path) -> list[str]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ModelError(
        f"{base_dir} has no safetensors weights (model.safetensors or an index); the streaming "
        "merge reads safetensors checkpoints only"
    )


DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets) and where the data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return header, 8 + size


def _read_tensor(f, info: dict, data_start: int):
    import torch

    begin, end = info["data_offsets"]
    f.seek(data_start + begin)
    buffer = bytearray(end - begin)
    f.readinto(buffer)
    dtype = getattr(torch, DTYPES[info["dtype"]])
    return (
        torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])
        if buffer
        else torch.empty(info["shape"], dtype=dtype)
    )


def _tensor_bytes(tensor) -> memoryview:
    import torch

    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def stream_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype=None, log=print) -> dict:
    """Write base + adapter into ``out_dir``: the base's shards and names; its dtypes, or ``dtype``."""
    import torch
    from tqdm.auto import tqdm

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config, pairs = read_adapter(adapter_dir)
    scale = lora_scale(config)
    files = shard_files(base_dir)
    out_dtype_name = {v: k for k, v in DTYPES.items()}.get(str(dtype).replace("torch.", "")) if dtype else None
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = 0
    with tqdm(total=len(files), desc="merging shards", unit="shard") as progress:
        for file in files:
            header, data_start = read_header(base_dir / file)
            metadata = header.pop("__metadata__", None)
            names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
            # The output header first: same names and shapes; sizes follow the output dtype.
            out_header: dict = {"__metadata__": metadata} if metadata else {}
            offset = 0
            for name in names:
                info = header[name]
                is_float = info["dtype"] in ("F32", "F16", "BF16", "F64")
                out_name = out_dtype_name if out_dtype_name and is_float else info["dtype"]
                itemsize = torch.empty(0, dtype=getattr(torch, DTYPES[out_name])).element_size()
                nbytes = math.prod(info["shape"]) * itemsize
                out_header[name] = {
                    "dtype": out_name,
                    "shape": info["shape"],
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            header_bytes = json.dumps(out_header, separators=(",", ":")).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes
            with open(base_dir / file, "rb") as src, open(out_dir / file, "wb") as dst:
                dst.write(len(header_bytes).to_bytes(8, "little"))
                dst.write(header_bytes)
                for name in names:
                    weight = _read_tensor(src, header[name], data_start)
                    target = getattr(torch, DTYPES[out_header[name]["dtype"]])
                    if name in pairs:
                        lora_a, lora_b = pairs[name]
                        if (lora_b.shape[0], lora_a.shape[1]) != tuple(weight.shape):
                            raise ModelError(
                                f"the adapter's {name} is {lora_b.shape[0]}x{lora_a.shape[1]} but the "
                                f"base's is {tuple(weight.shape)}; merge with the base it was trained on"
                            )
                        weight = weight.float().add_((lora_b.float() @ lora_a.float()).mul_(scale))
                        merged += 1
                    dst.write(_tensor_bytes(weight.to(target)))
                    del weight
            progress.update(1)
    if merged != len(pairs):
        raise ModelError(
            f"{len(pairs) - merged} adapted weights of {adapter_dir} are not in {base_dir}; "
            "merge with the base it was trained on"
        )
    if (base_dir / "model.safetensors.index.json").is_file():
        shutil.copy2(base_dir / "model.safetensors.index.json", out_dir / "model.safetensors.index.json")
    for name in CONFIG_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    if dtype is not None:  # the config says what the weights are stored in
        model_config = json.loads((out_dir / "config.json").read_text())
        model_config["dtype"] = str(dtype).replace("torch.", "")
        model_config.pop("torch_dtype", None)
        (out_dir / "config.json").write_text(json.dumps(model_config, indent=2))
    log(f"streaming merge: {merged} weights updated (scale {scale:g}) across {len(files)} shard(s)")
    return {"merged_weights": merged, "shards": len(files), "scale": scale}
