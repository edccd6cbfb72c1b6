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


def run_paged(model, ids: list[int], n_prefill: int, block_size: int = 4, generator=None, kv_cache_dtype=None,
              quant_mode: str = "default", all_logits: bool = False) -> list:
    """Prefill ids[:n_prefill], then feed each later id one at a time through a paged KV cache whose blocks are
    shuffled (non-contiguous). Returns each step's logits (fp32, CPU): the last position's [1, vocab], or every
    position's for the prefill when `all_logits`. NTK alpha is frozen at the prefill, as the reference does."""
    import torch
    from nanoqwen.attention import AttentionMetadata
    from nanoqwen.kv_cache import KVCache
    from nanoqwen.rope import ntk_index

    cfg, dev = model.config, model.device
    n_blocks = -(-len(ids) // block_size)
    cache = KVCache(cfg.num_hidden_layers, n_blocks + 3, block_size, cfg.num_attention_heads, cfg.head_dim,
                    model.dtype, dev, kv_cache_dtype, quant_mode)
    generator = generator or torch.Generator().manual_seed(0)
    perm = torch.randperm(n_blocks + 3, generator=generator)[:n_blocks].int()
    ntk = ntk_index(n_prefill, cfg.seq_length, cfg.use_dynamic_ntk)

    def run(tokens, start):
        end = start + len(tokens)
        slots = torch.tensor([int(perm[p // block_size]) * block_size + p % block_size for p in range(start, end)])
        meta = AttentionMetadata.for_prefill(
            [len(tokens)], dev, [ntk], [start], slot_mapping=slots.to(dev), block_tables=perm[None].to(dev),
            context_lens=torch.tensor([end], dtype=torch.int32, device=dev), max_context_len=end,
            is_decode=start > 0 and len(tokens) == 1,
            logits_indices=None if all_logits else torch.tensor([len(tokens) - 1], device=dev))
        with torch.no_grad():
            return model(torch.tensor(tokens, device=dev), meta, cache).float().cpu()

    return [run(ids[:n_prefill], 0)] + [run([ids[i]], i) for i in range(n_prefill, len(ids))]


def prefill_then_decode(model, ids: list[int], n_prefill: int, block_size: int = 4, seed: int = 0):
    """The last position's logits after the prefill and after each later token: [len(ids) - n_prefill + 1, vocab]."""
    import torch
    steps = run_paged(model, ids, n_prefill, block_size, torch.Generator().manual_seed(seed))
    return torch.cat(steps)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Converted-checkpoint cache in a temporary folder, and no network for the Hub."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOQWEN_HOME", str(tmp_path_factory.mktemp("nanoqwen_home")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()
