"""What the course notebooks show, as functions (so tests reach them), and the notebook runner.

    from qlora_pipeline.course.notebook import run_notebook
    run_notebook("S29_finetuning_llm.ipynb", "runs/notebooks/S29_finetuning_llm.ipynb",
                 parameters={"RUN_DIR": "runs/notebooks/s29"})

Notebooks are executed with papermill (a real Jupyter kernel); cells tagged ``gpu`` are
replaced by a note when no CUDA device is present, as nbdev does with its skip flags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qlora_pipeline.model import count_parameters  # noqa: F401 (the notebooks import it from here)

GPU_TAG = "gpu"


# ---------------------------------------------------------------------------- environment


def environment_report() -> dict:
    """Where the notebook runs: Colab or not, the accelerator, library versions. Printed once."""
    import warnings

    import torch

    # Deprecation notices from inside transformers/peft say nothing a student can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = {
        "colab": "google.colab" in sys.modules,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
        info["bf16"] = torch.cuda.is_bf16_supported()
    for name in ("transformers", "peft", "bitsandbytes", "llama_cpp"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    where = "Colab" if info["colab"] else "local"
    accel = info.get("gpu") or "no GPU: CPU only (GPU-tagged cells are skipped; use the tiny preset)"
    print(f"{where}; Python {info['python']}; torch {info['torch']}; {accel}")
    return info


def choose_preset(preset: str | None, env: dict) -> str:
    """The parameters cell's PRESET: as given, or by the machine (phi35-colab-t4 with a GPU, tiny
    on a CPU), so that a student on Colab's T4 runs the real model without editing anything."""
    chosen = preset or ("phi35-colab-t4" if env.get("cuda") else "tiny")
    if not preset:
        print(f"PRESET = {chosen!r} ({'a GPU' if env.get('cuda') else 'no GPU'}: set PRESET to choose another)")
    return chosen


# ---------------------------------------------------------------------------- data views


def tree_text(rows: list[dict], tree_id: str, width: int = 60) -> str:
    """An oasst1 tree as indented text: role, rank and flags of every message."""
    by_parent: dict = {}
    for row in rows:
        if row["message_tree_id"] == tree_id:
            by_parent.setdefault(row["parent_id"], []).append(row)
    lines: list[str] = []

    def walk(parent, depth):
        children = sorted(by_parent.get(parent, []), key=lambda r: (r["rank"] is None, r["rank"] or 0))
        for row in children:
            flags = [f"rank {row['rank']}" if row["rank"] is not None else "unranked"]
            if row["deleted"]:
                flags.append("DELETED")
            if row["review_result"] is False:
                flags.append("REJECTED")
            text = row["text"].replace("\n", " ")
            text = text if len(text) <= width else text[: width - 1] + "…"
            lines.append(f"{'    ' * depth}{row['role']:<9} [{', '.join(flags)}] {text}")
            walk(row["message_id"], depth + 1)

    walk(None, 0)
    if not lines:  # the tree's root may be the only message with parent None
        root = [r for r in rows if r["message_id"] == tree_id]
        by_parent[None] = root
        walk(None, 0)
    return "\n".join(lines)


def draw_tree(rows: list[dict], tree_id: str, best_path: list[str] | None = None, ax=None):
    """Draw an oasst1 tree with matplotlib; messages on the chosen path are filled."""
    import matplotlib.pyplot as plt

    tree = [r for r in rows if r["message_tree_id"] == tree_id]
    children: dict = {}
    for row in tree:
        children.setdefault(row["parent_id"], []).append(row)
    positions: dict = {}
    next_x = [0]

    def place(row, depth):
        kids = sorted(children.get(row["message_id"], []), key=lambda r: (r["rank"] is None, r["rank"] or 0))
        xs = [place(k, depth + 1) for k in kids]
        if xs:
            x = sum(xs) / len(xs)
        else:
            x = next_x[0]
            next_x[0] += 1
        positions[row["message_id"]] = (x, -depth, row)
        return x

    for root in [r for r in tree if r["parent_id"] is None]:
        place(root, 0)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, next_x[0] * 1.6), 3.5))
    chosen = set(best_path or [])
    for x, y, row in positions.values():
        if row["parent_id"] in positions:
            px, py, _ = positions[row["parent_id"]]
            ax.plot([px, x], [py, y], color="grey", lw=1, zorder=1)
    for mid, (x, y, row) in positions.items():
        colour = "tab:blue" if row["role"] == "prompter" else "tab:orange"
        removed = row["deleted"] or row["review_result"] is False
        ax.scatter(
            [x],
            [y],
            s=260,
            zorder=2,
            edgecolors=colour,
            linewidths=2,
            c=colour if mid in chosen else "white",
            marker="X" if removed else "o",
        )
        label = "" if row["rank"] is None else str(row["rank"])
        ax.annotate(label, (x, y), ha="center", va="center", fontsize=8, zorder=3)
    ax.set_axis_off()
    ax.set_title(
        "oasst1 tree: blue = prompter, orange = assistant, number = rank, filled = kept path, X = removed", fontsize=8
    )
    return ax


def label_mask_view(tokenizer, example: dict) -> str:
    """A tokenized conversation with the trained tokens in [[double brackets]]."""
    from qlora_pipeline.chat_format import IGNORE_INDEX

    out, inside = [], False
    for token_id, label in zip(example["input_ids"], example["labels"]):
        piece = tokenizer.convert_ids_to_tokens(token_id).replace("▁", " ").replace("<0x0A>", "\\n")
        trained = label != IGNORE_INDEX
        if trained and not inside:
            out.append("[[")
        if not trained and inside:
            out.append("]]")
        inside = trained
        out.append(piece)
    if inside:
        out.append("]]")
    return "".join(out)


def packed_batch_table(tokenizer, input_ids, labels, position_ids, context: int = 10):
    """The tokens around the first boundary of a packed row: each token, its position id (back to
    0 where the next conversation starts, so attention stays within a conversation) and whether
    it is a training target (its label is not -100)."""
    import pandas as pd

    from qlora_pipeline.chat_format import IGNORE_INDEX

    ids, labs, pos = (t[0].tolist() for t in (input_ids, labels, position_ids))
    starts = [i for i, p in enumerate(pos) if p == 0 and i > 0]
    middle = starts[0] if starts else len(ids) // 2
    window = range(max(0, middle - context), min(len(ids), middle + context))
    return pd.DataFrame(
        [
            {"token": tokenizer.convert_ids_to_tokens(ids[i]), "position id": pos[i], "target": labs[i] != IGNORE_INDEX}
            for i in window
        ],
        index=list(window),
    )


def forward_tokens_per_s(model, input_ids, position_ids, device) -> float:
    """Tokens per second of one forward pass (no gradients) in the device's compute dtype."""
    import time

    import torch

    with (
        torch.no_grad(),
        torch.autocast(device.name, dtype=device.compute_dtype, enabled=device.mixed_precision != "no"),
    ):
        started = time.perf_counter()
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        if device.name == "cuda":
            torch.cuda.synchronize()
    return input_ids.numel() / (time.perf_counter() - started)


def load_for_answers(cfg, base: str, adapter_dir: str | None = None):
    """The 16-bit base (with an adapter, if given) where evaluation runs: the GPU when there is one."""
    from qlora_pipeline.model import eval_placement, load_adapter, load_base_full_precision, merge_dtype

    device, dtype = eval_placement(merge_dtype(cfg, base))
    model = load_base_full_precision(base, cfg.model, dtype=dtype, device=device)
    return load_adapter(model, Path(adapter_dir)) if adapter_dir else model


def pick_branching_tree(rows: list[dict], languages=("en",)) -> str:
    """A tree worth showing: the one with the most messages among English trees with ranked replies."""
    sizes: dict = {}
    ranked: set = set()
    roots = {r["message_id"] for r in rows if r["parent_id"] is None and r["lang"] in languages}
    for row in rows:
        if row["message_tree_id"] in roots:
            sizes[row["message_tree_id"]] = sizes.get(row["message_tree_id"], 0) + 1
            if row["rank"] is not None and row["rank"] > 0:
                ranked.add(row["message_tree_id"])
    candidates = [t for t in sizes if t in ranked] or list(sizes)
    return max(candidates, key=lambda t: (sizes[t], t))


def memory_table(n_params: int) -> list[dict]:
    """Bytes of the base weights at each precision the course compares (scales included for NF4)."""
    from qlora_pipeline.course.concepts import bits_per_parameter

    rows = [
        ("fp32", 32.0),
        ("fp16 / bf16", 16.0),
        ("int8", 8.0),
        ("NF4 (block 64)", bits_per_parameter(64)),
        ("NF4 + double quantization", bits_per_parameter(64, True)),
    ]
    return [
        {"precision": name, "bits per parameter": round(bits, 3), "GB": round(n_params * bits / 8 / 1e9, 3)}
        for name, bits in rows
    ]


# ---------------------------------------------------------------------------- answers


def hf_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, system: str | None = None) -> list[str]:
    """Greedy answers of a transformers model through the chat template (stops at <|end|>):
    the held-out scoring's own answerer."""
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.evaluation.heldout import hf_answerer

    answer = hf_answerer(model, ChatEncoder.from_hf(tokenizer), tokenizer, max_new_tokens)
    head = [{"role": "system", "content": system}] if system else []
    return [answer([*head, {"role": "user", "content": prompt}]).strip() for prompt in prompts]


def gguf_answers(run_dir: Path, quants: list[str], messages: list[dict], params, n_ctx: int = 2048) -> dict:
    """The same messages through several GGUF variants: {quant: (answer, tokens/s)}."""
    from qlora_pipeline.gguf.variants import gguf_path
    from qlora_pipeline.serve.chat import LlamaChat

    out = {}
    for quant in quants:
        with LlamaChat(gguf_path(run_dir, quant), n_ctx=n_ctx) as chat:
            stats: dict = {}
            answer = chat.answer(messages, params, stats)
            out[quant] = (answer, stats.get("tokens_per_s"))
    return out


# ---------------------------------------------------------------------------- running notebooks


def run_notebook(
    path: Path, output_path: Path, parameters: dict | None = None, cwd: Path | None = None, timeout: int = 900
) -> Path:
    """Execute a notebook top to bottom in a real kernel; raise on the first failing cell."""
    import tempfile

    import nbformat
    import papermill
    import torch

    nb = nbformat.read(str(path), as_version=4)
    if not torch.cuda.is_available():
        for cell in nb.cells:
            if GPU_TAG in cell.get("metadata", {}).get("tags", []):
                cell.source = f"print({'skipped on this machine: the cell needs a CUDA GPU'!r})"
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / Path(path).name
        nbformat.write(nb, str(prepared))
        papermill.execute_notebook(
            str(prepared),
            str(output_path),
            parameters=parameters or {},
            cwd=str(cwd or Path(path).resolve().parent),
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=timeout,
            log_output=False,
        )
    return output_path


def main(argv: list[str] | None = None) -> int:
    """``python -m qlora_pipeline.course.notebook OUT_DIR NB...``: execute notebooks into OUT_DIR with outputs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir, notebooks = Path(argv[0]), [Path(p) for p in argv[1:]]
    params = (
        json.loads(Path(out_dir / "parameters.json").read_text()) if (out_dir / "parameters.json").is_file() else {}
    )
    import time

    total = time.time()
    for nb in notebooks:
        started = time.time()
        run_notebook(nb, out_dir / nb.name, parameters=params, cwd=Path.cwd())
        print(f"{nb}: {time.time() - started:.0f} s -> {out_dir / nb.name}", flush=True)
    print(f"all {len(notebooks)} notebooks in {time.time() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
