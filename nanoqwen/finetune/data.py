"""Qwen's fine-tuning data: a JSON list of conversations, checked, then turned into ids and labels exactly as Qwen's
finetune.py `preprocess` does.

A record: {"id": ..., "conversations": [{"from": "user" | "assistant", "value": str}, ...]} with, optionally, a
"system" string (else finetune.py's "You are a helpful assistant."); a first message {"from": "system"} is accepted
as the same thing. ChatML, each turn encoded piece by piece (role, "\\n", content with special tokens ALLOWED, as
finetune.py's tokenizer call does):
    <|im_start|>system\\n{system}<|im_end|>\\n  <|im_start|>{role}\\n{value}<|im_end|>\\n  ...
Labels are the ids, masked with -100 (IGNORE_INDEX) except: <|im_start|>, <|im_end|> and the "\\n" after it in every
turn (system and user included), and the content of assistant turns. Rows are padded to max_len with <|endoftext|>
(labels -100) and cut at max_len. finetune.py's quirks are kept for parity: a conversation whose first message is from
the assistant loses that one message; nothing is added at the end.
Every record is checked before any training starts: a malformed one is reported with its index (and id) and what is
wrong (`DataError`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tokenizer import EOD_ID, IM_END_ID, IM_START_ID, Tokenizer

IGNORE_INDEX = -100  # label of a token that is not trained on (torch's cross_entropy ignore_index)
SYSTEM_MESSAGE = "You are a helpful assistant."  # finetune.py's SupervisedDataset always uses this one
ROLES = ("user", "assistant")
MAX_REPORTED = 10  # malformed records listed in one error


class DataError(ValueError):
    """Training data that cannot be used: which record, what is wrong, what to do."""


# ----------------------------------------------------------------------------------------------- reading and checking

def load_conversations(path, what: str = "training data") -> list[dict]:
    """Read and check a Qwen-format JSON file; returns records {"id", "system", "messages": [(role, text), ...]},
    the system message resolved and finetune.py's first-message rule applied."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} not found: pass a JSON file holding a list of conversations")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. It must be one "
                        "JSON list: [{\"id\": ..., \"conversations\": [{\"from\": \"user\", \"value\": ...}, ...]}]"
                        ) from None
    return check_conversations(raw, str(path))


def check_conversations(raw, where: str = "training data") -> list[dict]:
    """Check parsed Qwen-format data (a list of records); raises DataError listing the malformed records."""
    if not isinstance(raw, list):
        raise DataError(f"{where} must be a JSON list of records, got a JSON {type(raw).__name__}: "
                        "[{\"id\": ..., \"conversations\": [{\"from\": \"user\", \"value\": ...}, ...]}, ...]")
    if not raw:
        raise DataError(f"{where} holds no records: give at least one conversation")
    records, errors = [], []
    for i, record in enumerate(raw):
        try:
            records.append(_check_record(record))
        except DataError as e:
            rid = record.get("id") if isinstance(record, dict) else None
            errors.append(f"record {i}{f' (id {rid!r})' if rid is not None else ''}: {e}")
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DataError(f"{where}: {len(errors)} malformed record(s) of {len(raw)}; fix them and run again:\n  "
                        + "\n  ".join(errors[:MAX_REPORTED]) + more)
    return records


def _check_record(record) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"is a JSON {type(record).__name__}, not an object with \"conversations\"")
    if "conversations" not in record:
        raise DataError(f"has no \"conversations\" (keys: {', '.join(map(str, record)) or 'none'})")
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv:
        raise DataError("\"conversations\" must be a non-empty list of {\"from\": ..., \"value\": ...} messages")
    system = record.get("system", None)
    if system is not None and not isinstance(system, str):
        raise DataError(f"\"system\" must be a string, got a JSON {type(system).__name__}")
    messages = []
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise DataError(f"conversations[{j}] must be an object with \"from\" and \"value\", got {_short(msg)}")
        role, value = msg["from"], msg["value"]
        if not isinstance(value, str):
            raise DataError(f"conversations[{j}].value must be a string, got a JSON {type(value).__name__}")
        if role == "system" and j == 0:
            if system is not None:
                raise DataError("has both a \"system\" field and a first message from \"system\": keep one")
            system = value
            continue
        if role not in ROLES:
            hint = " (FastChat's human/gpt: rename them user/assistant)" if role in ("human", "gpt") else \
                " (a system message goes first, or in the record's \"system\" field)" if role == "system" else ""
            raise DataError(f"conversations[{j}].from is {_short(role)}: use \"user\" or \"assistant\"{hint}")
        messages.append((role, value))
    if not messages:
        raise DataError("has no user or assistant message")
    if messages[0][0] != "user":
        messages = messages[1:]  # finetune.py: `if roles[source[0]["from"]] != roles["user"]: source = source[1:]`
    return {"id": record.get("id"), "system": SYSTEM_MESSAGE if system is None else system, "messages": messages}


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------- ids and labels

def encode_conversation(tokenizer: Tokenizer, messages, system: str = SYSTEM_MESSAGE) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation before padding, as finetune.py's preprocess builds them."""
    nl = tokenizer.encode("\n")
    ids = [IM_START_ID] + tokenizer.encode("system") + nl + tokenizer.encode(system) + [IM_END_ID] + nl
    labels = [IM_START_ID] + [IGNORE_INDEX] * (len(ids) - 3) + [IM_END_ID] + nl
    for role, value in messages:
        role_ids = tokenizer.encode(f"<|im_start|>{role}")  # [<|im_start|>, role]: the reference encodes them together
        turn = role_ids + nl + tokenizer.encode(value) + [IM_END_ID] + nl
        ids += turn
        if role == "user":
            labels += [IM_START_ID] + [IGNORE_INDEX] * (len(turn) - 3) + [IM_END_ID] + nl
        else:  # the role word and its "\n" masked, the answer and its <|im_end|>\n trained on
            labels += [IM_START_ID] + [IGNORE_INDEX] * len(role_ids) + turn[len(role_ids) + 1:-2] + [IM_END_ID] + nl
    return ids, labels


def pad_to(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """finetune.py's padding: <|endoftext|> ids and -100 labels up to max_len, then both cut at max_len."""
    ids = (ids + [EOD_ID] * (max_len - len(ids)))[:max_len]
    return ids, (labels + [IGNORE_INDEX] * (max_len - len(labels)))[:max_len]


def preprocess(conversations, tokenizer: Tokenizer, max_len: int, system_message: str = SYSTEM_MESSAGE) -> dict:
    """finetune.py's `preprocess`, same inputs and outputs: `conversations` a list of message lists
    ([{"from", "value"}, ...]); returns input_ids and labels (int32 [N, max_len]) and attention_mask
    (bool, input_ids != <|endoftext|>)."""
    rows = []
    for i, conv in enumerate(conversations):
        record = _check_record({"conversations": conv}) if not isinstance(conv, dict) else _check_record(conv)
        rows.append(pad_to(*encode_conversation(tokenizer, record["messages"], system_message), max_len))
    input_ids = torch.tensor([r[0] for r in rows], dtype=torch.int32)
    labels = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(EOD_ID)}


@dataclass
class SupervisedData:
    """Preprocessed rows: input_ids and labels int32 [N, max_len]; per row its real length (tokens before padding,
    at most max_len) and its number of trained labels (positions 1.. whose label is not -100: the cross-entropy
    terms it adds)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor  # [N] int64
    n_labels: torch.Tensor  # [N] int64

    @classmethod
    def build(cls, records: list[dict], tokenizer: Tokenizer, max_len: int) -> "SupervisedData":
        if not isinstance(max_len, int) or max_len < 2:
            raise DataError(f"max_len must be an integer of at least 2 tokens, got {max_len!r}")
        ids, labels, lengths = [], [], []
        for record in records:
            i, lab = encode_conversation(tokenizer, record["messages"], record["system"])
            lengths.append(min(len(i), max_len))
            i, lab = pad_to(i, lab, max_len)
            ids.append(i)
            labels.append(lab)
        labels_t = torch.tensor(labels, dtype=torch.int32)
        return cls(torch.tensor(ids, dtype=torch.int32), labels_t, torch.tensor(lengths),
                   (labels_t[:, 1:] != IGNORE_INDEX).sum(1))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids and labels (int64) of `rows`, cut to the longest row (the columns dropped hold only padding:
        with causal attention nothing before them sees them, and their labels are -100), and the rows' lengths."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        width = int(self.lengths[rows].max())
        return (self.input_ids[rows, :width].long().to(device), self.labels[rows, :width].long().to(device),
                self.lengths[rows])
