"""The OpenAI chat-completions wire format: request validation, response and SSE chunk bodies, JSON errors.

Pure Python (no web framework): the app turns an `ApiError` into its HTTP status and the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`. Every message names the offending field (`param`), in the
same dotted/indexed form OpenAI uses (`messages[0].content[1].video_url.url`).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI error fields (+ extra response headers)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


MAX_STOP_CHARS = 1 << 18
"""Longest `stop` string accepted (262144 characters); the scan is linear in the text generated either way."""


def _check_text(text: str, param: str) -> str:
    """`text`, or 400 when it holds a lone UTF-16 surrogate (JSON "\\ud800" escapes): no tokenizer or path takes one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(param, f"'{param}' holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), not valid Unicode text",
                  "invalid_text") from None
    return text


DEFAULT_MAX_IMAGES = 8
"""image_url parts one request may hold by default (`serve --max-images`; at most the runtime's limit, 32)."""


@dataclass(frozen=True)
class MediaPart:
    """A video/image of a request: its URL and where it was in the request."""

    url: str
    kind: str  # "video_url" or "image_url"
    param: str  # e.g. "messages[0].content[1].video_url.url"


@dataclass
class ChatRequest:
    """A validated chat-completions request, in the pipeline's terms."""

    model: str
    question: str  # the latest user turn: the LLM's last turn and the relevance (CLIP) query
    history: list[tuple[str, str]]  # earlier (user, assistant) turns
    system: str | None
    media: list[MediaPart]  # one video_url, or 1..max_images image_url parts in message order (one <image> slot each)
    max_tokens: int | None
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    frames: int | None
    return_token_ids: bool
    ignore_eos: bool
    return_relevance: bool = False  # add the pooling's relevance map (+ frame thumbnails) to the answer


# fields of the OpenAI schema we cannot honour: refused when set to something other than their neutral value
_UNSUPPORTED = {
    "tools": lambda v: v not in (None, []),
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: v not in (None, []),
    "logprobs": lambda v: v not in (None, False),
    "top_logprobs": lambda v: v not in (None, 0),
    "logit_bias": lambda v: v not in (None, {}),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt_int(body: dict, name: str, low: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < low:
        raise bad(name, f"'{name}' must be an integer >= {low}, got {v!r}")
    return v


def _opt_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, got {v!r}")
    return v


def _text_of(content: Any, where: str, media: list[MediaPart], allow_media: bool) -> str:
    """The text of a message's content (a string or a list of parts); media parts are collected."""
    if isinstance(content, str):
        return _check_text(content, f"{where}.content")
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad(f"{where}.content", f"'{where}.content' must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"{at}.type", f"'{at}' must be an object with a 'type'")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{at}.text", f"'{at}.text' must be a string")
            texts.append(_check_text(part["text"], f"{at}.text"))
        elif kind in ("video_url", "image_url"):
            if not allow_media:
                raise bad(f"{at}.type", f"'{at}': a {kind} part is only allowed in a user message")
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad(f"{at}.{kind}.url", f"'{at}.{kind}.url' must be a non-empty string (a data: URL, a file:// URL or a path)")
            media.append(MediaPart(_check_text(url, f"{at}.{kind}.url"), kind, f"{at}.{kind}.url"))
        else:
            raise bad(f"{at}.type", f"'{at}.type' {kind!r} is not supported (use text, video_url or image_url)", "unsupported_content_type")
    return "\n".join(texts)


def _check_media(media: list[MediaPart], max_images: int) -> None:
    """One video_url part, or 1..max_images image_url parts (several images: one question about all of them, the
    authors' multi-image path); a video goes alone, as in the authors' model (one media type per question)."""
    if not media:
        raise bad("messages", "a user message needs one video_url (or image_url) content part: the video to ask about", "missing_media")
    if len(media) > 1 and any(m.kind == "video_url" for m in media):  # the second part makes the request mixed
        raise bad(media[1].param, f"a video goes alone: one video_url part, or up to {max_images} image_url parts, per request; found "
                               f"{len(media)} media parts ({', '.join(m.param for m in media)})", "too_many_media")
    if len(media) > max_images:
        raise bad(media[max_images].param, f"at most {max_images} image_url parts per request on this server; found {len(media)}", "too_many_media")


def parse_chat_request(body: Any, model_id: str, max_images: int = DEFAULT_MAX_IMAGES) -> ChatRequest:
    """Validate a chat-completions body. Raises ApiError (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required (a string; see GET /v1/models)", "missing_required_parameter")
    if model != model_id:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves {model_id!r}", "model", "model_not_found")
    for name, unsupported in _UNSUPPORTED.items():
        if unsupported(body.get(name)):
            raise bad(name, f"'{name}' is not supported by this server", "unsupported_parameter")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad("n", f"'n' must be 1 (one choice per request), got {n!r}", "unsupported_parameter")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list", "missing_required_parameter")
    media: list[MediaPart] = []
    system: list[str] = []
    turns: list[list[Any]] = []  # [role, text]
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(where, f"'{where}' must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(msg.get("content"), where, media, allow_media=False))
            continue
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role", f"'{where}.role' must be system, developer, user or assistant, got {role!r}", "unsupported_role")
        text = _text_of(msg.get("content"), where, media, allow_media=role == "user")
        if not turns and role == "assistant":
            raise bad(f"{where}.role", f"'{where}': the conversation must start with a user message")
        if turns and turns[-1][0] == role:  # consecutive messages of one role form one turn
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user":
        raise bad("messages", "the last message must be a user message (the question to answer)")
    _check_media(media, max_images)
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]

    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    temperature = body.get("temperature")
    if temperature is not None and (not _is_num(temperature) or not 0 <= temperature <= 2):
        raise bad("temperature", f"'temperature' must be a number in [0, 2], got {temperature!r}")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_num(top_p) or not 0 < top_p <= 1):
        raise bad("top_p", f"'top_p' must be a number in (0, 1], got {top_p!r}")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise bad("top_k", f"'top_k' must be an integer >= -1 (-1 or 0 = off), got {top_k!r}")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise bad("seed", f"'seed' must be an integer >= 0, got {seed!r}")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise bad("stop", "'stop' must be a string or a list of at most 4 strings")
    if any(not s for s in stops):
        raise bad("stop", "'stop' strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        longest = max(len(s) for s in stops)
        raise bad("stop", f"'stop' strings must be at most {MAX_STOP_CHARS} characters long, got {longest}")
    for k, s in enumerate(stops):
        _check_text(s, "stop" if isinstance(stop, str) else f"stop[{k}]")
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    include_usage = bool(options and options.get("include_usage"))
    frames = _opt_int(body, "frames", 1)
    return ChatRequest(
        model=model, question=turns[-1][1], history=history, system="\n".join(system) if system else None, media=media,
        max_tokens=max_tokens, do_sample=temperature is not None and temperature > 0,
        temperature=float(temperature) if temperature else 1.0, top_p=float(top_p) if top_p is not None else 1.0,
        top_k=max(int(top_k or 0), 0), seed=seed, stop=stops, stream=stream, include_usage=include_usage, frames=frames,
        return_token_ids=_opt_bool(body, "return_token_ids"), ignore_eos=_opt_bool(body, "ignore_eos"),
        return_relevance=_opt_bool(body, "return_relevance"),
    )


# ---- responses -------------------------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, ids: list[int],
                    with_ids: bool, timings: dict, warnings: list[str]) -> dict:
    """A non-streamed answer. Extra fields: `choices[0].token_ids` (when asked for), `timings` (ms per stage) and
    `warnings` (e.g. a truncated video)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": None}
    if with_ids:
        choice["token_ids"] = list(ids)
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": [choice],
        "usage": usage(prompt_tokens, len(ids)), "timings": timings, "warnings": warnings,
    }


def chunk_body(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None, **extra: Any) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    if "token_ids" in extra:
        choice["token_ids"] = extra.pop("token_ids")
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice], **extra}


class _StopMatcher:
    """Knuth–Morris–Pratt automaton of one stop string, fed one character at a time. `state` is the length of the
    longest prefix of the stop string that ends the text seen so far. The failure table is grown only as far as
    `state` reaches, so a long stop string costs in proportion to the text generated, not to its own length."""

    def __init__(self, stop: str):
        self.stop, self.fail, self.state = stop, [0], 0

    def _fail(self, i: int) -> int:
        s, f = self.stop, self.fail
        while len(f) <= i:
            j, k = len(f), f[-1]
            while k and s[j] != s[k]:
                k = f[k - 1]
            f.append(k + 1 if s[j] == s[k] else k)
        return f[i]

    def step(self, c: str) -> bool:
        """Advance by one character; True when the stop string ends here."""
        s, q = self.stop, self.state
        while q and s[q] != c:
            q = self._fail(q - 1)
        if s[q] == c:
            q += 1
        self.state = q
        return q == len(s)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the stop string that ends first (the longest one when several end at one character), as
    `StreamText` cuts while streaming."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + best[1], best[0])):
            best = (i, len(s))
    return (text, False) if best is None else (text[: best[0]], True)


class StreamText:
    """Turns ids into text deltas as they come: incomplete UTF-8 pieces are held back, and so is any tail that could
    be the start of a stop string. `feed` returns (delta, stop_matched); the deltas joined with `finish()` equal the
    final text (the whole decoded answer, cut before the stop string that ends first).

    Detokenisation is incremental (as vLLM's `detokenize_incrementally`): each token decodes only the ids from
    the previous token's start, so the cost per token does not grow with the answer. Stop strings are scanned by
    one KMP automaton each over the new characters only: linear in the text, whatever the stop strings' length."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, list(stops)
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the text before the newest token's
        self._matchers = [_StopMatcher(s) for s in self.stops]
        self._pending = ""  # decoded, not emitted yet: a possible stop-string start
        self._emitted: list[str] = []
        self._final: str | None = None
        self.stopped = False

    @property
    def emitted(self) -> str:
        return "".join(self._emitted)

    def _new_text(self) -> str:
        before = self.decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        now = self.decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new, or an incomplete UTF-8 sequence
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def feed(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(int(token))
        self._final = None
        new = self._new_text()
        if not new:
            return "", False
        base = len(self._pending)
        self._pending += new
        if self._matchers:
            for i, c in enumerate(new):
                ended = [m for m in self._matchers if m.step(c)]
                if ended:
                    start = base + i + 1 - max(len(m.stop) for m in ended)
                    delta, self._pending, self.stopped = self._pending[:start], "", True
                    self._emitted.append(delta)
                    return delta, True
        hold = max((m.state for m in self._matchers), default=0)  # a tail that may grow into a stop string
        cut = len(self._pending) - hold
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        self._emitted.append(delta)
        return delta, False

    def text(self) -> str:
        if self._final is None:
            self._final = cut_at_stop(self.decode(self.ids), self.stops)[0]
        return self._final

    def finish(self) -> str:
        final, emitted = self.text(), self.emitted
        delta = final[len(emitted):] if final.startswith(emitted) else ""
        self._emitted, self._pending = [final], ""
        return delta
