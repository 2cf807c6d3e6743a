"""The Gradio chat app (the course's Hugging Face Space), on llama-cpp-python or an OpenAI-compatible server.

    qlora-pipeline app --model runs/demo/gguf/model-Q4_K_M.gguf          # http://127.0.0.1:7860
    qlora-pipeline app --hub-repo you/phi35-oasst1-gguf --hub-file model-Q4_K_M.gguf
    qlora-pipeline app --backend openai --base-url http://127.0.0.1:8000/v1

This module imports only gradio, llama-cpp-python, huggingface_hub, openai and the light chat
modules (never torch), so that ``qlora-pipeline space`` can ship it in a Space with
``chat``, ``chat_format`` and ``errors``.

Under real use: one loaded model serves every user. Gradio's queue runs one answer at a time
per event (``concurrency``), ``LlamaChat``'s lock keeps a llama context to one thread whatever
the queue does, and ``ModelPool`` counts the answers using each model, so loading another one
never closes a model that is still answering.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from qlora_pipeline.errors import ConfigError
from qlora_pipeline.runtime import usable_memory
from qlora_pipeline.serve.chat import (
    check_lora_file,
)
from qlora_pipeline.serve.page import build_app
from qlora_pipeline.serve.settings import (
    LIMIT_FLAGS,
    AppSettings,
    Limits,
    ModelChoice,
    clip_text,
)
from qlora_pipeline.serve.sources import hub_choices, local_choices

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model sources


# ----------------------------------------------------------------------------- backends


# ----------------------------------------------------------------------------- the chat handler


# ----------------------------------------------------------------------------- the page


# ----------------------------------------------------------------------------- command line


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The app's options; each also read from an environment variable (a Space sets those)."""
    _add_model_arguments(parser)
    _add_server_arguments(parser)
    _add_limit_arguments(parser)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--model",
        type=Path,
        default=env("MODEL_PATH"),
        help="a .gguf file; the picker lists every .gguf beside it (env MODEL_PATH)",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="list the .gguf files of this folder")
    parser.add_argument("--hub-repo", default=env("MODEL_REPO"), help="a Hub repo with GGUF files (env MODEL_REPO)")
    parser.add_argument(
        "--hub-file",
        action="append",
        default=[f for f in (env("MODEL_FILE") or "").split(",") if f],
        help="a GGUF file in --hub-repo (repeat for several; env MODEL_FILE, comma-separated)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="local or openai (env BACKEND)")
    parser.add_argument(
        "--base-url",
        default=env("OPENAI_BASE_URL"),
        help="the OpenAI-compatible server for --backend openai (env OPENAI_BASE_URL)",
    )
    parser.add_argument(
        "--api-model",
        action="append",
        default=[],
        help="model name(s) on the server (default: the server's /v1/models)",
    )
    parser.add_argument("--n-ctx", type=int, default=None, help="context length (default 2048; env N_CTX)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama.cpp threads (default: the CPUs this process may use, affinity and cgroup "
        "quota counted; env N_THREADS)",
    )
    parser.add_argument(
        "--n-gpu-layers",
        type=int,
        default=None,
        help="layers to offload to a GPU (-1 = all; env N_GPU_LAYERS)",
    )
    parser.add_argument(
        "--lora",
        type=Path,
        default=Path(env("LORA_GGUF")) if env("LORA_GGUF") else None,
        help="a LoRA GGUF applied to the local model, e.g. gguf/adapter-F16.gguf on gguf/base-F16.gguf (env LORA_GGUF)",
    )


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=None,
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network; "
        "env GRADIO_SERVER_NAME); any other than loopback prints a warning naming its source",
    )
    parser.add_argument("--port", type=int, default=None, help="port (default 7860; env GRADIO_SERVER_PORT)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="answers generated at once per event (a llama context runs one at a time; env CONCURRENCY)",
    )
    parser.add_argument(
        "--auth-env",
        default="APP_AUTH",
        help="environment variable holding user:password for Gradio's login form (a session "
        "cookie after it; unset: no login)",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="open a public gradio.live link (off by default; refused without a login, see --auth-env)",
    )


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    limits = Limits()
    for name, doc in LIMIT_FLAGS.items():
        flag, variable = name.replace("_", "-"), f"MAX_{name.upper()}"
        parser.add_argument(
            f"--max-{flag}",
            type=int,
            default=None,
            help=f"most {doc} one request may carry, checked before tokenizing "
            f"(default {getattr(limits, name):,}; env {variable})",
        )


BACKENDS = ["local", "openai"]
# The options a Space sets through its variables: option -> (variable, default, smallest value).
# They are read when the app starts (inside its one-line error handling), not when the parser is
# built: a bad variable must not crash every qlora-pipeline command with a traceback.
ENV_INTEGERS = {
    "n_ctx": ("N_CTX", 2048, 64),
    "threads": ("N_THREADS", None, 1),
    "n_gpu_layers": ("N_GPU_LAYERS", 0, -1),
    "port": ("GRADIO_SERVER_PORT", 7860, 1),
    "concurrency": ("CONCURRENCY", 1, 1),
    **{f"max_{name}": (f"MAX_{name.upper()}", getattr(Limits(), name), 1) for name in LIMIT_FLAGS},
}


def env_integer(variable: str, default: int | None, smallest: int) -> int | None:
    """An integer environment variable, or ``default`` when unset or empty; anything else is one
    line naming the variable."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < smallest or (variable == "GRADIO_SERVER_PORT" and value > 65535):
        allowed = "a port from 1 to 65535" if variable == "GRADIO_SERVER_PORT" else f"a whole number >= {smallest}"
        raise ConfigError(f"environment variable {variable}={clip_text(raw)!r} is invalid: use {allowed}")
    return value


def apply_environment(args) -> None:
    """Fill the options left unset on the command line from the environment (a Space's variables)."""
    for option, (variable, default, smallest) in ENV_INTEGERS.items():
        if getattr(args, option, None) is None:
            setattr(args, option, env_integer(variable, default, smallest))
    if getattr(args, "backend", None) is None:
        backend = os.environ.get("BACKEND", "").strip() or "local"
        if backend not in BACKENDS:
            raise ConfigError(f"environment variable BACKEND={clip_text(backend)!r} is invalid: use local or openai")
        args.backend = backend


def settings_from_args(args) -> AppSettings:
    apply_environment(args)
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency={args.concurrency} is invalid: use 1 or more")
    if args.n_ctx < 64:
        raise ConfigError(f"--n-ctx={args.n_ctx} is invalid: use at least 64 tokens")
    for name in LIMIT_FLAGS:
        if getattr(args, f"max_{name}") < 1:
            raise ConfigError(
                f"--max-{name.replace('_', '-')}={getattr(args, f'max_{name}')} is invalid: use 1 or more"
            )
    settings = AppSettings(
        backend=args.backend,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        lora=check_lora_file(args.lora) if args.lora else None,
        base_url=args.base_url,
        api_key=os.environ.get("OPENAI_API_KEY"),
        concurrency=args.concurrency,
        limits=Limits(**{name: getattr(args, f"max_{name}") for name in LIMIT_FLAGS}),
    )
    if args.backend == "openai":
        settings.models = [ModelChoice(n) for n in args.api_model]
        settings.default_model = args.api_model[0] if args.api_model else None
    elif args.hub_repo and not args.model:
        settings.models, settings.default_model = hub_choices(
            args.hub_repo, args.hub_file, usable_memory(), on_gpu=args.n_gpu_layers != 0
        )
    elif args.model or args.model_dir:
        settings.models, settings.default_model = local_choices(args.model, args.model_dir)
    else:
        raise ConfigError(
            "no model given: use --model FILE.gguf (e.g. runs/demo/gguf/model-Q4_K_M.gguf), "
            "--hub-repo REPO --hub-file FILE.gguf, or --backend openai --base-url URL"
        )
    return settings


def basic_auth(env_name: str) -> tuple[str, str] | None:
    value = os.environ.get(env_name)
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{env_name} must be user:password (both non-empty)")
    return user, password


def bind_address(args) -> tuple[str, str]:
    """The address to bind and where it came from: --host, then GRADIO_SERVER_NAME, then loopback."""
    if args.host:
        return args.host, "--host"
    if os.environ.get("GRADIO_SERVER_NAME"):
        return os.environ["GRADIO_SERVER_NAME"], "the GRADIO_SERVER_NAME environment variable"
    return "127.0.0.1", "the default"


def app_main(args) -> int:
    from starlette.middleware import Middleware

    from qlora_pipeline.serve.body_limit import BodyLimit

    settings = settings_from_args(args)
    auth = basic_auth(args.auth_env)
    if args.share and auth is None:
        raise ConfigError(
            f"--share publishes the app on a public gradio.live link: set {args.auth_env}=user:password "
            "first (a login form then guards it)"
        )
    host, source = bind_address(args)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {host} (from {source}): anyone who can reach this machine can use the app"
            + ("" if auth else f"; set {args.auth_env}=user:password for a login"),
            flush=True,
        )
    demo, backend = build_app(settings)
    print(
        f"serving {settings.default_model or 'no model'} on http://{host}:{args.port}"
        + (" (login form on)" if auth else ""),
        flush=True,
    )
    try:
        demo.launch(
            server_name=host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            max_file_size="1mb",
            show_error=True,
            footer_links=["api", "settings"],
            quiet=True,
            app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=settings.limits.request_bytes)]},
        )
    finally:
        backend.close()
    return 0
