"""The tiny model's tokenizer is the real Phi-3.5 one: llama.cpp's own test vectors decide."""

from __future__ import annotations

import json

import pytest

from qlora_pipeline.llamacpp import ensure_llama_cpp, read_vocab_tests


@pytest.fixture(scope="module")
def vocab_tests():
    cases = read_vocab_tests(ensure_llama_cpp())
    assert len(cases) >= 40  # llama.cpp ships 46 for Phi-3
    return cases


def test_hf_tokenizer_reproduces_llama_cpp_vectors(tiny_tokenizer, vocab_tests):
    failures = [(text, expected) for text, expected in vocab_tests
                if tiny_tokenizer.encode(text, add_special_tokens=False) != expected]
    assert failures == []


def test_sentencepiece_model_reproduces_llama_cpp_vectors(tiny_base, vocab_tests):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    assert sp.vocab_size() == 32000
    failures = [(text, expected) for text, expected in vocab_tests if sp.encode(text) != expected]
    assert failures == []


def test_special_tokens_match_phi35(tiny_tokenizer, tiny_base):
    ids = {t: tiny_tokenizer.convert_tokens_to_ids(t)
           for t in ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")}
    assert ids == {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007,
                   "<|user|>": 32010}
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
