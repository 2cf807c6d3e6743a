"""``qlora-pipeline push``: a run's adapter, merged model or GGUF files to a Hub model repo,
with a generated model card (``README.md``).

    qlora-pipeline push --run-dir runs/demo --repo you/phi35-oasst1-gguf --what gguf

The Space reads its GGUF from such a repo (``MODEL_REPO``). The card's front matter is written
and checked by ``huggingface_hub``'s ``ModelCard`` (base model and its relation, dataset,
license, library, tags); the body gives the training settings, the run's scorecard (with the
importance-matrix figures where ``-imat`` variants were made) and how to run the files with
llama.cpp, Ollama (the run's Modelfile) and the Space. The token comes from ``HF_TOKEN``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.layout import RunLayout

KINDS = ("adapter", "merged", "gguf")
RELATION = {"adapter": "adapter", "merged": "merge", "gguf": "quantized"}
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
DATASET = "OpenAssistant/oasst1"
LICENSE = "mit"  # Phi-3.5-mini-instruct's license; a fine-tune inherits it


def files_to_push(run_dir: Path, what: str) -> dict[str, Path]:
    """Path in the repo -> file in the run, for one kind of output."""
    layout = RunLayout(run_dir)
    if what in ("adapter", "merged"):
        folder = layout.adapter if what == "adapter" else layout.merged
        # peft writes a README.md of its own into the adapter: the generated card replaces it.
        files = {
            f.name: f
            for f in sorted(folder.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.name != "README.md"
        }
    else:
        names = [f for f in sorted(layout.gguf_dir.glob("*.gguf")) if not f.name.startswith(".")]
        files = {f.name: f for f in names}
        if layout.modelfile.is_file():
            files["Modelfile"] = layout.modelfile
    if not files:
        raise PipelineError(f"{run_dir} has no {what} files to push; run the pipeline up to that stage first")
    return files


def _hub_base(model: str) -> str | None:
    """The base's Hub id for the front matter; None for the built-in tiny model or a local folder."""
    return model if model.count("/") == 1 and not Path(model).exists() else None


def card_data(config: dict, what: str):
    from huggingface_hub import ModelCardData

    base = _hub_base(config["model"]["name_or_path"])
    tags = ["phi3", "qlora", "lora", "oasst1", "qlora-pipeline", *(["gguf", "llama.cpp"] if what == "gguf" else [])]
    return ModelCardData(
        base_model=base,
        base_model_relation=RELATION[what] if base else None,
        datasets=[DATASET],
        license=LICENSE,
        library_name=LIBRARY[what],
        tags=tags,
    )


def _settings_section(config: dict) -> list[str]:
    model, lora, train, data = config["model"], config["lora"], config["train"], config["data"]
    return [
        "## Training",
        "",
        f"QLoRA on `{model['name_or_path']}` ({model['quantize']} base), LoRA r {lora['r']}, alpha {lora['alpha']}, "
        f"dropout {lora['dropout']} on {', '.join(lora['target_modules'])}; learning rate {train['learning_rate']}, "
        f"{train['epochs']} epochs, {train['batch_tokens']} tokens per batch, sequences up to {data['max_seq_len']} "
        f"tokens, seed {train['seed']}. Data: {DATASET} ({data['source']}), languages {', '.join(data['languages'])}; "
        "the loss counts assistant tokens only, in Phi-3.5's chat template.",
        "",
    ]


def _scorecard_section(report: dict) -> list[str]:
    from qlora_pipeline.evaluate import scorecard_table
    from qlora_pipeline.export import split_variant

    gguf = report.get("gguf")
    if not gguf:
        return []
    lines = ["## Quantization scorecard (held-out conversations, against F16)", "", scorecard_table(gguf), ""]
    pairs = [(v, split_variant(v)[0]) for v in gguf if split_variant(v)[1] and split_variant(v)[0] in gguf]
    if pairs:
        lines += ["Importance matrix (collected over the training conversations):", ""]
        for weighted, plain in pairs:
            before, after = gguf[plain]["kld_vs_f16"], gguf[weighted]["kld_vs_f16"]
            lines.append(
                f"- {plain}: KL {before:.5f} → {after:.5f} with the matrix ({100 * (after / before - 1):+.1f}%)"
            )
        lines.append("")
    return lines


def _usage_section(repo: str, what: str, files: dict[str, Path]) -> list[str]:
    if what == "adapter":
        return [
            "## Use",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")',
            "```",
            "",
        ]
    if what == "merged":
        return [
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            "```",
            "",
        ]
    model = next((n for n in files if n.startswith("model-Q4_K_M")), next(n for n in files if n.endswith(".gguf")))
    return [
        "## Use",
        "",
        f"- llama.cpp: `llama-cli -hf {repo} -hff {model} -cnv` (or download it and `llama-server -m {model}`)",
        "- Ollama: download the files, then `ollama create phi35-oasst1 -f Modelfile` and `ollama run phi35-oasst1`"
        " (its template and stop tokens end every answer at `<|end|>`)",
        f"- The chat Space: set `MODEL_REPO={repo}` and `MODEL_FILE={model}`",
        "",
    ]


def render_card(run_dir: Path, repo: str, what: str, files: dict[str, Path]) -> str:
    """The model card's text: front matter by ``ModelCard``, then the run's own figures."""
    from huggingface_hub import ModelCard

    layout = RunLayout(run_dir)
    config = json.loads(layout.config.read_text(encoding="utf-8"))
    report = json.loads(layout.report_json.read_text(encoding="utf-8")) if layout.report_json.is_file() else {}
    body = [
        f"# {repo.split('/')[-1]}",
        "",
        f"Phi-3.5 fine-tuned with QLoRA on {DATASET} by qlora-pipeline ({what}).",
        "",
    ]
    body += _settings_section(config) + _scorecard_section(report) + _usage_section(repo, what, files)
    card = ModelCard.from_template(
        card_data(config, what), template_str="---\n{{ card_data }}\n---\n" + "\n".join(body)
    )
    return str(card)


def push(run_dir: Path, repo: str, what: str, private: bool = True, api=None) -> str:
    """Upload one kind of output with its card in one commit; ``api`` stands in for ``HfApi``."""
    from huggingface_hub import CommitOperationAdd

    if what not in KINDS:
        raise ConfigError(f"--what {what!r} is invalid: use one of {', '.join(KINDS)}")
    files = files_to_push(run_dir, what)
    card = render_card(run_dir, repo, what, files)
    if api is None:
        token = os.environ.get("HF_TOKEN")
        if not token:
            raise PipelineError("HF_TOKEN is not set; create a write token at huggingface.co/settings/tokens")
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    from qlora_pipeline.hub import RUN_CONFIG_IN_REPO

    # The run's configuration travels with its files: the next notebook pulls both (hub.pull_run_part).
    files = {**files, RUN_CONFIG_IN_REPO: RunLayout(run_dir).config}
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    api.create_commit(
        repo_id=repo, repo_type="model", operations=operations, commit_message=f"Upload {what} from qlora-pipeline"
    )
    return f"https://huggingface.co/{repo}"
