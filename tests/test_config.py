"""Presets load, overrides apply, bad values and keys get one clear sentence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qlora_pipeline.config import PRESETS_DIR, PipelineConfig, load_config
from qlora_pipeline.errors import ConfigError

PRESETS = sorted(p.stem for p in Path(PRESETS_DIR).glob("*.yaml"))


def test_the_three_presets_exist():
    assert {"tiny", "phi35-colab-t4", "phi35-a100"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_opens_with_its_command(preset):
    cfg = load_config(preset)
    assert (Path(PRESETS_DIR) / f"{preset}.yaml").read_text().startswith(f"# qlora-pipeline run --preset {preset}")
    assert set(cfg.lora.target_modules) <= {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_t4_preset_is_fp16_and_a100_is_bf16():
    assert load_config("phi35-colab-t4").model.compute_dtype == "float16"
    assert load_config("phi35-a100").model.compute_dtype == "bfloat16"


def test_every_field_has_a_docstring():
    import inspect

    for section in dataclasses.fields(PipelineConfig):
        cls = section.type if isinstance(section.type, type) else None
        if cls is None or not dataclasses.is_dataclass(cls):
            continue
        source = inspect.getsource(cls)
        for field in dataclasses.fields(cls):
            after = source.split(f"    {field.name}:", 1)[1].splitlines()[1].strip()
            assert after.startswith('"""'), f"{cls.__name__}.{field.name} has no docstring"


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.max_steps=7", "lora.target_modules=[qkv_proj,o_proj]", "data.system_prompt=Hi"])
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ("qkv_proj", "o_proj")
    assert cfg.data.system_prompt == "Hi"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rte=1", "unknown config key 'train.learning_rte'; did you mean train.learning_rate?"),
        ("train.learning_rate=-1", "train.learning_rate=-1.0 is invalid"),
        ("lora.r=0", "lora.r=0 is invalid"),
        ("lora.alpha=0", "lora.alpha=0 is invalid"),
        ("tiny.hidden_size=300", "multiple of 256"),
        ("model.quantize=int3", "use nf4 or none"),
        ("train.max_steps=many", "use a whole number"),
        ("data.languages=[english]", "language codes"),
        ("max_steps", "is not key=value"),
    ],
)
def test_bad_values_get_one_sentence(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'tiyn'; choose one of .*tiny"):
        load_config("tiyn")


def test_string_settings_are_taken_as_typed_not_as_yaml():
    """YAML reads `no` as false; a setting that is a string keeps the word typed."""
    from qlora_pipeline.config import load_config

    cfg = load_config("tiny", ["train.mixed_precision=no", "data.system_prompt=yes", "train.learning_rate=2e-3"])
    assert cfg.train.mixed_precision == "no" and cfg.data.system_prompt == "yes"
    assert cfg.train.learning_rate == 0.002


@pytest.mark.slow
def test_an_installed_wheel_has_the_presets(tmp_path):
    """``pip wheel .`` then an install of that wheel elsewhere: ``--preset tiny`` (the default)
    and the other presets resolve from the installed copy, not from this checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # built from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(repo / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
        check=True,
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "wheel").glob("qlora_pipeline-*.whl"))
    assert {f"qlora_pipeline/presets/{name}.yaml" for name in PRESETS} <= set(zipfile.ZipFile(wheel).namelist())
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    probe = (
        "import qlora_pipeline.config as c, sys; print(c.__file__); "
        "print(*(c.load_config(name).preset for name in sys.argv[1:]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *PRESETS],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    where, names = out.splitlines()
    assert where.startswith(str(tmp_path / "site")), where
    assert names.split() == PRESETS
