"""Shared test fixtures: where the golden reference data lives, and a skip when it is absent."""
import json
import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler for every @triton.jit function (its own tl.* helpers included) when it is
# first imported, so without a GPU the interpreter must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent


def golden_dir() -> Path | None:
    """`$NANOQWEN_GOLDEN`, else `../shared/golden` beside the project; None when neither exists."""
    env = os.environ.get("NANOQWEN_GOLDEN")
    path = Path(env) if env else ROOT.parent / "shared" / "golden"
    return path if path.is_dir() else None


def qwen7b_dir() -> Path | None:
    path = ROOT.parent / "shared" / "qwen" / "Qwen-7B"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if path is None:
        pytest.skip("golden reference data not found: set NANOQWEN_GOLDEN or put it at ../shared/golden")
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(golden) -> Path:
    return golden / "qwen-tiny" / "checkpoint"


@pytest.fixture(scope="session")
def tiny_ref(golden) -> dict:
    return json.loads((golden / "qwen-tiny" / "reference.json").read_text())


@pytest.fixture(scope="session")
def tiny_ref_tensors(golden) -> dict:
    from safetensors.torch import load_file
    return load_file(str(golden / "qwen-tiny" / "reference.safetensors"))


@pytest.fixture(scope="session")
def qwen_tiktoken() -> Path:
    """The real qwen.tiktoken vocabulary (from the golden tiny checkpoint or the Qwen-7B folder)."""
    for base in (golden_dir() and golden_dir() / "qwen-tiny" / "checkpoint", qwen7b_dir()):
        if base is not None and (base / "qwen.tiktoken").is_file():
            return base / "qwen.tiktoken"
    pytest.skip("qwen.tiktoken not found: set NANOQWEN_GOLDEN or put the golden data at ../shared/golden")


def prefill_then_decode(model, ids: list[int], n_prefill: int, block_size: int = 4, seed: int = 0):
    """Logits of the last position after the prefill of ids[:n_prefill], then after each later id fed one at a time
    through a paged KV cache whose blocks are shuffled (non-contiguous). Returns [len(ids) - n_prefill + 1, vocab]."""
    import torch
    from nanoqwen.attention import AttentionMetadata
    from nanoqwen.kv_cache import KVCache
    from nanoqwen.rope import ntk_index

    cfg, dev = model.config, model.device
    n_blocks = -(-len(ids) // block_size)
    cache = KVCache(cfg.num_hidden_layers, n_blocks + 3, block_size, cfg.num_attention_heads, cfg.head_dim,
                    model.dtype, dev)
    perm = torch.randperm(n_blocks + 3, generator=torch.Generator().manual_seed(seed))[:n_blocks].int()
    ntk = ntk_index(n_prefill, cfg.seq_length, cfg.use_dynamic_ntk)  # frozen at the prefill, as the reference

    def run(tokens, start):
        pos = range(start, start + len(tokens))
        slots = torch.tensor([int(perm[p // block_size]) * block_size + p % block_size for p in pos], device=dev)
        meta = AttentionMetadata.for_prefill(
            [len(tokens)], dev, [ntk], [start], slot_mapping=slots, block_tables=perm[None].to(dev),
            context_lens=torch.tensor([start + len(tokens)], dtype=torch.int32, device=dev),
            max_context_len=start + len(tokens), is_decode=start > 0 and len(tokens) == 1,
            logits_indices=torch.tensor([len(tokens) - 1], device=dev))
        with torch.no_grad():
            return model(torch.tensor(tokens, device=dev), meta, cache)[0].float()

    steps = [run(ids[:n_prefill], 0)] + [run([ids[i]], i) for i in range(n_prefill, len(ids))]
    return torch.stack(steps)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Converted-checkpoint cache in a temporary folder, and no network for the Hub."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOQWEN_HOME", str(tmp_path_factory.mktemp("nanoqwen_home")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()
