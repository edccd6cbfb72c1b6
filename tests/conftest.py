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


def int8_noise_envelope(model, ids: list[int], n_prefill: int, mode: str, draws: int = 32, seed: int = 0,
                        positions: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """How far one-ulp float noise in K and V moves the logits of an int8-cache run, by simulating it.

    The int8 cache rounds (default mode) or truncates (qwen mode) K/V to integers, so K/V that differ by one ulp (as
    two CPUs' matmuls do) can land on different integers. In qwen mode this is systematic: the largest value of a chunk
    computes to 255 or to 254.99998 (truncated to 254) depending on rounding, for every (chunk, layer, head), and each
    such flip then moves the later K/V a little. Outputs of two correct implementations therefore differ by chaotic
    amounts that no fixed tolerance can bound on every CPU.

    This runs the same prefill-then-decode as `run_paged`, batched as 1 + `draws` copies of the sequence: copy 0 as
    computed, every other copy with each K and V element moved by -1, 0 or +1 ulp at random before every store (the
    noise a different CPU adds). Returns (logits of copy 0 [steps, vocab], or [len(positions), vocab] for the prefill
    when `positions` is given; and `spread` [steps] (or [len(positions)]): the largest |logit difference| between
    any noisy copy and copy 0 at that step, max over the vocabulary). Torch kernels, CPU.
    """
    from unittest import mock
    from nanoqwen import attention as attn_mod
    from nanoqwen.attention import AttentionMetadata
    from nanoqwen.kv_cache import KVCache
    from nanoqwen.rope import ntk_index

    cfg, R, bs = model.config, 1 + draws, 16
    gen = torch.Generator().manual_seed(seed)
    nb = -(-len(ids) // bs)
    cache = KVCache(cfg.num_hidden_layers, R * nb, bs, cfg.num_attention_heads, cfg.head_dim, model.dtype, "cpu",
                    "int8", mode)
    tables = torch.arange(R * nb, dtype=torch.int32).view(R, nb)
    ntk = ntk_index(n_prefill, cfg.seq_length, cfg.use_dynamic_ntk)
    store = attn_mod.store_kv_int8_ref

    def jitter(x, n):  # rows n: (the noisy copies) one ulp up or down, or unchanged
        step = torch.randint(-1, 2, x[n:].shape, generator=gen).to(x.dtype)
        return torch.cat([x[:n], torch.where(step != 0, torch.nextafter(x[n:], step * float("inf")), x[n:])])

    def noisy_store(k, v, layer_cache, slot_mapping, mode, cu_seqlens):
        n = int(cu_seqlens[1])
        store(jitter(k, n), jitter(v, n), layer_cache, slot_mapping, mode, cu_seqlens)

    logits, spread = [], []
    with mock.patch.dict(os.environ, {"NANOQWEN_KERNELS": "torch"}), \
            mock.patch.object(attn_mod, "store_kv_int8_ref", noisy_store), torch.no_grad():
        for c in range(1 + len(ids) - n_prefill):
            start = 0 if c == 0 else n_prefill + c - 1
            toks = ids[:n_prefill] if c == 0 else [ids[start]]
            n = len(toks)
            rows = positions if c == 0 and positions is not None else [n - 1]
            slots = torch.tensor([int(tables[r, p // bs]) * bs + p % bs for r in range(R) for p in range(start, start + n)])
            meta = AttentionMetadata.for_prefill(
                [n] * R, "cpu", [ntk] * R, [start] * R, slot_mapping=slots, block_tables=tables,
                context_lens=torch.full((R,), start + n, dtype=torch.int32), max_context_len=start + n,
                is_decode=c > 0, logits_indices=(torch.arange(R)[:, None] * n + torch.tensor(rows)).flatten())
            out = model(torch.tensor(toks * R), meta, cache).float().view(R, len(rows), -1)
            logits.append(out[0])
            spread.append((out[1:] - out[0]).abs().amax(dim=(0, 2)))
    return torch.cat(logits), torch.cat(spread)


# ---------------------------------------------------------------------------------------------- kernel tests

@pytest.fixture
def kernel_seed() -> int:
    """A fresh seed every run, printed (shown with any failure); KERNEL_TEST_SEED=<seed> replays one."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"KERNEL_TEST_SEED={seed}")
    return seed


@pytest.fixture
def rng(kernel_seed) -> torch.Generator:
    """A generator from `kernel_seed` (`rng.initial_seed()` is quoted in the messages)."""
    return torch.Generator().manual_seed(kernel_seed)


# A prelude for subprocess code that must run as on a CPU install without Triton: importing triton fails.
NO_TRITON = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
sys.meta_path.insert(0, NoTriton())
"""


# ---------------------------------------------------------------------------------------------- LoRA and GPTQ

@pytest.fixture(scope="session")
def lora_dir(golden) -> Path:
    path = golden / "qwen-tiny" / "lora"
    if not path.is_dir():
        pytest.skip("golden LoRA data (qwen-tiny/lora) not found")
    return path


@pytest.fixture(scope="session")
def lora_ref(lora_dir) -> dict:
    return json.loads((lora_dir / "reference.json").read_text())


@pytest.fixture(scope="session")
def lora_tensors(lora_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(lora_dir / "reference.safetensors"))


def dequantized_copy(model):
    """An fp32 Qwen whose linears hold a GPTQ model's dequantized weights (GPTQLinear.dequantize) and biases."""
    import dataclasses
    from nanoqwen import Qwen
    from nanoqwen.quant.gptq import GPTQLinear
    fp = Qwen(dataclasses.replace(model.config, quantization_config=None))
    gptq = {name: m for name, m in model.named_modules() if isinstance(m, GPTQLinear)}
    sd = {name: t.float() for name, t in model.state_dict().items() if name.rsplit(".", 1)[0] not in gptq}
    for name, module in gptq.items():
        sd[name + ".weight"] = module.dequantize()
        if name.endswith("c_attn"):
            sd[name + ".bias"] = module.bias.float()
    fp.load_state_dict(sd, strict=True)
    return fp.eval().requires_grad_(False)
