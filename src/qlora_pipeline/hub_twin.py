"""An offline rehearsal hub: the tiny twin and the bundled oasst1 sample under their hub ids.

    qlora-pipeline hub-twin --out runs/twin-hub
    HF_HOME=runs/twin-hub HF_HUB_OFFLINE=1 qlora-pipeline run --preset phi35-colab-t4 ...

``--out`` becomes a Hugging Face cache folder (the ``HF_HOME`` layout: ``hub/`` and ``datasets/``) holding
``microsoft/Phi-3.5-mini-instruct`` (the twin of ``tiny``: config, bf16 shards with their
index, generation config, tokenizer files in the hub's format) and ``OpenAssistant/oasst1``
(the bundled sample as the hub lays it out: ``data/train-*.parquet`` and
``data/validation-*.parquet`` with the dataset card's features). With ``HF_HUB_OFFLINE=1``,
``from_pretrained`` and ``load_dataset`` resolve those ids from it unmodified, so the
``phi35-*`` presets run through the real hub code path on any CPU.

No library writes a hub cache from local files (``huggingface_hub`` fills it only by
downloading), so ``write_cached_repo`` lays it out by hand, as ``huggingface_hub`` documents
it: ``blobs/<hash>``, ``refs/main`` holding a commit id, and ``snapshots/<commit>/<path>``
links to the blobs. Offline, ``load_dataset`` reads only its own prepared cache
(``HF_HOME/datasets``), so that is written too, by datasets' own parquet builder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from qlora_pipeline.config import TinyConfig
from qlora_pipeline.paths import atomic_dir, write_text_atomic

MODEL_ID = "microsoft/Phi-3.5-mini-instruct"
DATASET_ID = "OpenAssistant/oasst1"
HUB_SUBDIR = "hub"  # HF_HOME/hub is huggingface_hub's cache (HF_HUB_CACHE)
COMPLETE_MARKER = ".qlora-pipeline-twin"
HUB_SPLIT_SEED = 1  # which sample trees form the twin's validation split

# The oasst1 dataset card's features (its README front matter), in its order.
OASST1_CARD = """---
license: apache-2.0
dataset_info:
  features:
  - name: message_id
    dtype: string
  - name: parent_id
    dtype: string
  - name: user_id
    dtype: string
  - name: created_date
    dtype: string
  - name: text
    dtype: string
  - name: role
    dtype: string
  - name: lang
    dtype: string
  - name: review_count
    dtype: int32
  - name: review_result
    dtype: bool
  - name: deleted
    dtype: bool
  - name: rank
    dtype: int32
  - name: synthetic
    dtype: bool
  - name: model_name
    dtype: string
  - name: detoxify
    struct:
    - name: toxicity
      dtype: float64
    - name: severe_toxicity
      dtype: float64
    - name: obscene
      dtype: float64
    - name: identity_attack
      dtype: float64
    - name: insult
      dtype: float64
    - name: threat
      dtype: float64
    - name: sexual_explicit
      dtype: float64
  - name: message_tree_id
    dtype: string
  - name: tree_state
    dtype: string
  - name: emojis
    sequence:
    - name: name
      dtype: string
    - name: count
      dtype: int32
  - name: labels
    sequence:
    - name: name
      dtype: string
    - name: value
      dtype: float64
    - name: count
      dtype: int32
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
# OpenAssistant/oasst1 (offline twin)

The bundled oasst1-format sample of qlora-pipeline, laid out as the hub's dataset: message
rows with the real features, a train split and a validation split (a tenth of the trees).
"""


def oasst1_features():
    """The card's features as a ``datasets.Features``."""
    import yaml
    from datasets import Features

    front = yaml.safe_load(OASST1_CARD.split("---")[1])
    return Features._from_yaml_list(front["dataset_info"]["features"])


def _repo_folder(cache: Path, repo_type: str, repo_id: str) -> Path:
    return cache / f"{repo_type}s--{repo_id.replace('/', '--')}"


def write_cached_repo(cache: Path, repo_type: str, repo_id: str, files: dict[str, Path]) -> str:
    """Lay ``files`` ({path in repo: local file}) out as huggingface_hub's cache of one commit
    on ``main``; return the commit id (a hash of the contents, so the same files give the same id)."""
    import shutil

    folder = _repo_folder(cache, repo_type, repo_id)
    blobs = {name: hashlib.sha256(Path(src).read_bytes()).hexdigest() for name, src in files.items()}
    commit = hashlib.sha1("".join(f"{n}:{b}\n" for n, b in sorted(blobs.items())).encode()).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = folder / "snapshots" / commit
    for name, src in files.items():
        blob = folder / "blobs" / blobs[name]
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    write_text_atomic(folder / "refs" / "main", commit)
    return commit


def _oasst1_parquet(out_dir: Path, val_fraction: float = 0.1) -> dict[str, Path]:
    """The bundled sample as train/validation parquet files with oasst1's features; whole
    trees go to validation, as in the hub's export."""
    from datasets import Dataset

    from qlora_pipeline.data import read_jsonl, sample_data_path, tree_split

    rows = read_jsonl(sample_data_path())
    features = oasst1_features()
    split_rows: dict[str, list[dict]] = {"train": [], "validation": []}
    for row in rows:
        # Another seed than prepare's (0): with the same one, the trees chosen here would all fall
        # on one side when prepare halves the validation split into val and test.
        split = tree_split(row["message_tree_id"], HUB_SPLIT_SEED, val_fraction, 0.0)
        split_rows["validation" if split == "val" else "train"].append({k: row.get(k) for k in features})
    out = {}
    for split, items in split_rows.items():
        path = out_dir / f"{split}-00000-of-00001.parquet"
        Dataset.from_list(items, features=features).to_parquet(str(path))
        out[f"data/{path.name}"] = path
    return out


def _prepare_datasets_cache(datasets_cache: Path, commit: str, parquet: dict[str, Path]) -> None:
    """What ``load_dataset`` leaves in ``HF_HOME/datasets`` after one online load, which is where
    it looks when offline (``datasets`` resolves no dataset from the hub cache alone). Written
    by datasets' own parquet builder, under the cache name of the hub id and its commit."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    name = DATASET_ID.split("/")[1]
    files = {path.name.split("-")[0]: [str(path)] for path in parquet.values()}
    builder = Parquet(
        cache_dir=str(datasets_cache),
        dataset_name=name,
        config_name="default",
        config_id="default",
        hash=commit,
        data_files=files,
        features=oasst1_features(),
    )
    builder.download_and_prepare()
    # The builder names the folder after the dataset; load_dataset looks for "namespace___name".
    (datasets_cache / name).rename(datasets_cache / DATASET_ID.replace("/", "___"))
    for lock in datasets_cache.rglob("*.lock"):
        lock.unlink()


def _model_files(twin: Path) -> dict[str, Path]:
    from qlora_pipeline.phi3_tokenizer import TOKENIZER_FILES

    keep = ("config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES)
    files = {name: twin / name for name in keep}
    files.update({p.name: p for p in sorted(twin.glob("model-*-of-*.safetensors"))})
    return files


def build_hub_twin(out: Path, tiny: TinyConfig | None = None, log=print) -> Path:
    """Write (or find) the rehearsal hub at ``out``; return ``out``."""
    import tempfile

    from qlora_pipeline.tiny import ensure_tiny_base, recipe_hash

    out = Path(out)
    tiny = tiny or TinyConfig()
    from qlora_pipeline.data import sample_data_path

    sample = hashlib.sha256(sample_data_path().read_bytes()).hexdigest()[:12]
    stamp = f"twin {recipe_hash(tiny)} sample {sample} split-seed {HUB_SPLIT_SEED}\n"
    if (out / COMPLETE_MARKER).is_file() and (out / COMPLETE_MARKER).read_text() == stamp:
        log(f"twin hub: {out} is up to date")
        return out
    twin = ensure_tiny_base(tiny, log=log)
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory() as scratch:
        cache = tmp / HUB_SUBDIR
        model_commit = write_cached_repo(cache, "model", MODEL_ID, _model_files(twin))
        card = Path(scratch) / "README.md"
        card.write_text(OASST1_CARD, encoding="utf-8")
        parquet = _oasst1_parquet(Path(scratch))
        data_commit = write_cached_repo(cache, "dataset", DATASET_ID, {"README.md": card, **parquet})
        _prepare_datasets_cache(tmp / "datasets", data_commit, parquet)
        (tmp / COMPLETE_MARKER).write_text(stamp)
    log(
        f"twin hub: {MODEL_ID}@{model_commit[:8]} and {DATASET_ID}@{data_commit[:8]} in {out}\n"
        f"use it with: HF_HOME={out} HF_HUB_OFFLINE=1"
    )
    return out


def hub_twin_main(args) -> int:
    from qlora_pipeline.config import load_config

    build_hub_twin(args.out, load_config("tiny").tiny)  # the demo's twin: one cached base for both
    return 0
