"""The six notebooks: committed clean, in sync with their generator, and run top to bottom here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, TEST_OVERRIDES

ORDER = [
    "S29_finetuning_llm.ipynb",
    "S29_phi3_inference.ipynb",
    "S29_phi3_QuantizeLLMs_checkpoint.ipynb",
    "notebooks/lora_from_scratch.ipynb",
    "notebooks/nf4_from_scratch.ipynb",
    "notebooks/oasst1_trees.ipynb",
    "notebooks/preference_from_ranks.ipynb",
]


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ORDER)
def test_committed_without_outputs_and_with_a_parameters_cell(name):
    nb = nbformat.read(str(REPO / name), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} has outputs"
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "PRESET = " in params[0].source and "RUN_DIR = " in params[0].source


def test_notebooks_equal_their_generator(tmp_path, monkeypatch):
    gen = _generator()
    assert set(gen.NOTEBOOKS) == set(ORDER)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    gen.write_notebooks()
    for name in ORDER:
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), f"{name}: run scripts/make_notebooks.py"


def _outputs(path: Path) -> str:
    """Every text and HTML output of an executed notebook, joined."""
    nb = nbformat.read(str(path), as_version=4)
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts += [str(out.data.get("text/plain", "")), str(out.data.get("text/html", ""))]
                if "image/png" in out.data:
                    parts.append("<<image/png>>")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, str]:
    """The S29 notebooks as on Colab: each in a fresh working directory and kernel ("VM"), sharing
    only a "Drive" folder (run_sequence fails if a VM's directory is left with anything, or the
    shared run lacks a stage's output); then the concept notebooks."""
    from qlora_pipeline.course.notebook import run_notebook
    from qlora_pipeline.course.rehearsal import S29, run_sequence

    out_dir = tmp_path_factory.mktemp("executed")
    run_sequence(out_dir, REPO, {"OVERRIDES": TEST_OVERRIDES}, timeout=900, log=lambda *a: None)
    outputs = {name: _outputs(out_dir / "executed" / name) for name in S29}
    for name in ORDER[len(S29) :]:
        result = run_notebook(
            REPO / name,
            out_dir / name,
            parameters={"RUN_DIR": str(out_dir / "concepts"), "OVERRIDES": TEST_OVERRIDES},
            cwd=REPO,
        )
        outputs[name] = _outputs(result)
    return outputs


def test_finetuning_notebook_shows_check_curve_and_before_after(executed):
    text = executed["S29_finetuning_llm.ipynb"]
    assert "LoRA target check (every layer must match)" in text and "qkv_proj" in text
    assert "[[" in text and "<|end|>]]" in text  # the label mask, made visible
    assert "<<image/png>>" in text  # tree drawing and loss curve
    assert "test perplexity" in text and "base + adapter" in text
    assert "fine-tuned" in text


def test_finetuning_notebook_teaches_one_step_and_estimates_the_rest(executed):
    text = executed["S29_finetuning_llm.ipynb"]
    assert "BitsAndBytesConfig" in text and "bnb_4bit_quant_type" in text and "LoraConfig(" in text
    assert "position id" in text and "target" in text  # the packed batch table
    assert "one optimizer step:" in text
    assert (
        "measured here: training" in text
        and "S29_phi3_QuantizeLLMs_checkpoint: base, adapter and merged scores" in text
    )


def test_later_notebooks_find_the_first_ones_work_on_drive_and_print_their_estimate(executed):
    for name in ("S29_phi3_inference.ipynb", "S29_phi3_QuantizeLLMs_checkpoint.ipynb"):
        assert "measured here: training" in executed[name]
    assert "same greedy answers as base + adapter: True" in executed["S29_phi3_inference.ipynb"]
    assert "LoRA modules left: 0" in executed["S29_phi3_inference.ipynb"]
    calls = executed["S29_phi3_QuantizeLLMs_checkpoint.ipynb"]
    assert "convert_hf_to_gguf.py" in calls and "--outtype f16" in calls and "llama_model_quantize(" in calls


def test_inference_notebook_shows_merge_agreement(executed):
    text = executed["S29_phi3_inference.ipynb"]
    assert "max_abs_logit_diff" in text and "argmax_agreement" in text
    assert "model.safetensors" in text and "tokenizer.model" in text


def test_quantize_notebook_shows_scorecard_and_plot(executed):
    text = executed["S29_phi3_QuantizeLLMs_checkpoint.ipynb"]
    assert "kld_vs_f16" in text and "bits_per_weight" in text and "Q4_K_M" in text
    assert "<<image/png>>" in text
    assert "chat prompt ids: transformers_stock" in text and "f16_long" in text
    assert "assistant>" in text


def test_concept_notebooks_show_their_comparisons(executed):
    assert "max |ours - peft| on the same weights: 0.00e+00" in executed["notebooks/lora_from_scratch.ipynb"]
    nf4 = executed["notebooks/nf4_from_scratch.ipynb"]
    assert "100.000% of codes identical to bitsandbytes" in nf4 and "4.127" in nf4
    assert '"train": ' in executed["notebooks/oasst1_trees.ipynb"]  # the split sizes printed after the drop chart
    preference = executed["notebooks/preference_from_ranks.ipynb"]
    # the written-out DPO loss printed beside TRL's, before and after the stage (a cell asserts the equality)
    assert preference.count("DPO loss by hand") == 2 and "TRL " in preference
    assert '"sft_val_loss"' in preference and "<<image/png>>" in preference


def test_a_failing_cell_fails_the_run(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    from qlora_pipeline.course.notebook import run_notebook

    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('broken cell')")]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(PapermillExecutionError, match="broken cell"):
        run_notebook(path, tmp_path / "out.ipynb")


def test_gpu_cells_are_skipped_without_cuda(tmp_path):
    import torch

    from qlora_pipeline.course.notebook import run_notebook

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import torch\ntorch.cuda.current_device()")])
    nb.cells[0].metadata["tags"] = ["gpu"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(tmp_path / "gpu.ipynb"))
    out = run_notebook(tmp_path / "gpu.ipynb", tmp_path / "out.ipynb")
    assert "skipped on this machine" in _outputs(out)


def _setup_cell(path: Path) -> str:
    nb = nbformat.read(str(path), as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Set-up. On Colab"))


def _run_setup_as_on_colab(source: str, monkeypatch) -> list:
    """Execute a set-up cell as on a fresh Colab VM: the package is not importable; record the
    commands it would run instead of running them (the first one stops it)."""
    import importlib.util
    import subprocess

    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        raise RuntimeError("stop after the first command")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "qlora_pipeline" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(subprocess, "run", fake_run)
    try:
        exec(compile(source, "setup-cell", "exec"), {"RUN_DIR": "runs/x", "USE_DRIVE": True, "PRESET": None})
    except RuntimeError:
        pass
    return commands


@pytest.mark.parametrize("name", ORDER)
def test_placeholder_repository_stops_the_setup_cell_before_git(name, monkeypatch):
    gen = _generator()
    assert gen.REPO == gen.PLACEHOLDER  # the committed state; make course-repo changes it in a fork
    with pytest.raises(SystemExit, match="REPO is still the placeholder: set it above"):
        _run_setup_as_on_colab(_setup_cell(REPO / name), monkeypatch)


def test_course_repo_rewrites_setup_cells_badges_and_the_space_readme(tmp_path, monkeypatch):
    import shutil

    gen = _generator()
    for rel in ("README.md", "app/README.md", "COURSE_REPO"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp_path / rel)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    gen.main(["--repo", "me/my-course"])
    assert (tmp_path / "COURSE_REPO").read_text() == "me/my-course\n"
    readme = (tmp_path / "README.md").read_text()
    assert "colab.research.google.com/github/me/my-course/blob/main/S29_finetuning_llm.ipynb" in readme
    for doc in (readme, (tmp_path / "app" / "README.md").read_text()):
        assert f"github/{gen.PLACEHOLDER}" not in doc and f"github.com/{gen.PLACEHOLDER}" not in doc
    assert "https://github.com/me/my-course" in (tmp_path / "app" / "README.md").read_text()
    for name in ORDER:
        commands = _run_setup_as_on_colab(_setup_cell(tmp_path / name), monkeypatch)
        assert commands == [["git", "clone", "--depth", "1", "https://github.com/me/my-course", "course"]]
    with pytest.raises(SystemExit, match="is not a GitHub OWNER/NAME"):
        gen.main(["--repo", "not a repo"])


def test_setup_cell_returns_to_the_course_folder_after_a_kernel_restart(tmp_path, monkeypatch):
    """After a restart the package is installed, so the cell skips the clone; it must still chdir
    into the course, or RUN_DIR would resolve somewhere else."""
    import sys
    import types

    (tmp_path / "course" / "src" / "qlora_pipeline").mkdir(parents=True)
    (tmp_path / "course" / ".installed").touch()  # the first run's install finished
    monkeypatch.chdir(tmp_path)
    namespace = {"RUN_DIR": "runs/notebooks/s29", "USE_DRIVE": False, "PRESET": None}
    exec(compile(_setup_cell(REPO / ORDER[0]), "setup-cell", "exec"), namespace)
    assert Path.cwd() == tmp_path / "course" and namespace["RUN_DIR"] == "runs/notebooks/s29"
    # On Colab, RUN_DIR goes to Drive, and running the cell again after a restart gives the same one.
    drive = tmp_path / "content" / "drive"
    (drive / "MyDrive").mkdir(parents=True)  # mounted by the first run
    colab = types.ModuleType("google.colab")
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr("qlora_pipeline.course.colab.DRIVE_MOUNT", str(drive))
    seen = []
    for _ in range(2):
        monkeypatch.chdir(tmp_path)
        namespace = {"RUN_DIR": "runs/notebooks/s29", "USE_DRIVE": True, "PRESET": None}
        exec(compile(_setup_cell(REPO / ORDER[0]), "setup-cell", "exec"), namespace)
        seen.append((Path.cwd(), namespace["RUN_DIR"]))
    assert (
        seen[0] == seen[1] == (tmp_path / "course", str(drive / "MyDrive" / "qlora-gguf-course" / "runs/notebooks/s29"))
    )


def test_notebook_1_writes_the_real_constructors_and_they_equal_what_the_package_builds():
    """The cell a student copies shows ``BitsAndBytesConfig(...)`` and ``LoraConfig(...)`` from
    the preset's values; run as it is, it must build what training uses."""
    from qlora_pipeline.config import load_config
    from qlora_pipeline.model import peft_lora_config, quantization_config

    nb = nbformat.read(str(REPO / "S29_finetuning_llm.ipynb"), as_version=4)
    (cell,) = [c for c in nb.cells if "constructors" in c.metadata.get("tags", [])]
    assert "BitsAndBytesConfig(\n" in cell.source and "LoraConfig(\n" in cell.source
    for preset in ("tiny", "phi35-colab-t4"):
        namespace = {"cfg": load_config(preset, ["model.compute_dtype=float32", "train.mixed_precision=no"])}
        exec(compile(cell.source, "constructors-cell", "exec"), namespace)
        cfg, device = namespace["cfg"], namespace["device"]
        assert namespace["bnb_config"].to_dict() == quantization_config(cfg.model, device).to_dict()
        assert namespace["lora_config"] == peft_lora_config(cfg.lora)


def test_concept_notebooks_leave_the_s29_run_untouched(tmp_path):
    """Each concept notebook has a run folder of its own; oasst1_trees, which prepares data, run
    with its defaults beside an S29 run, leaves that run's splits as they were."""
    from qlora_pipeline.course.notebook import run_notebook

    def default_run_dir(name: str) -> str:
        nb = nbformat.read(str(REPO / name), as_version=4)
        params = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        line = next(line for line in params.splitlines() if line.startswith("RUN_DIR"))
        return line.split("=", 1)[1].strip().strip('"')

    s29 = Path(default_run_dir("S29_finetuning_llm.ipynb"))
    for name in ORDER[3:]:
        own = Path(default_run_dir(name))
        assert own != s29 and s29 not in own.parents and own not in s29.parents, name
    split = tmp_path / s29 / "data" / "train.jsonl"
    split.parent.mkdir(parents=True)
    split.write_text('{"messages": "the S29 run\'s own split"}\n')
    run_notebook(REPO / "notebooks/oasst1_trees.ipynb", tmp_path / "out.ipynb", parameters={}, cwd=tmp_path)
    assert split.read_text() == '{"messages": "the S29 run\'s own split"}\n'
    assert (tmp_path / "runs/notebooks/oasst1-trees/data/train.jsonl").is_file()
