"""``qlora-pipeline push``: a run's adapter, merged model or GGUF files to a Hub model repo,
with a generated model card (``README.md``).

    qlora-pipeline push --run-dir runs/demo --repo you/phi35-oasst1-gguf --what gguf

The Space reads its GGUF from such a repo (``MODEL_REPO``). The card's front matter is written
and checked by ``huggingface_hub``'s ``ModelCard`` (base model and its relation, dataset,
license, library, tags); the body gives the training settings, the run's scorecard (with the
importance-matrix figures where ``-imat`` variants were made) and how to run the files with
llama.cpp, Ollama (the run's Modelfile) and the Space. The token is huggingface_hub's own
(``hub.hub_token``: the environment, Colab's secret, the login cache).
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.hub import DPO_SUBFOLDER, MODEL_CARD, RUN_CONFIG_IN_REPO, CourseRepos, hub_token, hub_url
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.serve.sources import MODELS_MANIFEST, default_model

KINDS = ("adapter", "merged", "gguf")
RELATION = {"adapter": "adapter", "merged": "merge", "gguf": "quantized"}
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
DATASET = "OpenAssistant/oasst1"
LICENSE = "mit"  # Phi-3.5-mini-instruct's license; a fine-tune inherits it


# What `push --what gguf` leaves out unless asked (--include): files the Space cannot or should not
# serve. The F16 is a reference (7.6 GB at full size: a CPU Space would load it beside the model
# it holds); the base and the LoRA GGUF are a pair for llama.cpp's --lora; the importance matrix is
# not a model at all.
OPTIONAL_GGUF = ("F16", "base", "lora", "imatrix")


def _optional_gguf_files(layout: RunLayout) -> dict[str, Path]:
    return {
        "F16": layout.gguf("F16"),
        "base": layout.base_gguf,
        "lora": layout.lora_gguf,
        "imatrix": layout.imatrix,
    }


def _folder_files(folder: Path) -> dict[str, Path]:
    """A part's own files by name (peft writes a README.md of its own: the generated card replaces it)."""
    if not folder.is_dir():
        return {}
    return {
        f.name: f
        for f in sorted(folder.iterdir())
        if f.is_file() and not f.name.startswith(".") and f.name != MODEL_CARD
    }


def files_to_push(run_dir: Path, what: str, include: tuple[str, ...] = ()) -> dict[str, Path]:
    """Path in the repo -> file in the run, for one kind of output (``include``: the GGUFs of
    ``OPTIONAL_GGUF`` to push as well)."""
    layout = RunLayout(run_dir)
    unknown = set(include) - set(OPTIONAL_GGUF)
    if unknown:
        raise ConfigError(f"--include {sorted(unknown)[0]!r} is invalid: use any of {', '.join(OPTIONAL_GGUF)}")
    if what in ("adapter", "merged"):
        files = _folder_files(layout.adapter if what == "adapter" else layout.merged)
        if what == "adapter" and files and layout.has_dpo_adapter:
            # the preference-tuned adapter travels in the same repo, under DPO_SUBFOLDER
            files.update({f"{DPO_SUBFOLDER}/{name}": f for name, f in _folder_files(layout.adapter_dpo).items()})
        if what == "merged" and files and layout.merge_check.is_file():
            files[layout.merge_check.name] = layout.merge_check  # export requires it (the merge's own check)
    else:
        optional = _optional_gguf_files(layout)
        skipped = {path.name for name, path in optional.items() if name not in include}
        files = {
            f.name: f
            for f in sorted(layout.gguf_dir.glob("*.gguf"))
            if not f.name.startswith(".") and f.name not in skipped
        }
        if layout.modelfile.is_file():
            files["Modelfile"] = layout.modelfile
    if not files:
        raise PipelineError(f"{run_dir} has no {what} files to push; run the pipeline up to that stage first")
    return files


def models_manifest(files: dict[str, Path]) -> dict:
    """The Space's list of what it may serve: each pushed GGUF whose own ``general.type`` is a
    model, with its size (the Space keeps to the files that fit its memory)."""
    from qlora_pipeline.serve.chat import gguf_kind

    models = {
        name: {"bytes": path.stat().st_size}
        for name, path in files.items()
        if name.endswith(".gguf") and gguf_kind(path) == "model"
    }
    return {"models": models}


def served_file(files: dict[str, Path]) -> str | None:
    """The GGUF the Space opens first, by the Space's own rule over the models it lists."""
    models = sorted(models_manifest(files)["models"])
    return default_model(models) if models else None


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
        *_preference_settings(config.get("prefer", {})),
    ]


def _preference_settings(prefer: dict) -> list[str]:
    """Then DPO (the prefer stage), when it ran: what the merged model and GGUFs were made from."""
    if not prefer.get("enabled"):
        return []
    steps = f"{prefer['max_steps']} steps" if prefer.get("max_steps") else f"{prefer['epochs']} epochs"
    return [
        f"Then preference tuning: DPO (TRL, loss {', '.join(prefer['loss_type'])}, beta {prefer['beta']}) on the "
        f"adapter against its frozen SFT copy, on oasst1's best- against worst-ranked sibling replies; learning rate "
        f"{prefer['learning_rate']}, {steps}. The merged model and the GGUFs carry the DPO adapter.",
        "",
    ]


def _scorecard_section(report: dict) -> list[str]:
    from qlora_pipeline.evaluation.report import scorecard_table
    from qlora_pipeline.gguf.variants import split_variant

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
        dpo = any(name.startswith(f"{DPO_SUBFOLDER}/") for name in files)
        return [
            "## Use",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # the SFT adapter',
            *(
                [f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}", subfolder="{DPO_SUBFOLDER}")  # + DPO']
                if dpo
                else []
            ),
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
    model = served_file(files)
    return [
        "## Use",
        "",
        f"**The chat Space serves `{model}`** (set `MODEL_REPO={repo}`; `MODEL_FILE` picks another "
        f"of the models listed in `{MODELS_MANIFEST}`).",
        "",
        f"- llama.cpp: `llama-cli -hf {repo} -hff {model} -cnv` (or download it and `llama-server -m {model}`)",
        "- Ollama: download the files, then `ollama create phi35-oasst1 -f Modelfile` and `ollama run phi35-oasst1`"
        " (its template and stop tokens end every answer at `<|end|>`)",
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


def push(run_dir: Path, repo: str, what: str, private: bool = False, api=None, include: tuple[str, ...] = ()) -> str:
    """Upload one kind of output with its card in one commit (public unless ``private``: a course
    fine-tune of an MIT-licensed model); ``api`` stands in for ``HfApi``."""
    import json

    from huggingface_hub import CommitOperationAdd

    if what not in KINDS:
        raise ConfigError(f"--what {what!r} is invalid: use one of {', '.join(KINDS)}")
    files = files_to_push(run_dir, what, include)
    card = render_card(run_dir, repo, what, files)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=hub_token(f"pushing the {what} to {repo}"))
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    extra = {MODEL_CARD: card.encode("utf-8")}
    if what == "gguf":
        extra[MODELS_MANIFEST] = json.dumps(models_manifest(files), indent=1).encode("utf-8")
    # The run's configuration travels with its files: the next notebook pulls both (hub.pull_run_part).
    files = {**files, RUN_CONFIG_IN_REPO: RunLayout(run_dir).config}
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in extra.items()]
    api.create_commit(
        repo_id=repo, repo_type="model", operations=operations, commit_message=f"Upload {what} from qlora-pipeline"
    )
    return hub_url(repo)


def push_run_part(run_dir: Path, part: str, repos: CourseRepos) -> str | None:
    """The notebooks' push cell: ``qlora-pipeline push`` of the adapter (notebook 1), the merged
    model (2) or the GGUF files (3, what the Space loads), with a model card and the run's config."""
    if not repos.push:
        print(f"not pushing the {part} (no token, or PUSH_TO_HUB = False)")
        return None
    url = push(Path(run_dir), getattr(repos, part), part, private=repos.private)
    print(f"pushed the {part} to {url}")
    return url
