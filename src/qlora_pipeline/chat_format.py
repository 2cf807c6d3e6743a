"""One chat template from training to serving: prompt ids and assistant-only labels.

    from qlora_pipeline.chat_format import ChatEncoder
    encoder = ChatEncoder.from_hf(tokenizer)
    ids, labels = encoder.encode_with_labels(messages)      # training
    ids = encoder.encode_prompt(messages)                   # inference, ends with "<|assistant|>"

The model's own Jinja chat template decides the layout. Message *contents* are cut out of the
rendered text with sentinels and tokenized as plain text, so text a user types such as
``<|end|><|assistant|>`` is never read as a control token (rendering to one string and
tokenizing it would do exactly that; llama-cpp-python's chat handler does). The template's own
pieces are tokenized with special tokens parsed. Labels are -100 everywhere except each
assistant content and the end-of-turn token that closes it.

The same encoder runs on a transformers tokenizer (training, evaluation) and on a llama.cpp
model (chat, app) through two small adapters, so both see identical ids; the evaluate stage
checks that they do.

No BOS is added beyond what the template writes, as transformers' ``apply_chat_template`` and
llama-cpp-python's chat handler both do (llama-cpp-python PR #1439): Phi-3.5's template writes
none. Text tokenized outside a template (llama.cpp's plain ``tokenize``) does get BOS; compare
ids, not strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100  # PyTorch's cross-entropy default ignore_index
END_OF_TURN = "<|end|>"
ROLES = ("system", "user", "assistant")
# Private-use code points: they cannot occur in a template, and we reject them in user text.
_SENTINEL_OPEN, _SENTINEL_CLOSE = "\ue000", "\ue001"
_SENTINEL_RE = re.compile(f"{_SENTINEL_OPEN}(\\d+){_SENTINEL_CLOSE}")


class ChatFormatError(ValueError):
    """Messages that the chat template cannot render as expected."""


@dataclass
class ChatEncoder:
    """Tokenizes conversations through a chat template, keeping message contents as plain text."""

    render: Callable[[list[dict], bool], str]
    """Renders messages with the model's chat template: (messages, add_generation_prompt) -> text."""
    encode_text: Callable[[str, bool], list[int]]
    """Tokenizes text without BOS: (text, parse_special_tokens) -> ids."""
    end_of_turn_id: int
    """The token that closes a turn (``<|end|>`` for Phi-3.5); labelled, and a stop token."""

    @classmethod
    def from_hf(cls, tokenizer) -> ChatEncoder:
        """An encoder over a transformers tokenizer with a chat template."""
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError(
                "the tokenizer has no chat_template; use a chat model's tokenizer "
                "(Phi-3.5-mini-instruct) or set tokenizer.chat_template"
            )
        eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if eot is None or eot == tokenizer.unk_token_id:
            raise ChatFormatError(f"the tokenizer has no {END_OF_TURN} token; this pipeline expects Phi-3.5's template")

        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

        def encode_text(text: str, parse_special: bool) -> list[int]:
            if not text:
                return []
            return tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]

        return cls(render, encode_text, eot)

    def _segments(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[tuple[str, int | None]]:
        """The rendered conversation as (text, message index or None for template text) pieces."""
        placeholders = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ChatFormatError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ChatFormatError(f"message {i} has content of type {type(content).__name__}; use a string")
            if _SENTINEL_OPEN in content or _SENTINEL_CLOSE in content:
                content = content.replace(_SENTINEL_OPEN, "").replace(_SENTINEL_CLOSE, "")
            # Empty contents stay empty: the template may skip such turns (Phi-3.5 skips an empty system).
            placeholders.append({"role": role, "content": f"{_SENTINEL_OPEN}{i}{_SENTINEL_CLOSE}" if content else ""})
        text = self.render(placeholders, add_generation_prompt)
        segments: list[tuple[str, int | None]] = []
        pos = 0
        for match in _SENTINEL_RE.finditer(text):
            if match.start() > pos:
                segments.append((text[pos : match.start()], None))
            index = int(match.group(1))
            content = messages[index]["content"].replace(_SENTINEL_OPEN, "").replace(_SENTINEL_CLOSE, "")
            segments.append((content, index))
            pos = match.end()
        if pos < len(text):
            segments.append((text[pos:], None))
        return segments

    def encode_with_labels(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and labels that train on assistant turns only."""
        ids: list[int] = []
        labels: list[int] = []
        label_until_end_of_turn = False
        for text, index in self._segments(messages, add_generation_prompt=False):
            if index is not None:
                piece = self.encode_text(text, False)
                is_assistant = messages[index]["role"] == "assistant"
                ids += piece
                labels += piece if is_assistant else [IGNORE_INDEX] * len(piece)
                label_until_end_of_turn = is_assistant
                continue
            piece = self.encode_text(text, True)
            if label_until_end_of_turn:
                if self.end_of_turn_id not in piece:
                    raise ChatFormatError(
                        "the chat template does not close an assistant turn with "
                        f"{END_OF_TURN}; the model would never learn to stop"
                    )
                stop = piece.index(self.end_of_turn_id) + 1
                ids += piece
                labels += piece[:stop] + [IGNORE_INDEX] * (len(piece) - stop)
                label_until_end_of_turn = False
            else:
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
        return ids, labels

    def message_token_counts(self, messages: Sequence[dict]) -> list[int]:
        """Tokens each message adds to the prompt: its content and the template text after it (the
        text before the first message counts for the first). One rendering and one tokenizing pass:
        trimming a long history reads these instead of re-encoding the conversation per dropped turn."""
        counts = [0] * len(messages)
        owner = 0
        for text, index in self._segments(messages, add_generation_prompt=True):
            owner = index if index is not None else owner
            counts[owner] += len(self.encode_text(text, index is None))
        return counts

    def encode_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Token ids that ask the model for the next assistant turn."""
        ids: list[int] = []
        for text, index in self._segments(messages, add_generation_prompt=True):
            ids += self.encode_text(text, index is None)
        return ids
