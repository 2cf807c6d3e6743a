"""Property tests (Hypothesis) of what users type and what other programs read back:

- export's quantization type names and per-tensor ``PATTERN=TYPE`` overrides;
- ``key=value`` config overrides;
- the Ollama Modelfile our export writes, for any sampling settings and system prompt, as Ollama's
  parser reads it (tests/helpers/ollama_modelfile.py);
- the Space's environment variables.

Each either comes back exactly as given or is refused with one line that names the setting.
"""

from __future__ import annotations

import argparse
import re
import string
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qlora_pipeline.config import all_keys, load_config
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.gguf import modelfile
from qlora_pipeline.gguf.variants import (
    IMATRIX_SUFFIX,
    NEEDS_IMATRIX,
    TensorTypes,
    check_quant_types,
    quant_types,
)
from qlora_pipeline.serve.chat import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import ollama_modelfile  # noqa: E402

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
QUANTS = sorted(quant_types())
UNQUANTIZED = {"F16", "F32", "BF16"}


def one_line_naming(exc: Exception, name: str) -> None:
    text = str(exc)
    assert "\n" not in text and name in text, text


# --- quantization type names and tensor-type overrides -------------------------------------------


@SETTINGS
@given(
    names=st.lists(
        st.one_of(
            st.sampled_from(QUANTS),
            st.sampled_from(QUANTS).map(lambda q: q + IMATRIX_SUFFIX),
            st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_quant_type_names_are_accepted_exactly_when_llama_cpp_can_make_them(names):
    def makeable(name: str) -> bool:
        with_matrix = name.endswith("-imat")
        quant = name[: -len("-imat")] if with_matrix else name
        if quant not in QUANTS:
            return False
        return (with_matrix or quant not in NEEDS_IMATRIX) and not (with_matrix and quant in UNQUANTIZED)

    if all(makeable(n) for n in names):
        check_quant_types(tuple(names))
    else:
        with pytest.raises(ConfigError) as refused:
            check_quant_types(tuple(names))
        assert "\n" not in str(refused.value)
        assert any(n in str(refused.value) for n in names if not makeable(n))


TYPE_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]


@SETTINGS
@given(
    rules=st.lists(st.tuples(st.text(min_size=1, max_size=20), st.sampled_from(TYPE_NAMES), st.booleans()), max_size=4)
)
def test_tensor_type_overrides_keep_their_pattern_and_type_or_name_the_bad_rule(rules):
    from gguf import GGMLQuantizationType

    from qlora_pipeline.config import ExportConfig

    typed = [f"{pattern}={name.lower() if lower else name}" for pattern, name, lower in rules]
    try:
        ecfg = ExportConfig(tensor_types=tuple(typed))
        types = TensorTypes.from_config(ecfg)
    except ConfigError as exc:
        one_line_naming(exc, "export.tensor_types")
        bad = [p for p, _, _ in rules if not _compiles(p)]
        assert bad, f"refused valid rules {typed}: {exc}"
        return
    assert [p for p, _ in types.patterns] == [p for p, _, _ in rules]
    assert [t for _, t in types.patterns] == [GGMLQuantizationType[name].value for _, name, _ in rules]


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


@SETTINGS
@given(st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=10))
def test_an_unknown_tensor_type_is_refused_naming_it(name):
    from gguf import GGMLQuantizationType

    from qlora_pipeline.config import ExportConfig

    assume(name.upper() not in GGMLQuantizationType.__members__)
    with pytest.raises(ConfigError) as refused:
        TensorTypes.from_config(ExportConfig(tensor_types=(f"ffn_down={name}",)))
    one_line_naming(refused.value, repr(name))


# --- key=value overrides -------------------------------------------------------------------------

INT_KEYS = ["train.max_steps", "train.eval_every", "train.checkpoint_every", "data.max_seq_len", "lora.r"]
FLOAT_KEYS = ["train.learning_rate", "prefer.beta", "lora.dropout"]


def _value(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@SETTINGS
@given(key=st.sampled_from(INT_KEYS), value=st.integers(-(10**6), 10**6))
def test_an_integer_override_is_taken_as_given_or_refused_naming_the_key(key, value):
    try:
        cfg = load_config("tiny", [f"{key}={value}"])
    except ConfigError as exc:
        one_line_naming(exc, key)
        assert not 16 <= value <= 256, (key, value, exc)  # every one of these keys takes 16 to 256
        return
    assert _value(cfg, key) == value


@SETTINGS
@given(key=st.sampled_from(FLOAT_KEYS), value=st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_a_number_override_is_taken_as_given_or_refused_naming_the_key(key, value):
    try:
        cfg = load_config("tiny", [f"{key}={value!r}"])
    except ConfigError as exc:
        one_line_naming(exc, key)
        return
    assert _value(cfg, key) == value


@SETTINGS
@given(key=st.sampled_from(INT_KEYS + FLOAT_KEYS), raw=st.text(max_size=12))
def test_any_text_for_a_number_is_a_value_or_one_line_naming_the_key(key, raw):
    assume("\n" not in raw and "\r" not in raw)
    try:
        load_config("tiny", [f"{key}={raw}"])
    except ConfigError as exc:
        one_line_naming(exc, key)


@SETTINGS
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_a_text_override_keeps_its_text(text):
    assume(text.strip() not in ("", "null", "~") and all(c.isprintable() or c in " \t" for c in text))
    cfg = load_config("tiny", [f"data.system_prompt={text}"])
    assert cfg.data.system_prompt == text.strip()


@SETTINGS
@given(key=st.text(alphabet=string.ascii_lowercase + "._", min_size=1, max_size=20))
def test_an_unknown_key_is_one_line_naming_it(key):
    assume(key not in all_keys())
    with pytest.raises(ConfigError) as refused:
        load_config("tiny", [f"{key}=1"])
    one_line_naming(refused.value, repr(key.strip()))


# --- the Modelfile, as Ollama reads it -----------------------------------------------------------

sampling = st.builds(
    SamplingParams,
    temperature=st.floats(0, 5, allow_nan=False),
    top_p=st.floats(0, 1, exclude_min=True, allow_nan=False),
    top_k=st.integers(0, 1000),
    repeat_penalty=st.floats(0.5, 3, allow_nan=False),
    max_tokens=st.integers(1, 32768),
)
system_prompts = st.one_of(
    st.none(),
    st.text(max_size=60),
    st.text(alphabet='"{} \n\t\\#', max_size=20),
    st.sampled_from(['"""', 'say "hi"', 'ends with a quote"', '"starts', "{{ .System }}", "line\r\nbreak"]),
)


@SETTINGS
@given(params=sampling, system=system_prompts, n_ctx=st.integers(64, 131072))
def test_ollama_reads_back_every_setting_the_modelfile_writes(params, system, n_ctx):
    unquotable = system and ('"""' in system or any(not c.isprintable() and c not in " \t\n\r" for c in system))
    if unquotable:
        with pytest.raises(ConfigError) as refused:
            modelfile.render("model-Q4_K_M.gguf", n_ctx, params, system)
        one_line_naming(refused.value, "data.system_prompt")
        # the refusal is needed where a character would be dropped or a """ then a line break
        # would end the value (a lone """ elsewhere is refused too, to keep the rule simple)
        if not (re.search(r'"""[\r\n]', system) or any(not c.isprintable() and c not in " \t\n\r" for c in system)):
            return
        try:
            read = ollama_modelfile.parse(f'FROM ./m.gguf\nSYSTEM """{system}"""\nPARAMETER top_k 1\n')
        except ollama_modelfile.ModelfileSyntaxError:
            return
        assert read[1:] != [("system", system), ("top_k", "1")]
        return
    read = ollama_modelfile.parse(modelfile.render("model-Q4_K_M.gguf", n_ctx, params, system))
    values: dict[str, list[str]] = {}
    for name, value in read:
        values.setdefault(name, []).append(value)
    assert values["model"] == ["./model-Q4_K_M.gguf"]
    assert values["template"] == [modelfile.TEMPLATE]
    assert values.get("system") == ([system] if system else None)
    assert values["stop"] == list(modelfile.STOP_TOKENS)
    for name in ("temperature", "top_p", "repeat_penalty"):
        assert float(values[name][0]) == getattr(params, name)
    assert int(values["top_k"][0]) == params.top_k and int(values["num_predict"][0]) == params.max_tokens
    assert int(values["num_ctx"][0]) == n_ctx


def test_the_reader_models_ollamas_quote_rules():
    """The rules the property above relies on, on the cases that decide them."""
    assert ollama_modelfile.parse('FROM ./m.gguf\nSYSTEM """a\n"b"\n"""\n') == [
        ("model", "./m.gguf"),
        ("system", 'a\n"b"\n'),
    ]
    # a triple quote then a line break inside the value ends it early and the rest is no command:
    # why the writer refuses """ in a system prompt
    with pytest.raises(ollama_modelfile.ModelfileSyntaxError):
        ollama_modelfile.parse('SYSTEM """a"""\nb"""\n')
    assert ollama_modelfile.parse('SYSTEM """x\u200by"""\n') == [("system", "xy")]  # not printable: dropped
    assert ollama_modelfile.parse("PARAMETER stop <|end|>\n") == [("stop", "<|end|>")]


# --- the Space's environment variables -----------------------------------------------------------

ENV_VALUES = st.one_of(
    st.integers(-100, 100_000).map(str),
    st.text(alphabet=string.digits + " -+._xe", max_size=8),
    st.text(max_size=8),
)


@SETTINGS
@given(
    variable=st.sampled_from(
        ["N_CTX", "N_THREADS", "N_GPU_LAYERS", "GRADIO_SERVER_PORT", "CONCURRENCY", "MAX_TOTAL_CHARS"]
    ),
    raw=ENV_VALUES,
    backend=st.sampled_from(["", "local", "openai", "Local", "ollama"]),
)
def test_space_variables_are_taken_or_refused_in_one_line_naming_them(variable, raw, backend):
    from qlora_pipeline.serve.chat_app import ENV_INTEGERS, add_app_arguments, apply_environment

    assume("\x00" not in raw)
    with pytest.MonkeyPatch.context() as env:  # one environment per example
        for other, _, _ in ENV_INTEGERS.values():
            env.delenv(other, raising=False)
        env.setenv(variable, raw)
        env.setenv("BACKEND", backend)
        parser = argparse.ArgumentParser()
        add_app_arguments(parser)  # the environment is not read here: a bad variable cannot crash a start
        args = parser.parse_args([])
        option = next(o for o, (v, _, _) in ENV_INTEGERS.items() if v == variable)
        try:
            apply_environment(args)
        except ConfigError as exc:
            text = str(exc)
            assert "\n" not in text and (variable in text or "BACKEND" in text), text
            smallest = ENV_INTEGERS[option][2]
            try:
                number = int(raw)
            except ValueError:  # '²' is a digit to str.isdigit, not to int
                number = None
            valid_number = not raw.strip() or (
                number is not None and number >= smallest and (variable != "GRADIO_SERVER_PORT" or number <= 65535)
            )
            assert not (valid_number and backend in ("", "local", "openai")), f"refused a valid setting: {text}"
            return
    assert args.backend == (backend or "local")
    if raw.strip():
        assert getattr(args, option) == int(raw)
    else:
        assert getattr(args, option) == ENV_INTEGERS[option][1]
