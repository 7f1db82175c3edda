"""Tokenizer plumbing for the engine: the shared-vocabulary check, per-model prompt formats,
streaming detokenisation and stop strings.

EFT adds log-probabilities of several models token by token, so the models must agree on what
every token id means; :func:`check_same_vocabulary` compares id -> token maps, not sizes. Each
model may see its own rendering of a prompt (the tuned chat model its chat template, base models
the raw text), so :func:`encode_prompt` is called once per model; the generated ids are shared.
"""
from __future__ import annotations

import operator
import re
import weakref
from dataclasses import dataclass
from collections.abc import Mapping as MappingABC, Sequence as SequenceABC
from typing import Callable, Mapping, Sequence

_MAX_SHOWN_DIFFS = 5
_MISSING = "<missing>"


# ---------------------------------------------------------------- vocabulary


def _id_to_token(tokenizer) -> dict[int, str]:
    """id -> token string over the whole vocabulary, added and special tokens included."""
    mapping = {int(i): tok for tok, i in tokenizer.get_vocab().items()}
    for tok, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        if i is not None:
            mapping.setdefault(int(i), tok)
    return mapping


def _tokenizer_size(tokenizer, mapping: dict[int, str]) -> int:
    return max(len(tokenizer), max(mapping, default=-1) + 1)


def check_same_vocabulary(tokenizers: Mapping[str, object], vocab_sizes: Mapping[str, int]) -> int:
    """Check that every tokenizer maps every token id to the same token; return the common V.

    Args:
        tokenizers: role -> Hugging Face tokenizer ("knowledge", "tuned", ...). None values are skipped
            (a model without a tokenizer of its own); at least one tokenizer is needed.
        vocab_sizes: role -> the width of that model's logits (``config.vocab_size``).

    Returns:
        V, the tokenizer's vocabulary size (``len(tokenizer)``), to pass as ``eft_sample(vocab_size=V)``.
        Logit columns at or beyond V (padded embedding rows) are ignored by the op.

    Raises:
        ValueError: two tokenizers differ (the message names both roles and shows example ids with
            both tokens), or a model's logits are narrower than V (the message names the model).
        TypeError: a size is not an int.
    """
    present = {role: tok for role, tok in tokenizers.items() if tok is not None}
    if not present:
        raise ValueError("check_same_vocabulary needs at least one tokenizer; pass tokenizer=...")
    for role, size in vocab_sizes.items():
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"vocab_sizes[{role!r}] must be an int, got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"vocab_sizes[{role!r}] must be >= 1, got {size}")

    roles = list(present)
    base_role = roles[0]
    base = _id_to_token(present[base_role])
    vocab = _tokenizer_size(present[base_role], base)
    for role in roles[1:]:
        if present[role] is present[base_role]:
            continue
        other = _id_to_token(present[role])
        diffs = [] if other == base else [i for i in sorted(base.keys() | other.keys()) if base.get(i) != other.get(i)]
        if diffs:
            shown = "; ".join(f"id {i}: {base.get(i, _MISSING)!r} ({base_role}) vs {other.get(i, _MISSING)!r} ({role})"
                              for i in diffs[:_MAX_SHOWN_DIFFS])
            raise ValueError(
                f"the {base_role} and {role} tokenizers differ at {len(diffs)} token id(s) "
                f"(sizes {len(present[base_role])} and {len(present[role])}), e.g. {shown}. "
                f"EFT combines models token by token, so all models must share one vocabulary")
        vocab = max(vocab, _tokenizer_size(present[role], other))

    for role, size in vocab_sizes.items():
        if size < vocab:
            raise ValueError(f"the {role} model's logits have {size} columns (config.vocab_size) but the "
                             f"tokenizer has {vocab} tokens; that model cannot score every token")
    return vocab


# ---------------------------------------------------------------- prompt formats


Messages = list[dict[str, str]]   # a conversation: [{"role": "user", "content": "..."}, ...]
MESSAGE_ROLES = ("system", "user", "assistant")


def is_messages(prompt) -> bool:
    """Whether ``prompt`` is a conversation (a non-empty list of role/content mappings)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, MappingABC) for m in prompt)


def check_messages(messages) -> Messages:
    """A conversation as the engine takes it: each message a mapping with "role" (system, user
    or assistant) and "content" (a str); returns plain dicts. TypeError / ValueError name the
    message at fault."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, MappingABC):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {MESSAGE_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be a str, got {type(content).__name__}")
        out.append({"role": role, "content": check_prompt(content)})
    if not out:
        raise ValueError("messages is empty")
    return out


def transcript(messages: Messages) -> str:
    """A conversation as plain text, for a model without a chat template: a lone user message
    is its content; otherwise "Role: content" paragraphs ending with "Assistant:"."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


@dataclass(frozen=True)
class PromptFormat:
    """How one model sees a text prompt or a conversation.

    kind:
        "auto"     -> "chat" if the tokenizer has a chat template, else "plain" (the default);
        "chat"     -> ``apply_chat_template(messages, add_generation_prompt=True)``, where a text
                      prompt is one user message;
        "plain"    -> the raw text (a conversation: its :func:`transcript`), encoded with the
                      tokenizer's own special tokens (BOS if it adds one);
        "template" -> ``template`` with every "{prompt}" replaced by the text, then as "plain";
        "callable" -> ``fn(text)``, then as "plain".
    Token-id prompts ignore the format: they are given to every model as they are.
    """

    kind: str = "auto"
    template: str | None = None
    fn: Callable[[str], str] | None = None

    def __post_init__(self):
        if self.kind not in ("auto", "chat", "plain", "template", "callable"):
            raise ValueError(f"PromptFormat kind must be auto, chat, plain, template or callable, got {self.kind!r}")
        if (self.kind == "template") != (self.template is not None):
            raise ValueError("PromptFormat: a template is given exactly when kind == 'template'")
        if self.kind == "template" and "{prompt}" not in self.template:
            raise ValueError(f"PromptFormat template must contain '{{prompt}}', got {self.template!r}")
        if (self.kind == "callable") != (self.fn is not None):
            raise ValueError("PromptFormat: fn is given exactly when kind == 'callable'")
        if self.fn is not None and not callable(self.fn):
            raise TypeError(f"PromptFormat fn must be callable, got {type(self.fn).__name__}")

    @classmethod
    def from_spec(cls, spec: PromptFormat | str | Callable[[str], str] | None) -> PromptFormat:
        """None / "auto" / "chat" / "plain" / a string with "{prompt}" / a callable str -> str."""
        if spec is None:
            return cls()
        if isinstance(spec, PromptFormat):
            return spec
        if isinstance(spec, str):
            if spec in ("auto", "chat", "plain"):
                return cls(kind=spec)
            if "{prompt}" in spec:
                return cls(kind="template", template=spec)
            raise ValueError(f"prompt format must be 'auto', 'chat', 'plain', a string containing "
                             f"'{{prompt}}' or a callable, got {spec!r}")
        if callable(spec):
            return cls(kind="callable", fn=spec)
        raise TypeError(f"prompt format must be a str, a callable or a PromptFormat, got {type(spec).__name__}")

    def resolved_kind(self, tokenizer) -> str:
        if self.kind != "auto":
            return self.kind
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"

    def render(self, prompt: str | Messages, tokenizer) -> str:
        """The text this model sees (for "chat", the rendered chat template)."""
        kind = self.resolved_kind(tokenizer)
        if kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("prompt format 'chat' needs a tokenizer with a chat_template")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            from jinja2.exceptions import TemplateError

            try:
                return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as exc:   # e.g. "roles must alternate": the caller's messages
                raise ValueError(f"messages: the model's chat template refused them: {exc}") from exc
        if not isinstance(prompt, str):
            prompt = transcript(prompt)
        if kind == "template":
            return self.template.replace("{prompt}", prompt)
        if kind == "callable":
            text = self.fn(prompt)
            if not isinstance(text, str):
                raise TypeError(f"the prompt format callable must return a str, got {type(text).__name__}")
            return text
        return prompt

    def encode(self, prompt: str | Messages, tokenizer) -> list[int]:
        text = self.render(prompt, tokenizer)
        # A rendered chat template already holds its special tokens (BOS included, where the
        # template has one); every other format gets them from the tokenizer.
        add_special = self.resolved_kind(tokenizer) != "chat"
        return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def _check_token_ids(ids, tokenizer, role: str | None) -> list[int]:
    where = f"{role}: " if role else ""
    out = []
    for t in ids:
        if isinstance(t, bool):
            raise TypeError(f"{where}token-id prompts must hold ints, got a bool")
        try:
            out.append(operator.index(t))
        except TypeError:
            raise TypeError(f"{where}token-id prompts must hold ints, got {type(t).__name__}") from None
    size = len(tokenizer) if tokenizer is not None else None
    bad = [t for t in out if t < 0 or (size is not None and t >= size)]
    if bad:
        raise ValueError(f"{where}prompt token ids must be in [0, {size if size is not None else 'vocab'}), "
                         f"got {bad[:5]}")
    return out


def check_prompt(prompt) -> str | list:
    """A prompt as the engine takes it: a str, a conversation (a list of {"role", "content"}
    dicts, see :func:`check_messages`), or token ids (a list, tuple or other sequence, or a
    1-D tensor / array) as a list. Raises TypeError for anything else (None, bytes, a number,
    a dict) and ValueError for text that is not valid Unicode (a lone surrogate)."""
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the prompt is not valid Unicode text: {e.reason} at character {e.start} "
                             f"({prompt[e.start:e.end]!r})") from None
        return prompt
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__} "
                        "(decode bytes to text first, e.g. prompt.decode('utf-8'))")
    if hasattr(prompt, "tolist") and getattr(prompt, "ndim", None) == 1:   # a 1-D tensor or array of ids
        return prompt.tolist()
    if is_messages(prompt):
        return check_messages(prompt)
    if isinstance(prompt, SequenceABC):
        return list(prompt)
    raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")


def encode_prompt(prompt: str | Messages | Sequence[int], tokenizer, fmt=None, *, role: str | None = None
                  ) -> list[int]:
    """One model's prompt token ids.

    Args:
        prompt: text, a conversation (checked by :func:`check_messages`), or token ids (a list /
            tuple of ints) used as given for every model.
        tokenizer: that model's tokenizer (may be None for token-id prompts).
        fmt: a :class:`PromptFormat` or anything :meth:`PromptFormat.from_spec` takes (None = "auto").
        role: the model's role, used in error messages.
    """
    where = f"{role}: " if role else ""
    if isinstance(prompt, str) or is_messages(prompt):
        if tokenizer is None:
            raise ValueError(f"{where}a text prompt needs a tokenizer; pass tokenizer=... or token ids")
        try:
            ids = PromptFormat.from_spec(fmt).encode(prompt, tokenizer)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from e
    elif isinstance(prompt, (list, tuple)):
        ids = _check_token_ids(prompt, tokenizer, role)
    else:
        raise TypeError(f"{where}a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{where}the prompt is empty (no tokens)")
    return ids


# ---------------------------------------------------------------- streaming text


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_TOKEN_CLASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_classes(tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """(ids that decode(..., skip_special_tokens=True) drops, byte-fallback ids "<0xNN>"),
    cached per tokenizer: reading a large vocabulary takes tens of milliseconds."""
    size = len(tokenizer)
    cached = _TOKEN_CLASSES.get(tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1], cached[2]
    skipped = {i for i in tokenizer.all_special_ids if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    skipped.update(i for i, tok in added.items() if getattr(tok, "special", False))
    byte_ids = {i for tok, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(tok)}
    result = (frozenset(skipped), frozenset(byte_ids))
    try:
        _TOKEN_CLASSES[tokenizer] = (size, *result)
    except TypeError:  # not weakly referenceable: just do not cache
        pass
    return result


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    ``push(id)`` returns the text that became final with that token; ``flush()`` returns the rest.
    All pieces joined equal ``tokenizer.decode(all_ids, skip_special_tokens=True)``.

    Each push decodes only a short window: the tokens since the last emitted piece plus the
    last emitted piece itself (its anchor). Decoders that add or drop a leading space at the
    start of a decode (SentencePiece's metaspace, word-level joins) treat the anchor the same
    way in both decodes, so the difference is exactly the new text. Text is held back while it
    may still change:
    - it ends in U+FFFD: usually a UTF-8 character split over byte tokens, completed by a later one;
    - the last token is a byte-fallback token "<0xNN>": such a decoder turns a whole run of byte
      tokens into U+FFFDs, valid characters included, if the run as a whole is not valid UTF-8,
      so a run is final only once a token of another kind ends it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._skipped, self._byte_ids = _token_classes(tokenizer)
        self._prefix = 0  # window start: the anchor tokens, already emitted
        self._read = 0  # tokens up to here are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _window(self) -> tuple[str, str]:
        emitted = self._decode(self.token_ids[self._prefix:self._read])
        return emitted, self._decode(self.token_ids[self._prefix:])

    def _in_byte_run(self) -> bool:
        for t in reversed(self.token_ids[self._read:]):
            if t not in self._skipped:
                return t in self._byte_ids
        return False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly final text ("" if none yet)."""
        self.token_ids.append(operator.index(token_id))
        if self._in_byte_run():
            return ""
        emitted, text = self._window()
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._advance()
        return text[len(emitted):]

    def flush(self) -> str:
        """Return all text not yet returned (held-back replacement characters included)."""
        emitted, text = self._window()
        self._advance()
        return text[len(emitted):]

    def _advance(self) -> None:
        n = len(self.token_ids)
        prefix = self._read
        # The anchor must hold a token that decodes to something; a window that starts after
        # only skipped (special) tokens would lose the separator before the next word.
        if all(t in self._skipped for t in self.token_ids[prefix:n]):
            prefix = next((i for i in range(prefix - 1, -1, -1) if self.token_ids[i] not in self._skipped), 0)
        self._prefix, self._read = prefix, n


# ---------------------------------------------------------------- stop strings


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index where ``text`` is cut for the earliest stop string that ends at or after ``start``.

    ``start`` is how much of ``text`` was already checked: an occurrence must end at index
    >= start (its last character is new), so a streaming caller rescans only the tail. The
    result is the occurrence's first index (the stop string is not part of the output); None
    if no stop string occurs there.
    """
    start = max(0, start)
    best = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
