"""The tiny model's tokenizer is the real Phi-3.5 one: llama.cpp's own test vectors decide."""

from __future__ import annotations

import json

import pytest

from qlora_pipeline.gguf.llamacpp import ensure_llama_cpp, read_vocab_tests


@pytest.fixture(scope="module")
def vocab_tests():
    cases = read_vocab_tests(ensure_llama_cpp())
    assert len(cases) >= 40  # llama.cpp ships 46 for Phi-3
    return cases


def test_hf_tokenizer_reproduces_llama_cpp_vectors(tiny_tokenizer, vocab_tests):
    failures = [
        (text, expected)
        for text, expected in vocab_tests
        if tiny_tokenizer.encode(text, add_special_tokens=False) != expected
    ]
    assert failures == []


def test_sentencepiece_model_reproduces_llama_cpp_vectors(tiny_base, vocab_tests):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    assert sp.vocab_size() == 32000
    failures = [(text, expected) for text, expected in vocab_tests if sp.encode(text) != expected]
    assert failures == []


def test_special_tokens_match_phi35(tiny_tokenizer, tiny_base):
    ids = {
        t: tiny_tokenizer.convert_tokens_to_ids(t)
        for t in ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
    }
    assert ids == {
        "<|endoftext|>": 32000,
        "<|assistant|>": 32001,
        "<|system|>": 32006,
        "<|end|>": 32007,
        "<|user|>": 32010,
    }
    assert len(tiny_tokenizer) == 32064
    assert tiny_tokenizer.bos_token_id == 1 and tiny_tokenizer.eos_token_id == 32000
    assert tiny_tokenizer.pad_token_id not in (None, tiny_tokenizer.eos_token_id)
    generation = json.loads((tiny_base / "generation_config.json").read_text())
    assert 32007 in generation["eos_token_id"]


def test_chat_template_is_the_official_phi35_one(tiny_tokenizer):
    official = ensure_llama_cpp().phi35_chat_template.read_text()
    assert tiny_tokenizer.chat_template == official


def test_model_shape_suits_k_quants(tiny_base):
    config = json.loads((tiny_base / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0
    assert config["vocab_size"] == 32064


def test_tokenizer_files_are_the_hubs_format_and_class(tiny_base):
    """The twin's tokenizer files carry the hub's fields, so AutoTokenizer takes the real repository's path."""
    from transformers import AutoTokenizer

    from qlora_pipeline.phi3_tokenizer import phi35_reference

    config = json.loads((tiny_base / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert (config["pad_token"], config["eos_token"], config["padding_side"]) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "left",
    )
    assert config["model_max_length"] == 131072
    added = {int(i): t for i, t in config["added_tokens_decoder"].items()}
    assert {t["content"]: i for i, t in added.items() if i >= 32000} == phi35_reference()["added_tokens"]
    assert added[32007]["rstrip"] and added[32010]["rstrip"] and not added[32000]["rstrip"]
    assert not added[2]["special"]  # </s> is not special in the hub's file
    # Beside config.json (model_type phi3), transformers 5 overrides the declared class, as for the
    # real repository; the tokenizer files alone give the declared LlamaTokenizer.
    assert type(AutoTokenizer.from_pretrained(str(tiny_base))).__name__ == "TokenizersBackend"


def _tokenizer_files_only(tiny_base, tmp_path):
    import shutil

    from qlora_pipeline.phi3_tokenizer import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        shutil.copy2(tiny_base / name, tmp_path / name)
    return tmp_path


def test_stock_llama_tokenizer_differs_from_llama_cpp_and_the_restored_one_does_not(tiny_base, vocab_tests, tmp_path):
    """From the tokenizer files alone transformers 5 builds a LlamaTokenizer with its own
    pre-tokenizer: text after a special token loses its word-start marker and leading spaces
    tokenize differently from llama.cpp. ``restore_file_pipeline`` gives back tokenizer.json's
    own pipeline, which matches llama.cpp; beside config.json it finds nothing to change."""
    from transformers import AutoTokenizer

    from qlora_pipeline.model import restore_file_pipeline

    folder = _tokenizer_files_only(tiny_base, tmp_path)
    stock = AutoTokenizer.from_pretrained(str(folder))
    assert type(stock).__name__ == "LlamaTokenizer"
    messages = [{"role": "user", "content": "Hello there"}]
    assert stock.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"][1] == 10994
    stock_failures = sum(stock.encode(text, add_special_tokens=False) != ids for text, ids in vocab_tests)
    assert stock_failures > 0
    assert restore_file_pipeline(stock, str(folder)) is True
    assert stock.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"][1] == 15043
    assert all(stock.encode(text, add_special_tokens=False) == ids for text, ids in vocab_tests)
    assert restore_file_pipeline(stock, str(folder)) is False  # already the file's
    assert restore_file_pipeline(AutoTokenizer.from_pretrained(str(tiny_base)), str(tiny_base)) is False


def test_twin_config_keeps_phi35s_fields_and_longrope(tiny_base):
    from qlora_pipeline.phi3_tokenizer import phi35_reference

    real = phi35_reference()["config"]
    config = json.loads((tiny_base / "config.json").read_text())
    for key in (
        "max_position_embeddings",
        "original_max_position_embeddings",
        "sliding_window",
        "rope_theta",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "vocab_size",
        "tie_word_embeddings",
        "rms_norm_eps",
    ):
        assert config[key] == real[key], key
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    rope = config.get("rope_scaling") or config["rope_parameters"]
    assert rope.get("rope_type", rope.get("type")) == "longrope"
    head_pairs = config["hidden_size"] // config["num_attention_heads"] // 2
    for key in ("short_factor", "long_factor"):
        factors = rope[key]
        assert len(factors) == head_pairs
        assert factors[0] == pytest.approx(real["rope_scaling"][key][0])
        assert factors[-1] == pytest.approx(real["rope_scaling"][key][-1])
        assert factors == sorted(factors) and len(set(factors)) > head_pairs // 2  # non-trivial, same shape
    index = json.loads((tiny_base / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    generation = json.loads((tiny_base / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [32007, 32001, 32000] and generation["pad_token_id"] == 32000


def test_resampled_factors_keep_the_curve():
    from qlora_pipeline.tiny import resample_factors

    assert resample_factors([1.0, 2.0, 3.0], 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert resample_factors([1.0, 4.0], 2) == [1.0, 4.0]


def test_llama_cpp_reproduces_its_vectors_on_the_exported_gguf(trained_run, vocab_tests):
    """The GGUF converted from the twin's files tokenizes as llama.cpp's own Phi-3 vocabulary does."""
    from qlora_pipeline.gguf.variants import gguf_path
    from qlora_pipeline.serve.chat import LlamaChat

    with LlamaChat(gguf_path(trained_run, "F16"), n_ctx=256) as chat:
        failures = [
            (text, ids)
            for text, ids in vocab_tests
            if chat.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) != ids
        ]
    assert failures == []
