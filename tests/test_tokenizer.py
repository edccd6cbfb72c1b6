"""Tokenizer parity with the reference (golden cases, spec 8.6 ids) and the incremental detokenizer."""
import random
import re

import pytest

from nanoqwen.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(qwen_tiktoken) -> Tokenizer:
    return Tokenizer(qwen_tiktoken)


def test_special_ids_and_sizes(tok):
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.vocab_size == len(tok) == 151851 == tok.encoding.n_vocab
    assert len(tok.special_tokens) == 208
    assert tok.special_tokens["<|extra_0|>"] == 151646 and tok.special_tokens["<|extra_204|>"] == 151850
    assert tok.id_to_bytes(0) == b"!" and tok.id_to_bytes(151645) == b"<|im_end|>"


def test_from_pretrained(qwen_tiktoken, tmp_path):
    assert Tokenizer.from_pretrained(qwen_tiktoken.parent).encode("Hello world") == [9707, 1879]
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_vocab_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        Tokenizer(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken, line 2"):
        Tokenizer(bad)
    short = tmp_path / "short.tiktoken"
    short.write_text("IQ== 0\n\nIg== 1\n")
    with pytest.raises(ValueError, match=r"short.tiktoken: expected the Qwen vocabulary"):
        Tokenizer(short)


def test_golden_cases(tok, tiny_ref):
    cases = tiny_ref["tokenizer"]["cases"]
    assert cases
    for case in cases:
        text = case["text"]
        assert tok.encode(text) == case["ids_allowed_all"], text
        assert tok.encode(text, allowed_special=set()) == case["ids_no_special"], text
        assert tok.decode(case["ids_allowed_all"]) == case["decoded"], text
        assert tok.decode(case["ids_no_special"]) == case["decoded"], text


def test_golden_decode_cases(tok, tiny_ref):
    for case in tiny_ref["tokenizer"]["decode_cases"]:
        assert tok.decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("text, ids", [
    ("\n", [198]), ("\n\n", [271]), ("system", [8948]), ("user", [872]), ("assistant", [77091]),
    ("Human:", [33975, 25]), ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
    ("你好", [108386]), ("Hello world", [9707, 1879]), ("Panda", [47, 9817]), (" Panda", [72410]),
])
def test_spec_reference_ids(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_chatml_string_example(tok):
    """Spec 9.1: encoding the whole ChatML string (specials allowed) gives the 20 reference ids."""
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    ids = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
           151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_special_token_modes(tok):
    text = 'print("<|endoftext|>")'
    assert tok.encode(text) == [1350, 445, 151643, 899]
    assert tok.encode(text, allowed_special=set()) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [1350, 445, 151643, 899]
    # allowing only other specials leaves this one as text
    assert tok.encode(text, allowed_special={"<|im_end|>"}) == tok.encode(text, allowed_special=set())
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode(text, allowed_special=set(), disallowed_special="all")
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode(text, allowed_special=set(), disallowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError, match="not Qwen special tokens"):
        tok.encode(text, allowed_special={"<|bogus|>"})
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")


def test_nfc(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.decode(tok.encode("cafe\u0301")) == "caf\u00e9"


def test_digits_split_one_by_one(tok):
    assert tok.encode("12345") == [16, 17, 18, 19, 20]
    assert tok.encode("x 2024") == tok.encode("x ") + [17, 15, 17, 19]
    assert tok.encode("٣٤") == tok.encode("٣") + tok.encode("٤")  # any \p{N}, not only ASCII digits


def test_round_trips(tok):
    for text in ["", " ", "a\n\n\tb  ", "混合 text 和数字 2024!", "<|im_start|>x<|im_end|><|extra_204|>",
                 "\U0001F600\U0001F601 \u200b zero-width", "   \r\n  trailing   "]:
        for allowed in ("all", set()):
            assert tok.decode(tok.encode(text, allowed_special=allowed)) == text


def test_decode_skip_special_and_padding_rows(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>") + [151850, 151851, 151935, 152063]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><|extra_204|>"  # padding rows -> ""
    assert tok.id_to_bytes(151900) == b""
    assert tok.decode([51461], errors="ignore") == " "
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])


def _stream(tok, ids, skip_special_tokens=False, chunk_sizes=(1, 2, 3, 5)):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    rng = random.Random(len(ids))
    pieces, i = [], 0
    while i < len(ids):
        n = rng.choice(chunk_sizes)
        pieces.append(detok.push(ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


def test_detokenizer_holds_back_split_characters(tok):
    detok = IncrementalDetokenizer(tok)
    assert detok.push([51461]) == " "  # b" \xe6\xa0": the space is out, the half character waits
    assert detok.push(117) == "根"
    assert detok.flush() == ""
    detok.push([51461])
    assert detok.flush() == "\ufffd"
    assert detok.push([9707]) == "Hello"  # flush reset the stream


def test_detokenizer_matches_decode_on_random_ids(tok):
    rng = random.Random(0)
    # bias towards byte tokens (ids < 256) and known split tokens so incomplete UTF-8 is common
    pool = list(range(256)) + [51461, 117, 108386, 145375, 235, 97, 244, 151643, 151645, 151700, 151851, 151935]
    for trial in range(300):
        n = rng.randint(0, 40)
        ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(151936) for _ in range(n)]
        for skip in (False, True):
            pieces = _stream(tok, ids, skip_special_tokens=skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip, errors="replace"), (trial, ids)


def test_detokenizer_streams_real_text(tok):
    text = "emoji 👍🏽 and 🤖, 日本語のテキストです。 Привет!"
    ids = tok.encode(text)
    pieces = _stream(tok, ids, chunk_sizes=(1,))
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
