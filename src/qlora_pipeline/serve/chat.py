"""Chatting with a GGUF through llama-cpp-python: one module for the CLI, the evaluation and the app.

    qlora-pipeline chat --model runs/demo/gguf/model-Q4_K_M.gguf
    qlora-pipeline chat --model runs/demo/gguf/model-Q4_K_M.gguf --prompt "What is the capital of Peru?"

The prompt is built with the GGUF's own chat template through ``chat_format.ChatEncoder``, so
the ids are those of training (a test and the evaluate stage check it), and user text is never
parsed for control tokens. Generation goes through ``Llama.create_completion(stream=True)``,
which stops at any end-of-generation token: ``<|end|>`` is one (the export stage marks it as
end-of-turn in the GGUF).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.chat_format import END_OF_TURN, ChatEncoder
from qlora_pipeline.errors import ConfigError, ModelError, PipelineError
from qlora_pipeline.runtime import usable_cpus

GGUF_MAGIC = b"GGUF"
log = logging.getLogger("qlora_pipeline")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, validated: a bad value is one clear error, never a crash deep inside."""

    temperature: float = 0.7
    """0 is greedy; Phi-3.5's own examples use 0 to 0.7."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 40
    """Keep the k most likely tokens (0 turns the filter off)."""
    repeat_penalty: float = 1.1
    """Penalty on recently generated tokens (1.0 = none)."""
    max_tokens: int = 256
    """Most tokens in one answer."""

    def __post_init__(self) -> None:
        checks = (
            (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 5, "temperature", "use 0 to 5"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "use a value in (0, 1]"),
            (
                isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and 0 <= self.top_k <= 1000,
                "top_k",
                "use a whole number from 0 (off) to 1000",
            ),
            (
                isinstance(self.repeat_penalty, (int, float)) and 0.5 <= self.repeat_penalty <= 3,
                "repeat_penalty",
                "use 0.5 to 3 (1.0 = no penalty)",
            ),
            (
                isinstance(self.max_tokens, int)
                and not isinstance(self.max_tokens, bool)
                and 1 <= self.max_tokens <= 32768,
                "max_tokens",
                "use a whole number from 1 to 32768",
            ),
        )
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")


def check_gguf_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; give a .gguf file (e.g. runs/demo/gguf/model-Q4_K_M.gguf)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); export one with `qlora-pipeline export`"
        )
    return path


def check_lora_file(path: Path) -> Path:
    """A LoRA adapter GGUF (``general.type`` adapter), or one line saying what it is instead."""
    path = check_gguf_file(path)
    kind = gguf_kind(path)
    if kind != "adapter":
        raise ConfigError(
            f"--lora {path}: its general.type is {kind}, not adapter; give the LoRA GGUF that "
            "`qlora-pipeline export` writes with export.lora=true (gguf/adapter-F16.gguf)"
        )
    return path


def read_gguf_metadata(path: Path) -> dict:
    """The scalar and string key/values of a GGUF (token lists left out)."""
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise PipelineError(f"{path} is not a readable GGUF file ({str(exc)[:120]}); re-run the export stage") from None
    out = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        out[key] = bytes(value).decode("utf-8") if field.types[0] == GGUFValueType.STRING else value.tolist()[0]
    return out


def gguf_kind(path: Path) -> str:
    """A GGUF's ``general.type``: "model", "imatrix" (an importance matrix) or "adapter" (a LoRA);
    "model" when the key is absent (older files) or the header cannot be read (loading says why)."""
    try:
        return read_gguf_metadata(path).get("general.type", "model")
    except Exception:  # any unreadable header: treat it as a model, and let loading it say what is wrong
        return "model"


def original_context_length(metadata: dict) -> int | None:
    """The context a LongRoPE (or YaRN) GGUF was trained at before scaling: llama.cpp's
    ``<arch>.rope.scaling.original_context_length`` (4,096 for Phi-3.5); None without scaling."""
    value = metadata.get(f"{metadata.get('general.architecture', '')}.rope.scaling.original_context_length")
    return int(value) if value not in (None, "", "0") else None


def long_context_warning(metadata: dict, n_ctx: int) -> str | None:
    """One line when ``n_ctx`` makes llama.cpp switch this GGUF to its long RoPE factors.

    llama.cpp chooses Phi-3.5's LongRoPE factors by the context size, once, for every prompt;
    transformers chooses them by each sequence's length. Above the original context, short
    prompts are computed with the long factors too, and answers differ from training (on a
    twin, 300 tokens agreed with transformers on 0.3% of top-1 predictions at n_ctx 8192).
    """
    original = original_context_length(metadata)
    if original is None or n_ctx <= original:
        return None
    return (
        f"n_ctx={n_ctx} is above this GGUF's original context of {original} tokens: llama.cpp then uses "
        f"its long-context RoPE factors for every prompt, short ones included, and answers differ from "
        f"training; use n_ctx <= {original} unless prompts are longer"
    )


def timed_answer(pieces: Iterator[str], started: float, stats: dict) -> Iterator[str]:
    """Yield the answer's text from ``pieces`` (one per generated token, as generated), then put
    its timings in ``stats``: pieces, seconds since ``started``, time to first token, tokens/s.
    The local model and the OpenAI-compatible backend both stream through it. Closing it (the
    app's stop button) closes ``pieces``, which ends the generation behind them."""
    first, count, emitted = None, 0, False
    try:
        for text in pieces:
            count += 1
            first = first or time.perf_counter()
            if text and not emitted:
                # SentencePiece marks a word start with a space; the answer's first word is not
                # preceded by one (transformers' decoder strips it the same way).
                text = text[1:] if text.startswith(" ") else text
                emitted = bool(text)
            if text:
                yield text
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    ended = time.perf_counter()
    stats.update(
        {
            "completion_chunks": count,
            "seconds": ended - started,
            "time_to_first_token": (first - started) if first else None,
            "tokens_per_s": (count - 1) / (ended - first) if first and count > 1 and ended > first else None,
        }
    )


def _completion_texts(chunks) -> Iterator[str]:
    """The text of each chunk of llama-cpp-python's completion stream. Every chunk is one token;
    one whose text llama.cpp holds back (a stop string's start, part of a UTF-8 character) is
    still counted. Closed, it closes the stream: a stopped answer ends llama.cpp's generation
    here, before ``LlamaChat.stream`` releases the lock for the next request."""
    try:
        for chunk in chunks:
            yield chunk["choices"][0]["text"]
    finally:
        chunks.close()


def _llama_encoder(llm) -> ChatEncoder:
    """A ChatEncoder over a llama.cpp model, rendering the GGUF's own chat template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template_text = llm.metadata.get("tokenizer.chat_template")
    if not template_text:
        raise ModelError(
            "the GGUF has no chat template (tokenizer.chat_template); re-export it with "
            "`qlora-pipeline export`, which copies the tokenizer's template"
        )
    # The same environment llama-cpp-python's Jinja2ChatFormatter uses.
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template_text)
    vocab_eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
    vocab_bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=vocab_eos, bos_token=vocab_bos
        )

    def encode_text(text: str, parse_special: bool) -> list[int]:
        if not text:
            return []
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special)

    eot = llm.tokenize(END_OF_TURN.encode(), add_bos=False, special=True)
    if len(eot) != 1:
        raise ModelError(
            f"the GGUF's vocabulary has no single {END_OF_TURN} token; this pipeline serves Phi-3.5 models"
        )
    return ChatEncoder(render, encode_text, eot[0])


class LlamaChat:
    """One llama.cpp model, safe to share between threads (one generation at a time)."""

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        logits_all: bool = False,
        f32_kv_cache: bool = False,
        lora_path: Path | None = None,
    ):
        from llama_cpp import Llama

        self.model_path = check_gguf_file(model_path)
        self.lora_path = check_lora_file(lora_path) if lora_path else None
        if not n_threads:  # None or 0: the CPUs this process may use, not the host's core count
            n_threads = usable_cpus()
        if n_ctx < 64:
            raise ConfigError(f"n_ctx={n_ctx} is invalid: use at least 64 tokens")
        # The KV cache is F16 by default; parity checks keep it F32 so that they measure the
        # model file, not the cache's rounding.
        kv_types = {"type_k": 0, "type_v": 0} if f32_kv_cache else {}  # 0 = GGML_TYPE_F32
        try:
            # n_ctx is always explicit: a Phi-3.5 GGUF would otherwise ask for its 131,072-token
            # training context and run out of memory.
            self.llm = Llama(
                model_path=str(self.model_path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                logits_all=logits_all,
                verbose=False,
                **kv_types,
                **({"lora_path": str(self.lora_path)} if self.lora_path else {}),
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(
                f"llama.cpp could not load {self.model_path} ({str(exc)[:160]}); the file may be "
                "truncated or from an incompatible llama.cpp version"
            ) from None
        self.n_ctx = n_ctx
        warning = long_context_warning(self.llm.metadata, n_ctx)
        if warning:
            log.warning("warning: %s", warning)
        self.encoder = _llama_encoder(self.llm)
        self.lock = threading.Lock()

    def close(self) -> None:
        """Free the llama.cpp model now (relying on garbage collection at exit can crash)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def prompt_ids(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids that fit the context with room for the answer; and how many turns were dropped.

        Oldest user/assistant pairs go first; a system turn is always kept.
        """
        budget = self.n_ctx - max_new_tokens
        head = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(head) :]
        # Count each turn's tokens once and drop pairs against those counts (linear in the history;
        # re-encoding the conversation after each dropped pair was quadratic). The template text at
        # the new first turn can differ by a token or two, so the result is encoded and checked.
        every = self.encoder.message_token_counts(head + turns)
        total, counts = sum(every), every[len(head) :]
        dropped = 0
        while total > budget and len(turns) - dropped > 1:
            step = 2 if len(turns) - dropped > 2 else 1
            total -= sum(counts[dropped : dropped + step])
            dropped += step
        while True:
            ids = self.encoder.encode_prompt(head + turns[dropped:])
            if len(ids) <= budget:
                return ids, dropped
            if len(turns) - dropped <= 1:
                raise ConfigError(
                    f"the message is too long for the context: {len(ids)} prompt tokens + "
                    f"{max_new_tokens} new tokens > n_ctx={self.n_ctx}; shorten it or raise n_ctx"
                )
            dropped += 2 if len(turns) - dropped > 2 else 1

    def stream(self, messages: list[dict], params: SamplingParams, stats: dict | None = None) -> Iterator[str]:
        """Yield the answer's text as it is generated; fills ``stats`` (tokens, seconds, dropped turns)."""
        max_tokens = min(params.max_tokens, self.n_ctx - 16)
        ids, dropped = self.prompt_ids(messages, max_tokens)
        with self.lock:  # a llama context must never run two generations at once
            started = time.perf_counter()
            chunks = self.llm.create_completion(
                prompt=ids,
                max_tokens=max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                repeat_penalty=params.repeat_penalty,
                stream=True,
                stop=[END_OF_TURN],
            )
            timings: dict = {}
            yield from timed_answer(_completion_texts(chunks), started, timings)
        if stats is not None:
            stats.update({"prompt_tokens": len(ids), "dropped_turns": dropped, **timings})

    def answer(self, messages: list[dict], params: SamplingParams, stats: dict | None = None) -> str:
        return "".join(self.stream(messages, params, stats))


def chat_main(args) -> int:
    """The interactive terminal chat (or one answer with --prompt)."""
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repeat_penalty=args.repeat_penalty,
        max_tokens=args.max_tokens,
    )
    chat = LlamaChat(
        args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, lora_path=args.lora
    )
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def reply(user_text: str) -> None:
        history.append({"role": "user", "content": user_text})
        stats: dict = {}
        parts = []
        for piece in chat.stream(history, params, stats):
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})
        if stats.get("dropped_turns"):
            print(f"[{stats['dropped_turns']} oldest turns dropped to fit n_ctx={chat.n_ctx}]", file=sys.stderr)

    if args.prompt is not None:
        reply(args.prompt)
        return 0
    print(f"chatting with {chat.model_path.name} (n_ctx {chat.n_ctx}); Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    try:
        while True:
            try:
                user_text = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not user_text.strip():
                continue
            sys.stdout.write("assistant> ")
            reply(user_text)
    except KeyboardInterrupt:
        print("\nbye", file=sys.stderr)
        return 0
