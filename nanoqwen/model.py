"""The Qwen (v1) decoder: RMSNorm, attention (fused c_attn with bias, RoPE, LogN, paged cache), w2-gated MLP, untied head.

Module names mirror the official checkpoint (`transformer.h.{i}.attn.c_attn`, ...), except that the MLP's two input
projections are stored fused as `mlp.w2_w1` (rows of w2, the SiLU-gated branch, then rows of w1): one matmul.
The residual stream is carried beside each block's output and added inside the next norm (as vLLM does), so that on
the Triton path every add is fused into an RMSNorm launch; the sums are the same as x = x + f(x).

Training (nanoqwen.finetune): an op whose output needs a gradient runs its torch reference (the Triton kernels have no
backward; `needs_grad`), `gradient_checkpointing` recomputes each block in the backward, and in `model.train()` mode
LogN is off and the [B, S] forward uses no dynamic NTK, as in the reference's training mode (QWEN_V1_SPEC.md 4.1, 4.2).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionMetadata, attention, needs_grad
from .config import QwenConfig
from .kernels import use_triton
from .kernels.activation import silu_mul, silu_mul_ref
from .kernels.gemv import Linear  # nn.Linear; decode-sized calls may take a split-K GEMV
from .kernels.rms_norm import rms_norm, rms_norm_ref
from .rope import RotaryEmbedding, StepRope, apply_rotary, ntk_index

LOGPROB_SLICE_ELEMENTS = 1 << 25  # logits computed at once by token_logprobs: 128 MiB in fp32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x) as the reference (normalise in fp32, cast to the activation dtype, then scale by the weight);
        with `residual`, of s = x + residual, returning (normed, s) in one pass."""
        norm = rms_norm if use_triton(x.device) and not needs_grad(x, self.weight, residual) else rms_norm_ref
        out, total = norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, total)


class Attention(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.c_attn = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)  # Q | K | V, contiguous thirds
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x, rope: StepRope, meta: AttentionMetadata, kv):
        T = x.shape[0]
        q, k, v = self.c_attn(x).view(T, 3, self.n_head, self.head_dim).unbind(1)
        if rope.cos is None:  # through the kernels: RoPE (keys cached rotated) and LogN inside their launches
            o = attention(q, k, v, meta, kv, rope=rope)
        else:
            q, k = apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)  # keys cached rotated
            o = attention(q, k, v, meta, kv, rope.logn)  # LogN scales the queries inside
        return self.c_proj(o.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.w2_w1 = Linear(cfg.hidden_size, 2 * cfg.mlp_width, bias=not cfg.no_bias)
        self.c_proj = Linear(cfg.mlp_width, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x):
        gate_up = self.w2_w1(x)
        act = silu_mul if use_triton(x.device) and not needs_grad(gate_up) else silu_mul_ref  # w1(x) * silu(w2(x))
        return self.c_proj(act(gate_up))


class Block(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, meta, kv):
        """x: the previous block's output (the embeddings first), residual: the stream it adds to (None first).
        Returns this block's output and the stream before it: x + attn(ln_1(x)) + mlp(ln_2(...)) as a pair."""
        if residual is None:
            h, residual = self.ln_1(x), x
        else:
            h, residual = self.ln_1(x, residual)
        h, residual = self.ln_2(self.attn(h, rope, meta, kv), residual)
        return self.mlp(h), residual


class Qwen(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.hidden_size),
            h=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            ln_f=RMSNorm(config.hidden_size, config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_emb_base)
        self.gradient_checkpointing = False  # training: keep only each block's inputs, recompute the rest in backward

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, lora=None, **kwargs) -> "Qwen":
        """Load a converted nanoqwen folder or an official Qwen checkpoint folder (converted in memory); `lora`: a
        PEFT LoRA adapter folder to merge into the weights."""
        from .checkpoint import load_model
        return load_model(path, device=device, dtype=dtype, lora=lora, **kwargs)

    def init_weights(self, generator: torch.Generator | None = None) -> "Qwen":
        """The reference initialisation (random-weight tests): N(0, 0.02), c_proj rescaled, biases 0, norms 1."""
        std_proj = 0.02 / math.sqrt(2 * self.config.num_hidden_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std_proj if name.endswith("c_proj.weight") else 0.02, generator=generator)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.ln_f.weight.dtype

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata | None = None, kv_cache=None) -> torch.Tensor:
        """Two ways in.

        - `model(input_ids)` with input_ids [B, S]: a full causal forward without cache, logits [B, S, vocab].
          Each row is its own sequence at positions 0..S-1 (NTK alpha from S, as the reference's prefill; none in
          train mode, as the reference's training forward).
        - `model(tokens, meta, kv_cache)` with tokens [T] (the new tokens of a batch, concatenated): K/V go into the
          paged cache, logits for `meta.logits_indices` (all rows if None), [N, vocab].
        """
        return self.logits(self.hidden_states(input_ids, meta, kv_cache))

    def hidden_states(self, input_ids: torch.Tensor, meta: AttentionMetadata | None = None,
                      kv_cache=None) -> torch.Tensor:
        """`forward` without the head: the final (ln_f) hidden states, [B, S, hidden] or [N, hidden]. Scoring takes
        this way in, so that the head's [rows, vocab] logits can be made a slice of rows at a time (`token_logprobs`)."""
        if meta is None:
            if input_ids.dim() != 2:
                raise ValueError(f"model(input_ids) takes input_ids of shape [batch, seq], got {tuple(input_ids.shape)}")
            B, S = input_ids.shape
            if S == 0:
                raise ValueError("input_ids is empty: give at least one token per row")
            idx = ntk_index(S, self.config.seq_length, self.config.use_dynamic_ntk and not self.training)
            meta = AttentionMetadata.for_prefill([S] * B, input_ids.device, [idx] * B)
            return self.hidden_states(input_ids.reshape(-1), meta).view(B, S, -1)
        self._check_ids(input_ids)
        x, residual = self.transformer.wte(input_ids), None
        rope = self.rotary.step(meta.positions, meta.ntk_index,
                                self.config.seq_length if self.config.use_logn_attn and not self.training else 0,
                                tables=not use_triton(x.device))  # the kernels compute angles and LogN themselves
        for i, block in enumerate(self.transformer.h):
            kv = kv_cache.layer(i) if kv_cache is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, residual = checkpoint(block, x, residual, rope, meta, kv, use_reentrant=False)
            else:
                x, residual = block(x, residual, rope, meta, kv)
        if meta.logits_indices is not None:
            x, residual = x[meta.logits_indices], residual[meta.logits_indices]
        return self.transformer.ln_f(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head: final hidden states [..., hidden] -> logits [..., vocab] (in the model's dtype)."""
        return self.lm_head(hidden)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor,
                       top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities (fp32 log-softmax of the logits) for rows of final hidden states `hidden` [N, hidden]:
        (logprob of `targets` [N] in each row [N], the `top_k` best logprobs [N, k] and their ids [N, k]).

        The logits are made LOGPROB_SLICE_ELEMENTS at a time (a few hundred rows of Qwen's 151,936-token vocabulary),
        never [N, vocab] at once: a 16k-token prompt's would be 10 GB in fp32."""
        n, dev = hidden.shape[0], hidden.device
        rows = max(1, LOGPROB_SLICE_ELEMENTS // self.config.vocab_size)
        chosen = torch.empty(n, dtype=torch.float32, device=dev)
        top_values = torch.empty(n, top_k, dtype=torch.float32, device=dev)
        top_ids = torch.empty(n, top_k, dtype=torch.long, device=dev)
        for a in range(0, n, rows):
            lp = torch.log_softmax(self.logits(hidden[a:a + rows]).float(), dim=-1)
            chosen[a:a + rows] = lp.gather(1, targets[a:a + rows, None]).squeeze(1)
            if top_k:
                torch.topk(lp, top_k, dim=-1, out=(top_values[a:a + rows], top_ids[a:a + rows]))
        return chosen, top_values, top_ids

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor (torch.long), got {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
