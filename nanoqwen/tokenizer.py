"""The Qwen (v1) tokenizer: byte-level BPE on tiktoken, plus an incremental detokenizer for streaming.

Reference behaviour (QWEN_V1_SPEC.md section 8): `qwen.tiktoken` holds 151,643 byte tokens whose rank is
their id; 208 special tokens follow at fixed ids 151643..151850; text is NFC-normalised before encoding;
by default the surface forms of special tokens in the text ARE encoded as control tokens (the reference's
injection-unsafe default, kept for parity: chat content goes through `allowed_special=set()` instead).
"""
import base64
import codecs
import unicodedata
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Literal

import tiktoken

VOCAB_FILENAME = "qwen.tiktoken"
N_BYTE_TOKENS = 151643  # lines in qwen.tiktoken; the first special id follows them

# Qwen's pre-tokenizer: cl100k's, except `\p{N}` takes ONE digit, so "12345" becomes five tokens.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EOD_ID, IM_START_ID, IM_END_ID = N_BYTE_TOKENS, N_BYTE_TOKENS + 1, N_BYTE_TOKENS + 2
SPECIAL_TOKENS = {
    tok: N_BYTE_TOKENS + i
    for i, tok in enumerate([ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(205)])
}
VOCAB_SIZE = N_BYTE_TOKENS + len(SPECIAL_TOKENS)  # 151851; embedding rows beyond it are untrained padding


def load_tiktoken_bpe(vocab_file) -> dict[bytes, int]:
    """Read `qwen.tiktoken` (lines `<base64 bytes> <rank>`) into {token bytes: rank}.

    Parsed here rather than with tiktoken's loader so that a broken or foreign file fails with its name and
    line number, and because the special-token ids assume exactly ranks 0..151642.
    """
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer vocabulary {path} not found: pass the `{VOCAB_FILENAME}` file of a Qwen (v1) checkpoint "
            "(it sits beside config.json in the Hugging Face repo)")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token_b64, rank_text = line.split()
                token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
            except ValueError:
                raise ValueError(
                    f"{path}, line {lineno}: expected `<base64 bytes> <rank>`, got {line[:80]!r}; "
                    f"the file is not a tiktoken vocabulary: re-download `{VOCAB_FILENAME}`") from None
            if token in ranks:
                raise ValueError(f"{path}, line {lineno}: token {token!r} appears twice; "
                                 f"the file is corrupt: re-download `{VOCAB_FILENAME}`")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(N_BYTE_TOKENS)):
        raise ValueError(
            f"{path}: expected the Qwen vocabulary with ranks 0..{N_BYTE_TOKENS - 1} each once, got "
            f"{len(ranks)} tokens; this is not Qwen (v1)'s `{VOCAB_FILENAME}` (or it is truncated): re-download it")
    return ranks


class Tokenizer:
    """Qwen (v1) tokenizer: `encode` text to ids and `decode` ids to text exactly as the reference does."""

    def __init__(self, vocab_file):
        self.vocab_file = Path(vocab_file)
        ranks = load_tiktoken_bpe(self.vocab_file)
        self.special_tokens: dict[str, int] = dict(SPECIAL_TOKENS)
        self.encoding = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens,
            explicit_n_vocab=VOCAB_SIZE)
        # id -> bytes for every id, so decoding is a list lookup and never hits tiktoken's KeyError.
        self._bytes_by_id: list[bytes] = [b""] * VOCAB_SIZE
        for token, rank in ranks.items():
            self._bytes_by_id[rank] = token
        for text, idx in self.special_tokens.items():
            self._bytes_by_id[idx] = text.encode("utf-8")
        self.eod_id, self.im_start_id, self.im_end_id = EOD_ID, IM_START_ID, IM_END_ID
        self.vocab_size = VOCAB_SIZE

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """Load from a checkpoint folder holding `qwen.tiktoken`."""
        folder = Path(folder)
        if not (folder / VOCAB_FILENAME).is_file():
            raise FileNotFoundError(
                f"no `{VOCAB_FILENAME}` in {folder}: point at a Qwen (v1) checkpoint folder (the one holding "
                f"config.json and {VOCAB_FILENAME}), or build the tokenizer with Tokenizer(path_to_vocab_file)")
        return cls(folder / VOCAB_FILENAME)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = "all",
               disallowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Text -> ids, after NFC normalisation (as the reference does).

        The defaults are the reference's: special-token text such as "<|im_end|>" becomes the control token.
        Pass `allowed_special=set()` to encode such text as plain text (what chat content must use), and
        `disallowed_special="all"` (or a set of surface forms) to raise ValueError on it instead.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}; decode bytes first")
        if allowed_special != "all":
            allowed_special = set(allowed_special)
            unknown = allowed_special - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"allowed_special holds {sorted(unknown)}, which are not Qwen special tokens; "
                                 f"use names such as {ENDOFTEXT!r}, {IM_START!r}, {IM_END!r}, '<|extra_0|>'")
        text = unicodedata.normalize("NFC", text)
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def id_to_bytes(self, idx: int) -> bytes:
        """The raw bytes of one token (a special token's surface text as UTF-8).

        Ids >= vocab_size (151851) are the untrained padding rows of the embedding: a model can still sample
        one, so they give b"" rather than crash the stream.
        """
        idx = int(idx)
        if idx < 0:
            raise ValueError(f"token id {idx} is negative; ids are 0..{self.vocab_size - 1}")
        return self._bytes_by_id[idx] if idx < self.vocab_size else b""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids -> text. An incomplete UTF-8 character gives U+FFFD with the default errors="replace".

        skip_special_tokens drops every id >= 151643 (special tokens and padding rows), as the reference does.
        Ids >= 151851 (padding rows, not in the vocabulary) decode as empty text instead of raising.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        return b"".join(self.id_to_bytes(i) for i in ids).decode("utf-8", errors=errors)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas for streaming output.

    A token can end in the middle of a UTF-8 character (51461 = b" \\xe6\\xa0" needs the next token's b"\\xb9"
    to make " 根"), so incomplete trailing bytes are held back until the character completes; `flush()`
    ends the stream (a leftover incomplete character becomes U+FFFD). Each `push` costs only its new
    tokens, and the deltas joined with `flush()` equal `tokenizer.decode(all_ids, skip_special_tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Python's incremental UTF-8 decoder buffers exactly an unfinished character and replaces invalid
        # bytes just as a one-shot bytes.decode(errors="replace") would.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Iterable[int] | int) -> str:
        """Feed new ids (a list or a single id); return the text they complete."""
        if isinstance(token_ids, int):  # the engine's case, one token a step: the short way
            if self.skip_special_tokens and token_ids >= self.tokenizer.eod_id:
                return ""
            return self._decoder.decode(self.tokenizer.id_to_bytes(token_ids))
        eod_id = self.tokenizer.eod_id
        data = b"".join(self.tokenizer.id_to_bytes(i) for i in token_ids
                        if not (self.skip_special_tokens and int(i) >= eod_id))
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character as U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
