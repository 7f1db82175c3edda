"""Engine tokenisation: the shared-vocabulary check, prompt formats, streaming detokenisation
and stop strings. Tokenizers are tiny ones built offline (tests/tiny_hf.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import tiny_hf
from eft_fast.engine.tokenization import (IncrementalDetokenizer, PromptFormat, check_same_vocabulary,
                                          encode_prompt, find_stop)

TOKENIZERS = {
    "byte_level_bpe": tiny_hf.byte_level_bpe,
    "metaspace_byte_fallback": tiny_hf.metaspace_byte_fallback,
    "word_level": tiny_hf.word_level,
}
TEXTS = [
    "hello world",
    "émoji 🙂 and 中文 text, café Ω",
    " the  quick fox 🙂🙂 naïve",
    "中文",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The byte-level tokenizer saved twice: as a base model's and, with a chat template, as a chat model's."""
    root = tmp_path_factory.mktemp("tokenizers")
    tok = tiny_hf.byte_level_bpe()
    tok.save_pretrained(root / "base")
    tok.chat_template = tiny_hf.CHAT_TEMPLATE
    tok.save_pretrained(root / "chat")
    return {"base": AutoTokenizer.from_pretrained(root / "base"), "chat": AutoTokenizer.from_pretrained(root / "chat")}


# ---------------------------------------------------------------- check_same_vocabulary


def test_same_vocabulary_returns_tokenizer_size(saved):
    tok = saved["base"]
    v = check_same_vocabulary({"knowledge": saved["base"], "tuned": saved["chat"], "reference": tok},
                              {"knowledge": len(tok), "tuned": len(tok) + 64, "reference": len(tok) + 7})
    assert v == len(tok) == 320


def test_same_vocabulary_skips_missing_tokenizers(saved):
    tok = saved["base"]
    assert check_same_vocabulary({"knowledge": None, "tuned": tok}, {"knowledge": 400, "tuned": 320}) == 320
    with pytest.raises(ValueError, match="at least one tokenizer"):
        check_same_vocabulary({"knowledge": None}, {"knowledge": 400})


def test_narrow_model_is_named():
    tok = tiny_hf.byte_level_bpe()
    with pytest.raises(ValueError, match=r"reference model's logits have 300 columns.*320 tokens"):
        check_same_vocabulary({"tuned": tok}, {"tuned": 320, "reference": 300})


def test_bad_sizes():
    tok = tiny_hf.word_level()
    with pytest.raises(TypeError, match=r"vocab_sizes\['tuned'\]"):
        check_same_vocabulary({"tuned": tok}, {"tuned": 30.0})
    with pytest.raises(TypeError, match=r"vocab_sizes\['tuned'\]"):
        check_same_vocabulary({"tuned": tok}, {"tuned": True})
    with pytest.raises(ValueError, match=r"vocab_sizes\['tuned'\] must be >= 1"):
        check_same_vocabulary({"tuned": tok}, {"tuned": 0})


def test_same_size_different_ids_is_an_error():
    a = tiny_hf.word_level()
    vocab = a.get_vocab()
    # Same size, same tokens, two ids swapped: a size check would pass.
    swapped = dict(vocab)
    swapped["hello"], swapped["world"] = vocab["world"], vocab["hello"]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(swapped, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    b = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    assert len(a) == len(b)
    with pytest.raises(ValueError) as info:
        check_same_vocabulary({"knowledge": a, "tuned": b}, {"knowledge": 64, "tuned": 64})
    msg = str(info.value)
    assert "knowledge" in msg and "tuned" in msg and "2 token id(s)" in msg
    assert f"id {vocab['hello']}: 'hello' (knowledge) vs 'world' (tuned)" in msg
    assert f"id {vocab['world']}: 'world' (knowledge) vs 'hello' (tuned)" in msg


def test_extra_special_token_is_an_error():
    a = tiny_hf.byte_level_bpe()
    b = tiny_hf.byte_level_bpe()
    b.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    expected = r"reference and tuned.*id 320: '<missing>' \(reference\) vs '<\|im_end\|>' \(tuned\)"
    with pytest.raises(ValueError, match=expected):
        check_same_vocabulary({"reference": a, "tuned": b}, {"reference": 400, "tuned": 400})


def test_different_tokenizers_are_an_error():
    with pytest.raises(ValueError, match=r"the knowledge and tuned tokenizers differ at \d+ token id\(s\)"):
        check_same_vocabulary({"knowledge": tiny_hf.byte_level_bpe(), "tuned": tiny_hf.metaspace_byte_fallback()},
                              {"knowledge": 400, "tuned": 400})


# ---------------------------------------------------------------- prompt formats


def test_auto_format_uses_chat_template_for_chat_tokenizer(saved):
    chat = saved["chat"]
    ids = encode_prompt("hello world", chat)
    expected = chat.apply_chat_template([{"role": "user", "content": "hello world"}],
                                        add_generation_prompt=True, return_dict=False)
    assert ids == list(expected)
    assert chat.decode(ids) == "<s><|user|>\nhello world</s>\n<|assistant|>\n"
    assert ids.count(chat.bos_token_id) == 1  # the template's BOS, not a second one from the tokenizer
    assert encode_prompt("hello world", chat, "chat") == ids


def test_auto_format_is_plain_for_base_tokenizer(saved):
    base = saved["base"]
    ids = encode_prompt("hello world", base)
    assert ids == base("hello world").input_ids
    assert ids[0] == base.bos_token_id and base.decode(ids[1:]) == "hello world"
    # A tokenizer that adds no BOS gets none.
    wl = tiny_hf.word_level()
    assert encode_prompt("hello world", wl) == [wl.convert_tokens_to_ids("hello"), wl.convert_tokens_to_ids("world")]


def test_plain_format_on_chat_tokenizer(saved):
    assert encode_prompt("hello world", saved["chat"], "plain") == saved["base"]("hello world").input_ids


def test_conversations_use_the_chat_template_or_a_transcript(saved):
    chat, base = saved["chat"], saved["base"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "why?"}]
    expected = chat.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert encode_prompt(messages, chat) == list(expected)
    assert base.decode(encode_prompt(messages, base)[1:]) == \
        "System: be brief\n\nUser: hi\n\nAssistant: hello\n\nUser: why?\n\nAssistant:"
    # a lone user message is its text for a base model, as a text prompt is
    assert encode_prompt([{"role": "user", "content": "hello world"}], base) == encode_prompt("hello world", base)
    assert encode_prompt([{"role": "user", "content": "x"}], base, "Q: {prompt}") == encode_prompt("Q: x", base)


@pytest.mark.parametrize("messages,error,match", [
    ([{"role": "robot", "content": "hi"}], ValueError, r"messages\[0\]\.role"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": 3}], TypeError, r"messages\[1\]\.content"),
    ([{"role": "user"}], TypeError, r"messages\[0\]\.content"),
    ([{"role": "user", "content": "ok"}, "text"], TypeError, r"messages\[1\] must be a dict"),
])
def test_bad_conversations(messages, error, match):
    from eft_fast.engine.tokenization import check_messages

    with pytest.raises(error, match=match):
        check_messages(messages)


def test_chat_format_needs_a_template(saved):
    with pytest.raises(ValueError, match=r"knowledge: prompt format 'chat' needs a tokenizer with a chat_template"):
        encode_prompt("hi", saved["base"], "chat", role="knowledge")


def test_format_string_and_callable(saved):
    base = saved["base"]
    expected = base("Q: {x} hello\nA:").input_ids
    assert encode_prompt("{x} hello", base, "Q: {prompt}\nA:") == expected  # braces in the prompt stay
    assert encode_prompt("{x} hello", base, lambda p: f"Q: {p}\nA:") == expected
    assert encode_prompt("hello", base, PromptFormat(kind="template", template="{prompt} {prompt}")) == \
        base("hello hello").input_ids
    with pytest.raises(TypeError, match="must return a str"):
        encode_prompt("hello", base, lambda p: 3)


def test_bad_format_specs():
    with pytest.raises(ValueError, match=r"containing '\{prompt\}'"):
        PromptFormat.from_spec("no placeholder")
    with pytest.raises(TypeError, match="prompt format must be"):
        PromptFormat.from_spec(3)
    with pytest.raises(ValueError, match="kind"):
        PromptFormat(kind="fancy")
    with pytest.raises(ValueError, match="template"):
        PromptFormat(kind="template", template="no placeholder")


def test_token_id_prompts_are_used_as_given(saved):
    ids = [5, 17, 3]
    for tok in (saved["chat"], saved["base"], None):
        for fmt in (None, "chat", "plain", "Q: {prompt}"):
            assert encode_prompt(ids, tok, fmt) == ids
    assert encode_prompt((5, torch.tensor(6)), saved["base"]) == [5, 6]


def test_bad_prompts(saved):
    base = saved["base"]
    with pytest.raises(ValueError, match=r"tuned: prompt token ids must be in \[0, 320\)"):
        encode_prompt([1, 320], base, role="tuned")
    with pytest.raises(ValueError, match=r"must be in \[0"):
        encode_prompt([-1], None)
    with pytest.raises(TypeError, match="must hold ints"):
        encode_prompt([1, 2.0], base)
    with pytest.raises(TypeError, match="must hold ints, got a bool"):
        encode_prompt([True], base)
    with pytest.raises(ValueError, match="empty"):
        encode_prompt([], base)
    with pytest.raises(ValueError, match="empty"):
        encode_prompt("", tiny_hf.word_level())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        encode_prompt("hi", None)
    with pytest.raises(TypeError, match="must be a str or a list"):
        encode_prompt(b"hi", base)


# ---------------------------------------------------------------- streaming detokenisation


def _stream(tok, ids):
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_real_text(name, text):
    tok = TOKENIZERS[name]()
    ids = tok(text, add_special_tokens=False).input_ids
    ids = ids[:2] + [tok.eos_token_id] + ids[2:] + [tok.eos_token_id]  # special tokens are skipped
    full = tok.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in full
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == full
    for piece in pieces:
        assert "\ufffd" not in piece  # a character split over byte tokens comes out whole
    for k in range(len(pieces)):
        assert full.startswith("".join(pieces[:k + 1]))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_of_random_ids(name, rng):
    tok = TOKENIZERS[name]()
    for _ in range(40):
        n = int(torch.randint(1, 40, (1,), generator=rng))
        ids = torch.randint(0, len(tok), (n,), generator=rng).tolist()
        pieces, rest = _stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=True), ids


def test_stream_holds_back_split_characters():
    # Byte-level BPE: "Ж" is two byte tokens; it comes out whole with the second.
    tok = tiny_hf.byte_level_bpe()
    ids = tok("a Ж", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["a", "Ġ", "Ð", "ĸ"]  # bytes 0xD0 0x96
    assert _stream(tok, ids) == (["a", " ", "", "Ж"], "")
    # Byte fallback: a run of <0xNN> tokens is final only when a token of another kind ends it.
    tok = tiny_hf.metaspace_byte_fallback()
    ids = tok("Ж hello", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁", "<0xD0>", "<0x96>", "▁hello"]
    assert _stream(tok, ids) == (["", "", "", "Ж hello"], "")
    assert _stream(tok, ids[:3]) == (["", "", ""], "Ж")
    # An unfinished character comes out (as U+FFFD) only on flush.
    pieces, rest = _stream(tok, ids[:2])
    assert pieces == ["", ""] and rest == tok.decode(ids[:2]) == "\ufffd"


# ---------------------------------------------------------------- stop strings


def test_find_stop_basics():
    assert find_stop("hello world", ["wor"], 0) == 6
    assert find_stop("hello world", ["xyz"], 0) is None
    assert find_stop("hello world", [], 0) is None
    assert find_stop("hello world", ["o", "ll"], 0) == 2  # the earliest occurrence of any stop
    assert find_stop("abcabc", ["bc"], 3) == 4  # "bc" at 1 ended before start
    assert find_stop("abcabc", ["bc"], 2) == 1  # ... but one ending at index 2 counts
    assert find_stop("abc", ["bc"], 10) is None
    assert find_stop("abc", ["abc"], -5) == 0


@pytest.mark.parametrize("stops", [["</s>"], ["\n\n", "User:"], ["aa"], ["🙂"]])
def test_find_stop_incrementally_matches_full_scan(stops, rng):
    alphabet = ["a", "b", "<", "/s", ">", "\n", "User", ":", "🙂", " "]
    for _ in range(50):
        pieces = [alphabet[int(i)] for i in torch.randint(0, len(alphabet), (30,), generator=rng)]
        text, cut = "", None
        for piece in pieces:
            checked = len(text)
            text += piece
            cut = find_stop(text, stops, checked)
            if cut is not None:
                break
        full_hits = [text.find(s) for s in stops if s in text]
        assert cut == (min(full_hits) if full_hits else None), (pieces, text)


def test_a_chat_template_that_refuses_the_messages_is_a_value_error():
    """Templates raise jinja2 errors for messages they do not take (e.g. "roles must
    alternate"): that is the caller's input, so a ValueError naming the messages, not a crash."""
    from jinja2.exceptions import TemplateError

    class Tokenizer:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, messages, **kwargs):
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="messages: .*roles must alternate"):
        PromptFormat(kind="chat").render(messages, Tokenizer())
