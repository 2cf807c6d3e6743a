"""The ``qlora-pipeline`` command.

    qlora-pipeline run --preset tiny --run-dir runs/demo          # every stage, skipping done ones
    qlora-pipeline run --preset phi35-colab-t4 train.epochs=2     # key=value overrides
    qlora-pipeline prepare|train|prefer|merge|export|evaluate --run-dir runs/demo
    qlora-pipeline run --run-dir runs/demo --resume              # continue after an interruption
    qlora-pipeline run --run-dir runs/demo --force export         # re-run one stage
    qlora-pipeline chat --model runs/demo/gguf/model-Q4_K_M.gguf  # talk to a GGUF (llama-cpp-python)
    qlora-pipeline app --model runs/demo/gguf/model-Q4_K_M.gguf   # the Gradio chat app on 127.0.0.1:7860
    qlora-pipeline space --out runs/space [--push you/my-space]   # the app as a Hugging Face Space folder
    qlora-pipeline hub-twin --out runs/twin-hub                   # offline hub: the twin + oasst1 sample

Errors a user can cause print one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.layout import RunLayout


def _common(parser: argparse.ArgumentParser, default_run_dir: str | None) -> None:
    parser.add_argument("--run-dir", default=default_run_dir, help="folder of this run (default: runs/<preset>)")
    parser.add_argument(
        "--preset",
        default=None,
        help="preset name (tiny, phi35-colab-t4, phi35-a100) or a YAML path (default: tiny, or the run's config.json)",
    )
    parser.add_argument(
        "--data-files",
        nargs="+",
        default=None,
        help="local oasst1 message files (.jsonl/.json/.parquet); sets data.source=files",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=20")


def _add_push_parser(sub) -> None:
    push = sub.add_parser("push", help="upload a run's adapter, merged model or GGUF files with a model card")
    push.add_argument("--run-dir", type=Path, required=True, help="the run folder")
    push.add_argument("--repo", required=True, metavar="USER/NAME", help="the Hub model repo (created if needed)")
    push.add_argument("--what", required=True, choices=("adapter", "merged", "gguf"), help="which output")
    push.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    push.add_argument(
        "--include",
        default="",
        metavar="F16,base,lora,imatrix",
        help="with --what gguf: also push these (default: the quantized models and the Modelfile only)",
    )
    push.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_space_parser(sub) -> None:
    space = sub.add_parser("space", help="write the app as a Hugging Face Space folder (and push it)")
    space.add_argument("--out", type=Path, default=Path("runs/space"), help="the folder to write")
    space.add_argument("--push", default=None, metavar="USER/SPACE", help="create or update this Space (needs a token)")
    space.add_argument("--model-repo", default=None, metavar="USER/NAME", help="set the Space's MODEL_REPO to this")
    space.add_argument("--private", action="store_true", help="a private Space, given the token as its HF_TOKEN secret")
    space.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every stage")
    _common(run, None)
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue training from the last complete checkpoint (with the run's own config.json "
        "unless --preset is given)",
    )
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="run this stage again even if it is up to date (repeatable); the stages after it "
        "run again only if its outputs change",
    )
    run.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    for name, text in (
        ("prepare", "oasst1 trees -> conversations"),
        ("train", "QLoRA fine-tuning"),
        ("prefer", "DPO on the adapter from oasst1's ranked pairs (prefer.enabled)"),
        ("merge", "merge the adapter into the base"),
        ("export", "GGUF F16 and quantized files (llama.cpp)"),
        ("evaluate", "scorecard: base, adapter, merged and every GGUF variant"),
    ):
        stage = sub.add_parser(name, help=text)
        _common(stage, None)
        if name == "train":
            stage.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if name == "prefer":
            stage.add_argument("--fresh", action="store_true", help="start over instead of continuing")
    chat = sub.add_parser("chat", help="chat with a GGUF model in the terminal")
    defaults = _sampling_defaults()
    chat.add_argument("--model", required=True, type=Path, help="a .gguf file")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--prompt", default=None, help="answer this one message and exit")
    chat.add_argument("--temperature", type=float, default=defaults.temperature)
    chat.add_argument("--top-p", type=float, default=defaults.top_p)
    chat.add_argument("--top-k", type=int, default=defaults.top_k)
    chat.add_argument("--repeat-penalty", type=float, default=defaults.repeat_penalty)
    chat.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    chat.add_argument(
        "--n-ctx",
        type=int,
        default=2048,
        help="context length in tokens (Phi-3.5 GGUFs default to 131,072, too much memory)",
    )
    chat.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload when built with a GPU backend")
    chat.add_argument(
        "--lora",
        type=Path,
        default=None,
        help="a LoRA GGUF to apply to --model (export.lora=true writes gguf/adapter-F16.gguf for gguf/base-F16.gguf)",
    )
    chat.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: the CPUs this process may use, affinity and cgroup quota counted)",
    )
    chat.add_argument("--debug", action="store_true", help="show tracebacks")
    app = sub.add_parser("app", help="serve the Gradio chat app (local GGUF, Hub GGUF or OpenAI-compatible server)")
    from qlora_pipeline.serve.chat_app import add_app_arguments

    add_app_arguments(app)
    app.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_space_parser(sub)
    _add_push_parser(sub)
    twin = sub.add_parser(
        "hub-twin",
        help="write an offline Hugging Face cache holding the tiny twin as "
        "microsoft/Phi-3.5-mini-instruct and the sample as OpenAssistant/oasst1",
    )
    twin.add_argument("--out", type=Path, default=Path("runs/twin-hub"), help="the folder to write (use it as HF_HOME)")
    twin.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _sampling_defaults():
    from qlora_pipeline.serve.chat import SamplingParams

    return SamplingParams()


def resolve_config(args):
    """Preset + overrides; for a single stage on an existing run, the run's own config.json."""
    from qlora_pipeline.config import config_from_dict, load_config, merge_settings, parse_overrides
    from qlora_pipeline.pipeline import read_run_config

    overrides = list(args.overrides)
    if args.data_files:
        # argparse gives every word after --data-files to it, overrides included: take those back
        is_override = re.compile(r"^[a-z_]+\.[a-z_]+=").match
        files = [f for f in args.data_files if not is_override(f)]
        overrides += [f for f in args.data_files if is_override(f)]
        overrides += ["data.source=files", "data.data_files=[" + ",".join(f'"{f}"' for f in files) + "]"]
    continuing = args.command != "run" or args.resume  # a stage of, or the rest of, an existing run
    if args.preset is None and args.run_dir and continuing:
        existing = read_run_config(Path(args.run_dir))
        if existing is not None:
            return config_from_dict(merge_settings(existing.to_dict(), parse_overrides(overrides)))
    return load_config(args.preset or "tiny", overrides)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices from inside transformers/peft say nothing a user can act on.
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return _dispatch(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from qlora_pipeline.pipeline import check_run_dir, run_pipeline, run_stage, save_run_config

    if args.command == "chat":
        from qlora_pipeline.serve.chat import chat_main

        return chat_main(args)
    if args.command == "app":
        from qlora_pipeline.serve.chat_app import app_main

        return app_main(args)
    if args.command == "space":
        from qlora_pipeline.space import space_main

        return space_main(args)
    if args.command == "push":
        from qlora_pipeline.publish import push

        include = tuple(name for name in args.include.split(",") if name)
        print(f"pushed {args.what} to {push(args.run_dir, args.repo, args.what, args.private, include=include)}")
        return 0
    if args.command == "hub-twin":
        from qlora_pipeline.hub_twin import hub_twin_main

        return hub_twin_main(args)

    cfg = resolve_config(args)
    run_dir = Path(args.run_dir or f"runs/{cfg.preset}")
    started = time.time()
    if args.command == "run":
        from qlora_pipeline.pipeline import STAGE_NAMES

        named = [("--force", n) for n in args.force] + ([("--until", args.until)] if args.until else [])
        for flag, name in named:
            if name not in STAGE_NAMES:
                raise PipelineError(f"{flag} {name}: unknown stage; use one of {', '.join(STAGE_NAMES)}")
        result = run_pipeline(cfg, run_dir, resume=args.resume, force=tuple(args.force), until=args.until)
        if result.get("interrupted"):
            return 130
        if args.until and args.until != "evaluate":
            print(f"stages up to {args.until} done in {time.time() - started:.1f} s ({run_dir})")
        else:
            print_summary(run_dir, result["timings"], time.time() - started)
        return 0
    check_run_dir(run_dir)
    save_run_config(cfg, run_dir)
    resume = False if getattr(args, "fresh", False) else getattr(args, "resume", None)
    result = run_stage(args.command, cfg, run_dir, resume=resume)
    if isinstance(result, dict) and result.get("interrupted"):
        return 130
    print(f"{args.command} done in {time.time() - started:.1f} s ({run_dir})")
    return 0


def print_summary(run_dir: Path, timings: dict, seconds: float) -> None:
    from qlora_pipeline.evaluation.report import loss_line, parity_line, read_report

    report = read_report(run_dir)
    hf = report.get("hf", {})
    print("\n== summary ==")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {seconds:.0f}s")
    if hf:
        print(loss_line(hf))
    if report.get("preference"):
        from qlora_pipeline.preference import preference_line

        print(preference_line(report["preference"]))
    if report.get("gguf"):
        from qlora_pipeline.evaluation.report import scorecard_table

        print("quantization scorecard (test split, assistant tokens):")
        print(scorecard_table(report["gguf"]))
        from qlora_pipeline.evaluation.report import parity_rows
        from qlora_pipeline.evaluation.routes import format_routes

        for key, row in parity_rows(report.get("parity", {})):
            print(parity_line(key, row))
        if report.get("parity", {}).get("chat_prompt_ids"):
            print("chat prompt ids vs llama.cpp: " + format_routes(report["parity"]["chat_prompt_ids"]))
    heldout = report.get("heldout")
    if heldout:
        from qlora_pipeline.evaluation.heldout import format_exact_match

        print(
            f"held-out questions ({heldout['questions']}), exact match: " + format_exact_match(heldout["exact_match"])
        )
    dpo = ", adapter-dpo/, preference.png" if report.get("preference") else ""
    print(f"outputs in {run_dir}: adapter/{dpo}, merged/, gguf/, report.md, loss.png, scorecard.png")
    q4 = RunLayout(run_dir).gguf("Q4_K_M")
    if q4.is_file():
        print(f"chat with it: qlora-pipeline chat --model {q4}")


if __name__ == "__main__":
    sys.exit(main())
