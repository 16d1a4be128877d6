"""The authors' prompt and `LlamaPromptTokenizer`: prompt ids in the checkpoint's conversation template, with the
question tokenized so that a typed `<image>` or `</s>` stays text.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..conversation import IMAGE_TOKEN, PLAIN_V1, ConversationTemplate, Segment, history_messages, render
from ..errors import InputError, TokenizerError
from .llama import check_llama_merge_order, load_llama_tokenizer_from_checkpoint

IMAGE_TOKEN_ID = 32000
PROMPT_HEAD = "USER: "
PROMPT_TAIL = "\n{question} ASSISTANT: "
TEMPLATE = PROMPT_HEAD + IMAGE_TOKEN + PROMPT_TAIL  # "USER: <image>\n{question} ASSISTANT: "


def render_prompt(question: str) -> str:
    """The authors' prompt text for one video: `"USER: <image>\\n" + question + " ASSISTANT: "`."""
    if not isinstance(question, str):
        raise InputError(f"question must be a str, got {type(question).__name__}.")
    return TEMPLATE.format(question=question)


def _tail_json(tok_json: dict[str, Any]) -> dict[str, Any] | None:
    """The tokenizer for the text after `<image>`: no dummy prefix (Metaspace prepend_scheme "never"); None when it
    is the tokenizer itself. Changes a copy of tok_json's pre-tokenizer (tok_json is not modified)."""
    pre_tokenizer = copy.deepcopy(tok_json.get("pre_tokenizer"))
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)  # pre-0.19 spelling
                found = True
            for child in node.get("pretokenizers", []) or []:
                visit(child)

    visit(pre_tokenizer)
    if found:
        return {**tok_json, "pre_tokenizer": pre_tokenizer}
    if "Prepend" not in json.dumps(tok_json.get("normalizer")):
        if _is_byte_level(tok_json):
            return None  # byte-level BPE (GPT-2 style): no dummy prefix, every piece is tokenized alike
        raise TokenizerError(
            "The tokenizer has no Metaspace pre-tokenizer, no Prepend normalizer and no ByteLevel pre-tokenizer; it is "
            "neither a sentencepiece-style (LLaMA) nor a byte-level BPE (GPT-2 style) tokenizer."
        )
    return None


def header_json(text: str) -> dict[str, Any] | None:
    """A tokenizer.json's top-level sections before "model" (added_tokens, normalizer, pre_tokenizer, ...), parsed
    without the vocabulary and merges; None when "model" is not the last top-level key where the `tokenizers` library
    writes it (the caller then parses the whole file). Only for text `tokenizers` has parsed already: the cut is a
    top-level boundary exactly when the prefix closed by "}" parses."""
    cut = text.find('"model":')
    if cut < 0:
        return None
    prefix = text[:cut].rstrip()
    if not prefix.endswith(","):
        return None
    try:
        head = json.loads(prefix[:-1] + "}")
    except ValueError:
        return None
    return head if isinstance(head, dict) and "added_tokens" in head and "model" not in head else None


def _is_byte_level(tok_json: Mapping[str, Any]) -> bool:
    return '"ByteLevel"' in json.dumps(tok_json.get("pre_tokenizer"))


class LlamaPromptTokenizer:
    """Prompt ids for PPLLaVA's LLM in the checkpoint's conversation template, with a single image placeholder.

    A conversation is rendered into segments (`conversation.render`): template text, whose special-token literals
    (`</s>`, `<|im_end|>`, ...) become their ids; message content, where such literals typed by a user stay text;
    and the image placeholder. Text between two special ids is tokenized in one piece with
    `encode_special_tokens=True`. The first piece, when the prompt starts with text, is tokenized with the full
    tokenizer (sentencepiece dummy prefix; BOS when the template says `bos`), later pieces without the dummy prefix
    (Metaspace "never"), as the authors' tokenizer does after a special token. For the authors' plain_v1 this is

        head ids of "USER: " (BOS, dummy prefix) + [image_token_id] + tail ids of "\\n" + q + " ASSISTANT: "

    (notes, Method B). A byte-level BPE tokenizer (tokenizer.json of GPT-2 style, e.g. SmolLM2) has no dummy prefix:
    every piece is tokenized alike.

    Args:
        tokenizer: the full tokenizer (as from `build_llama_tokenizer` or a tokenizer.json); it is not modified.
        image_token_id: the id placed where `<image>` is.
        template: the conversation template (default: the authors' plain_v1).
        bos_token: / eos_token: token contents for `bos_token_id` / `eos_token_id`.
        check_merges: reject a sentencepiece-style tokenizer with transformers 5's merge order.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_token_id: int = IMAGE_TOKEN_ID,
        *,
        template: ConversationTemplate | None = None,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        check_merges: bool = True,
        _tok_json: dict[str, Any] | None = None,
        _owned: bool = False,
    ) -> None:
        tok_json = json.loads(tokenizer.to_str()) if _tok_json is None else _tok_json
        if check_merges:
            check_llama_merge_order(tok_json, "the LLaMA tokenizer")
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.template = template or PLAIN_V1
        # first piece: dummy prefix and BOS as configured. A tokenizer we parsed ourselves (`from_file`) serves as
        # the head too: `encode_special_tokens` changes only encoding, and `self.tokenizer` only decodes, looks up
        # ids and saves (the flag is not serialized). A caller's tokenizer is copied, never changed.
        self._head = tokenizer if _owned else Tokenizer.from_str(tokenizer.to_str())
        self._head.encode_special_tokens = True  # runtime-only flag: not serialized, so set on every load
        tail = _tail_json(tok_json)
        if tail is None:  # nothing differs after `<image>` (byte-level BPE): the head serves (a parse saved at start-up)
            self._tail = self._head
        else:
            self._tail = Tokenizer.from_str(json.dumps(tail))
            self._tail.encode_special_tokens = True
        specials = sorted({a["content"] for a in tok_json.get("added_tokens", []) if a.get("special")}, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in specials)) if specials else None
        self._bos_token, self._eos_token = bos_token, eos_token

    @classmethod
    def from_file(cls, path: str | Path, image_token_id: int = IMAGE_TOKEN_ID, **kwargs: Any) -> LlamaPromptTokenizer:
        """Load a tokenizer.json written by `save` (or a correct transformers export)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"Missing tokenizer file {path.name} in {path.parent}.")
        try:
            text = path.read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
            head = header_json(text)
            # a byte-level BPE needs only the sections before "model" (no tail piece, no merge check): the vocab and
            # merges are not parsed a second time in Python (40 ms of a fresh `ask`'s start for SmolLM2's 49k)
            tok_json = head if head is not None and _is_byte_level(head) else json.loads(text)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"Cannot load tokenizer file {path}: {exc}") from exc
        if kwargs.pop("check_merges", True):
            check_llama_merge_order(tok_json, str(path))
        return cls(tok, image_token_id, check_merges=False, _tok_json=tok_json, _owned=True, **kwargs)

    @classmethod
    def from_checkpoint(
        cls, folder: str | Path, image_token_id: int = IMAGE_TOKEN_ID, **kwargs: Any
    ) -> LlamaPromptTokenizer:
        """Build from a released checkpoint folder (see `load_llama_tokenizer_from_checkpoint`)."""
        return cls(load_llama_tokenizer_from_checkpoint(folder), image_token_id, **kwargs)

    def encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        """Ids of rendered segments (see the class doc)."""
        ids: list[int] = []
        run: list[str] = []
        started = False

        def start() -> None:
            nonlocal started
            if not started and self.template.bos:
                ids.extend(self._head.encode("", add_special_tokens=True).ids)  # BOS alone
            started = True

        def flush() -> None:
            nonlocal started
            text = "".join(run)
            run.clear()
            if not text:
                return
            if started:
                ids.extend(self._tail.encode(text, add_special_tokens=False).ids)
            else:
                ids.extend(self._head.encode(text, add_special_tokens=self.template.bos).ids)
                started = True

        for seg in segments:
            if seg.kind == "image":
                flush()
                start()
                ids.append(self.image_token_id)
            elif seg.kind == "content":
                run.append(seg.text)
            else:
                pos = 0
                for m in self._special_re.finditer(seg.text) if self._special_re is not None else ():
                    run.append(seg.text[pos : m.start()])
                    flush()
                    start()
                    ids.append(self.image_token_id if m.group() == IMAGE_TOKEN else self._token_id(m.group()))
                    pos = m.end()
                run.append(seg.text[pos:])
        flush()
        return ids

    def conversation_ids(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, images: int = 1) -> list[int]:
        """Ids of a conversation ([{'role': 'system'|'user'|'assistant', 'content': str}, ...], oldest first) in the
        template, with `images` image placeholders in the first user message (`conversation.render`)."""
        return self.encode_segments(render(self.template, messages, add_generation_prompt, images))

    def prompt_ids(self, question: str, images: int = 1) -> list[int]:
        """Ids of a one-question prompt (plain_v1: the authors' ids for `render_prompt(question)`), with `images`
        `image_token_id`s (several images: "USER: <image>\\n<image>\\n{question} ASSISTANT: ")."""
        if not isinstance(question, str):
            raise InputError(f"question must be a str, got {type(question).__name__}.")
        return self.conversation_ids([{"role": "user", "content": question}], images=images)

    def chat_prompt_ids(
        self, question: str, history: Sequence[tuple[str, str]] = (), system: str | None = None, images: int = 1
    ) -> list[int]:
        """Ids of a conversation in the checkpoint's template, with the image placeholder in the first user turn;
        for plain_v1:

            [{system} ]USER: <image>\\n{u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>USER: {question} ASSISTANT: 

        `history` holds the earlier (user, assistant) turns, oldest first. Without history and system this equals
        `prompt_ids(question)`. Special tokens between turns (`</s>`, `<|im_end|>`) are their ids; text typed by the
        user (a literal `</s>` or `<image>` included) stays text. `images`: placeholders in the first user turn.
        """
        return self.conversation_ids(history_messages(question, history, system), images=images)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (the image placeholder and BOS/EOS are dropped unless `skip_special_tokens=False`)."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise InputError(f"Token ids must be >= 0, got {min(ids)}.")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _token_id(self, content: str) -> int:
        token_id = self.tokenizer.token_to_id(content)
        if token_id is None:
            raise TokenizerError(f"The tokenizer has no token {content!r}.")
        return token_id

    @property
    def bos_token_id(self) -> int:
        return self._token_id(self._bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._token_id(self._eos_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer.json (a folder gets `tokenizer.json` inside); `from_file` restores this object."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path
