"""The offline rehearsal hub: the twin and the oasst1 sample resolve by their hub ids, offline,
through the real ``from_pretrained`` and ``load_dataset`` code paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_pipeline.hub_twin import DATASET_ID, MODEL_ID, build_hub_twin, oasst1_features


@pytest.fixture(scope="module")
def twin_hub(tmp_path_factory, test_config) -> Path:
    return build_hub_twin(tmp_path_factory.mktemp("hub") / "hf-home", test_config.tiny, log=lambda *a: None)


def run_offline(hub: Path, code: str) -> dict:
    """Run ``code`` in a fresh interpreter with HF_HOME=hub and the hub offline; it prints one JSON."""
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=hub.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_layout_is_the_hub_cache(twin_hub):
    model = twin_hub / "hub" / "models--microsoft--Phi-3.5-mini-instruct"
    commit = (model / "refs" / "main").read_text()
    snapshot = model / "snapshots" / commit
    names = {p.name for p in snapshot.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    } <= names
    assert all((snapshot / n).is_symlink() and (snapshot / n).resolve().parent.name == "blobs" for n in names)
    data = twin_hub / "hub" / "datasets--OpenAssistant--oasst1" / "snapshots"
    files = sorted(str(p.relative_to(next(data.iterdir()))) for p in next(data.iterdir()).rglob("*.parquet"))
    assert files == ["data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet"]


def test_a_second_build_finds_it_up_to_date(twin_hub, test_config):
    said = []
    build_hub_twin(twin_hub, test_config.tiny, log=said.append)
    assert said == [f"twin hub: {twin_hub} is up to date"]


def test_model_and_tokenizer_resolve_by_hub_id_offline(twin_hub):
    result = run_offline(
        twin_hub,
        f"""
import json
from transformers import AutoModelForCausalLM
from qlora_pipeline.model import load_tokenizer
tokenizer = load_tokenizer("{MODEL_ID}")
model = AutoModelForCausalLM.from_pretrained("{MODEL_ID}")
rope = model.config.rope_parameters
print(json.dumps({{"path": model.config._name_or_path, "dtype": str(model.dtype), "rope": rope["rope_type"],
                  "tokenizer": type(tokenizer).__name__, "hello": tokenizer("Hello", add_special_tokens=False)["input_ids"],
                  "generation_eos": model.generation_config.eos_token_id}}))
""",
    )
    assert result["path"] == MODEL_ID and result["dtype"] == "torch.bfloat16" and result["rope"] == "longrope"
    assert result["tokenizer"] == "TokenizersBackend" and result["hello"] == [15043]  # as for the real id
    assert result["generation_eos"] == [32007, 32001, 32000]


def test_dataset_resolves_with_the_cards_features(twin_hub):
    result = run_offline(
        twin_hub,
        f"""
import json
from datasets import load_dataset
d = load_dataset("{DATASET_ID}")
ranks = d["train"]["rank"]
print(json.dumps({{"splits": {{k: v.num_rows for k, v in d.items()}}, "features": d["train"].features.to_dict(),
                  "null_ranks": sum(r is None for r in ranks), "ranks": sorted({{r for r in ranks if r is not None}})}}))
""",
    )
    assert set(result["splits"]) == {"train", "validation"} and result["splits"]["validation"] > 0
    assert result["features"] == oasst1_features().to_dict()
    assert result["features"]["rank"] == {"dtype": "int32", "_type": "Value"}
    assert result["null_ranks"] > 0 and result["ranks"][0] == 0


def test_prepare_through_the_hub_halves_validation_into_val_and_test(twin_hub, tmp_path):
    result = run_offline(
        twin_hub,
        f"""
import json
from qlora_pipeline.config import load_config
from qlora_pipeline.prepare import prepare
stats = prepare(load_config("phi35-colab-t4").data, "{tmp_path}/run")
print(json.dumps(stats))
""",
    )
    assert result["source"] == "hub"
    assert min(result["conversations"].values()) > 0
    trees = {
        split: {json.loads(line)["tree_id"] for line in (tmp_path / "run" / "data" / f"{split}.jsonl").open()}
        for split in ("train", "val", "test")
    }
    assert (
        not (trees["train"] & trees["val"])
        and not (trees["train"] & trees["test"])
        and not (trees["val"] & trees["test"])
    )


def test_nf4_notebook_reads_layer_0_of_a_hub_id_from_the_one_shard_that_holds_it(twin_hub):
    """notebooks/nf4_from_scratch.ipynb on a phi35 preset: the base is a Hub id, not a folder
    (it globbed the id as a path); the weight equals the one from_pretrained loads."""
    result = run_offline(
        twin_hub,
        f"""
import json
from transformers import AutoModelForCausalLM
from qlora_pipeline.course.concepts import first_layer_qkv
name, weight = first_layer_qkv("{MODEL_ID}")
model = AutoModelForCausalLM.from_pretrained("{MODEL_ID}")
same = bool((model.get_parameter(name).float() == weight).all())
print(json.dumps({{"name": name, "shape": list(weight.shape), "same": same}}))
""",
    )
    assert result["name"] == "model.layers.0.self_attn.qkv_proj.weight" and result["same"]
