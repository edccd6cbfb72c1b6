"""ChatML prompts for the Qwen (v1) chat models, built token by token as the reference's `make_context` does.

A ChatML prompt (QWEN_V1_SPEC.md section 9.1):
    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>     (per kept history turn)
    \\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n
The ids are NOT `encode(raw_text)`: each role and each content is encoded on its own, the content with
special tokens off, so a user typing "<|im_start|>" gets plain text, not a control token.
"""
from .tokenizer import EOD_ID, IM_END, IM_END_ID, IM_START, IM_START_ID, Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."  # the reference `model.chat` default (make_context's is "")
CHAT_FORMATS = ("chatml", "raw")


def _check_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def _check_history(history) -> list[tuple[str, str]]:
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (query, response) pairs of strings, got {type(history).__name__}")
    turns = []
    for i, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ValueError(f"history[{i}] must be a (query, response) pair of strings, got {turn!r}")
        _check_str(f"history[{i}][0] (the query)", turn[0])
        _check_str(f"history[{i}][1] (the response)", turn[1])
        turns.append((turn[0], turn[1]))
    return turns


def make_context(tokenizer: Tokenizer, query: str, history=None, system: str = "",
                 max_window_size: int = 6144, chat_format: str = "chatml") -> tuple[str, list[int]]:
    """Build a prompt: returns (raw_text, context_ids), both exactly as the reference builds them.

    history: earlier turns as (query, response) pairs, oldest first. They are kept newest-first while the
    system block plus the kept turns stay under `max_window_size` tokens; the first turn that does not fit
    is dropped with every older one. The current query is never counted nor cut, so the prompt can be
    longer than max_window_size (the engine checks it against the model's context).
    raw_text is the string mirror of the prompt (content as given; the ids are of its NFC form).
    chat_format "raw" (base models): the query alone, encoded with the tokenizer defaults (special-token
    text parsed), and history and system ignored, as in the reference.
    """
    _check_str("query", query)
    _check_str("system", system)
    turns = _check_history(history)
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}: use 'chatml' (chat models) or 'raw' (base models)")
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if not isinstance(max_window_size, int) or max_window_size <= 0:
        raise ValueError(f"max_window_size must be a positive int (tokens), got {max_window_size!r}")

    nl = tokenizer.encode("\n")

    def block(role: str, content: str) -> tuple[str, list[int]]:
        """`<|im_start|>{role}\\n{content}<|im_end|>` with role and content encoded separately."""
        ids = ([IM_START_ID] + tokenizer.encode(role, allowed_special=set()) + nl
               + tokenizer.encode(content, allowed_special=set()) + [IM_END_ID])
        return f"{IM_START}{role}\n{content}{IM_END}", ids

    raw_text, context_ids = block("system", system)
    history_text, history_ids = "", []
    for turn_query, turn_response in reversed(turns):
        user_text, user_ids = block("user", turn_query)
        assistant_text, assistant_ids = block("assistant", turn_response)
        turn_ids = nl + user_ids + nl + assistant_ids
        if len(context_ids) + len(turn_ids) + len(history_ids) >= max_window_size:
            break
        history_text = f"\n{user_text}\n{assistant_text}" + history_text
        history_ids = turn_ids + history_ids
    user_text, user_ids = block("user", query)
    raw_text += history_text + f"\n{user_text}\n{IM_START}assistant\n"
    context_ids += history_ids + nl + user_ids + nl + [IM_START_ID] + tokenizer.encode("assistant") + nl
    return raw_text, context_ids


def stop_token_ids(chat_format: str = "chatml") -> list[int]:
    """Token ids that end a reply: chatml stops on <|endoftext|>, <|im_start|> or <|im_end|>; raw on <|endoftext|>.

    nanoqwen stops as soon as one of these is sampled. The reference instead forces the NEXT token to be
    <|endoftext|> by setting its logit to 2^15 after <|im_end|>/<|im_start|> (spec 11.8: inf and NaN in fp16
    at low temperature) and stops on that, so its chat turns end in [..., 151645, 151643] where ours end
    in [..., 151645]. The reference's raw format also stops on the text "Human:"; that is a stop string,
    not a stop id, and is left to the caller.
    """
    if chat_format == "chatml":
        return [EOD_ID, IM_START_ID, IM_END_ID]
    if chat_format == "raw":
        return [EOD_ID]
    raise ValueError(f"unknown chat_format {chat_format!r}: use 'chatml' (chat models) or 'raw' (base models)")
