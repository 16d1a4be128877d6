"""Conversation templates as data: how a checkpoint's LLM expects a conversation to be laid out (no torch, no jinja).

A template is a handful of strings with one `{content}` slot each, recorded in the checkpoint's config.json
(`conversation_template`) and in export.json, so `generate`, `export`, `ask`, `chat` and the server render the same
prompt. Released PPLLaVA checkpoints have none and use the authors' `plain_v1` (Vicuna) or `plain_qwen` (Qwen2):

    USER: <image>\\n{question} ASSISTANT:                      (BOS first; earlier turns end with </s>)
    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n      (no BOS)

`make-checkpoint --llm` derives the template from the LLM's own chat template (a Jinja string: the GGUF's
`tokenizer.chat_template` or tokenizer_config.json's `chat_template`) by rendering probe conversations, and keeps it
only if the derived strings re-render every probe exactly (`derive_template`). SmolLM2-Instruct's is ChatML with a
default system message.

`render(template, messages)` gives `Segment`s: template text (whose special-token literals such as `<|im_end|>` or
`</s>` become their ids), message content (typed text: a literal `<|im_end|>` or `<image>` in it stays text) and the
one image placeholder, which joins the first user message as `image` says (`"<image>\\n{content}"`, as the authors'
prompts do). `tokenization.LlamaPromptTokenizer` turns segments into ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from .errors import ConfigError, InputError

SLOT = "{content}"
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    kind: str  # "text" (template literal), "content" (a message's text) or "image"
    text: str


@dataclass(frozen=True)
class ConversationTemplate:
    """Strings with one `{content}` slot; see the module doc.

    Attributes:
        name: a label (`plain_v1`, `chatml`, or `derived`).
        system / user / assistant: one message of that role.
        generation: what opens the assistant's answer (`add_generation_prompt`).
        prelude: text at the start of every conversation (e.g. a BOS literal some chat templates write).
        default_system: the system message used when a conversation has none (None: no system message).
        image: how the image placeholder joins the first user message.
        bos: start with the tokenizer's BOS (its post-processor) and the sentencepiece dummy prefix, as the authors'
            Vicuna prompt does; chat templates write what they need themselves (False).
        source: where it came from (for humans).
    """

    name: str
    system: str
    user: str
    assistant: str
    generation: str
    prelude: str = ""
    default_system: str | None = None
    image: str = IMAGE_TOKEN + "\n" + SLOT
    bos: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        for field_name in ("system", "user", "assistant", "image"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or value.count(SLOT) != 1:
                raise ConfigError(f"conversation template {self.name!r}: '{field_name}' must be a string with exactly one {SLOT} slot, got {value!r}")
        for field_name in ("generation", "prelude"):
            if not isinstance(getattr(self, field_name), str) or SLOT in getattr(self, field_name):
                raise ConfigError(f"conversation template {self.name!r}: '{field_name}' must be a string without a {SLOT} slot")
        if IMAGE_TOKEN not in self.image:
            raise ConfigError(f"conversation template {self.name!r}: 'image' must hold the placeholder {IMAGE_TOKEN}, got {self.image!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> ConversationTemplate:
        """A template from config.json / export.json; None (released checkpoints, older exports): plain_v1."""
        if data is None:
            return PLAIN_V1
        if not isinstance(data, Mapping):
            raise ConfigError(f"conversation_template must be a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        missing = sorted(k for k in ("name", "system", "user", "assistant", "generation") if k not in data)
        if unknown or missing:
            raise ConfigError(f"conversation_template: unknown keys {unknown}, missing keys {missing} (keys: {', '.join(sorted(known))})")
        return cls(**dict(data))

    def prompt_text(self, question: str = "{question}") -> str:
        """The text of a one-question prompt (with the image), e.g. "USER: <image>\\n{question} ASSISTANT: "."""
        return "".join(s.text for s in render(self, [{"role": "user", "content": question}]))


# The authors' plain_v1 (ppllava/conversation/conv.py): system "", roles "USER: " / "ASSISTANT: ", separators " "
# and "</s>"; the tokenizer adds BOS. One question: "USER: <image>\n{q} ASSISTANT: ".
PLAIN_V1 = ConversationTemplate(
    name="plain_v1",
    system=SLOT + " ",
    user="USER: " + SLOT + " ",
    assistant="ASSISTANT: " + SLOT + "</s>",
    generation="ASSISTANT: ",
    bos=True,
    source="the authors' plain_v1 (Vicuna)",
)

# The authors' plain_qwen (ppllava/conversation/conv.py, the Qwen2 release): system "" (a system text would be written
# bare, followed by the user separator), roles "<|im_start|>user\n" / "<|im_start|>assistant\n", separators
# "<|im_end|>\n" for both, mm_token "<image>\n"; Qwen2's tokenizer adds no BOS. One question:
# "<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n".
PLAIN_QWEN = ConversationTemplate(
    name="plain_qwen",
    system=SLOT + "<|im_end|>\n",
    user="<|im_start|>user\n" + SLOT + "<|im_end|>\n",
    assistant="<|im_start|>assistant\n" + SLOT + "<|im_end|>\n",
    generation="<|im_start|>assistant\n",
    bos=False,
    source="the authors' plain_qwen (Qwen2)",
)


def _check_messages(messages: Sequence[Mapping]) -> None:
    if not messages:
        raise InputError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"message {i} must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")
    if not any(m["role"] == "user" for m in messages):
        raise InputError("a conversation needs a user message (the image joins the first one)")


def _piece(fmt: str, content: str | None) -> list[Segment]:
    before, _, after = fmt.partition(SLOT)
    out = [Segment("text", before)] if before else []
    if content is not None:
        out.append(Segment("content", content))
    if after:
        out.append(Segment("text", after))
    return out


def render(template: ConversationTemplate, messages: Sequence[Mapping], add_generation_prompt: bool = True, image: int = 1) -> list[Segment]:
    """Segments of a conversation: [{'role': 'system'|'user'|'assistant', 'content': str}, ...], oldest first.

    `image` placeholders join the first user message (`template.image`'s text around the slot once per image, so
    several images read "<image>\\n<image>\\n{content}" as the authors' `user_query` makes every `<image>` of a
    multi-image question `<image>\\n`); 0 (or False): none. The default system message is added when the
    conversation has no system message; `add_generation_prompt` opens the answer.
    """
    _check_messages(messages)
    segs: list[Segment] = [Segment("text", template.prelude)] if template.prelude else []
    if messages[0]["role"] != "system" and template.default_system is not None:
        segs += _piece(template.system, template.default_system)
    placed = not image
    for m in messages:
        fmt = getattr(template, m["role"])
        if m["role"] == "user" and not placed:
            placed = True
            img_before, _, img_after = template.image.partition(SLOT)
            before, _, after = fmt.partition(SLOT)
            parts = [Segment("text", before)] if before else []
            parts += _image_segments(img_before) * int(image)
            parts.append(Segment("content", m["content"]))
            parts += _image_segments(img_after) * int(image)
            if after:
                parts.append(Segment("text", after))
            segs += parts
        else:
            segs += _piece(fmt, m["content"])
    if add_generation_prompt:
        segs.append(Segment("text", template.generation))
    return _merge_text([s for s in segs if s.text or s.kind == "content"])


def _image_segments(text: str) -> list[Segment]:
    out: list[Segment] = []
    for i, part in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            out.append(Segment("image", IMAGE_TOKEN))
        if part:
            out.append(Segment("text", part))
    return out


def _merge_text(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segs:
        if out and s.kind == "text" and out[-1].kind == "text":
            out[-1] = Segment("text", out[-1].text + s.text)
        else:
            out.append(s)
    return out


def render_text(template: ConversationTemplate, messages: Sequence[Mapping], add_generation_prompt: bool = True, image: bool = True) -> str:
    """The conversation as one string (what a chat template's Jinja renders)."""
    return "".join(s.text for s in render(template, messages, add_generation_prompt, image))


def history_messages(question: str, history: Iterable[tuple[str, str]] = (), system: str | None = None) -> list[dict]:
    """Messages for earlier (user, assistant) turns, oldest first, then `question`; `system` first when given."""
    if not isinstance(question, str):
        raise InputError(f"question must be a str, got {type(question).__name__}.")
    if system is not None and not isinstance(system, str):
        raise InputError(f"system must be a str, got {type(system).__name__}.")
    msgs: list[dict] = [{"role": "system", "content": system}] if system else []
    for turn in history:
        if len(turn) != 2 or not all(isinstance(t, str) for t in turn):
            raise InputError(f"history must hold (user, assistant) string pairs, got {turn!r}.")
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return msgs + [{"role": "user", "content": question}]


# ---- deriving a template from a chat template (Jinja) ------------------------------------------------------------
# Markers that no template writes itself; each probe message's content is one of them.
_S, _U, _A, _V, _B = ("\x02S\x03", "\x02U\x03", "\x02A\x03", "\x02V\x03", "\x02B\x03")

RenderFn = Callable[[list[dict], bool], str]


def _between(text: str, markers: Sequence[str]) -> list[str]:
    """The texts before, between and after `markers` (each must occur once, in order)."""
    out, pos = [], 0
    for m in markers:
        i = text.find(m, pos)
        if i < 0 or text.count(m) != 1:
            raise ValueError(f"marker {m!r} not rendered exactly once")
        out.append(text[pos:i])
        pos = i + len(m)
    out.append(text[pos:])
    return out


def derive_template(render_chat: RenderFn, name: str = "derived", source: str = "") -> ConversationTemplate:
    """Read a chat template's layout off its output on probe conversations, then check it re-renders them exactly.

    Args:
        render_chat: (messages, add_generation_prompt) -> the chat template's text.

    Raises:
        ConfigError: the chat template does not follow a fixed per-role layout (e.g. Llama-2's `[INST]`, which puts
            the system message inside the first user turn), or it changes text between the probes.
    """
    def fail(why: str) -> ConfigError:
        return ConfigError(f"cannot read the chat template as per-role strings ({why}).\n"
                           "Note: ppllava-edge records templates where every message is <prefix>content<suffix> by role "
                           "(ChatML, Vicuna, Llama-3, Zephyr style).")

    try:
        (head_u, after_u) = _between(render_chat([{"role": "user", "content": _U}], False), [_U])
        with_gen = render_chat([{"role": "user", "content": _U}], True)
        (_, after_u_gen) = _between(with_gen, [_U])
        four = render_chat([{"role": "user", "content": _U}, {"role": "assistant", "content": _A},
                            {"role": "user", "content": _V}, {"role": "assistant", "content": _B}], False)
        _, x1, y1, x2, y2 = _between(four, [_U, _A, _V, _B])
        sys_text = render_chat([{"role": "system", "content": _S}, {"role": "user", "content": _U}], False)
        head_s, q, _ = _between(sys_text, [_S, _U])
    except ValueError as exc:
        raise fail(str(exc)) from exc
    user_suffix = after_u
    if not after_u_gen.startswith(user_suffix):
        raise fail("the generation prompt does not follow the user message")
    generation = after_u_gen[len(user_suffix):]
    assistant_suffix = y2
    if not (y1.startswith(assistant_suffix) and x1.startswith(user_suffix) and x1 == x2):
        raise fail("messages of one role are not laid out the same way each time")
    user_prefix = y1[len(assistant_suffix):]
    assistant_prefix = x1[len(user_suffix):]
    if not head_u.endswith(user_prefix) or not q.endswith(user_prefix):
        raise fail("the first user message has another prefix than later ones")
    system_suffix = q[: len(q) - len(user_prefix)]
    start_u = head_u[: len(head_u) - len(user_prefix)]  # prelude (+ the default system message)
    # head_s = prelude + system prefix. Without a default system message start_u is the prelude alone; with one,
    # every conversation has a system message, so the prelude can stay "" (it always precedes the system prefix).
    if head_s.startswith(start_u):
        prelude, sys_prefix, default = start_u, head_s[len(start_u):], None
    elif start_u.startswith(head_s) and start_u.endswith(system_suffix) and len(start_u) >= len(head_s) + len(system_suffix):
        prelude, sys_prefix, default = "", head_s, start_u[len(head_s): len(start_u) - len(system_suffix)]
    else:
        raise fail("the system message changes the start of the conversation")
    template = ConversationTemplate(
        name=name, system=sys_prefix + SLOT + system_suffix, user=user_prefix + SLOT + user_suffix,
        assistant=assistant_prefix + SLOT + assistant_suffix, generation=generation, prelude=prelude, default_system=default,
        bos=False, source=source,
    )
    probes: list[tuple[list[dict], bool]] = [
        ([{"role": "user", "content": "Hello?"}], True),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], True),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
          {"role": "user", "content": "c"}], True),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "a"}], False),
    ]
    for msgs, gen in probes:
        want = render_chat(msgs, gen)
        got = render_text(template, msgs, gen, image=False)
        if got != want:
            raise fail(f"derived strings render {got!r} where the chat template renders {want!r}")
    return template


def jinja_renderer(chat_template: str, bos_token: str = "", eos_token: str = "") -> RenderFn:
    """Render a Hugging Face chat template (Jinja) the way transformers does: sandboxed, trim_blocks,
    lstrip_blocks, `raise_exception`, `bos_token` / `eos_token` variables. Needs jinja2 (make-checkpoint only)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(chat_template)
    except TemplateError as exc:
        raise ConfigError(f"the chat template is not valid Jinja: {exc}") from exc

    def render_chat(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)
        except TemplateError as exc:
            raise ConfigError(f"the chat template failed on a probe conversation: {exc}") from exc

    return render_chat
