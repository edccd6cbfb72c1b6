"""GPTQ weights: the official AutoGPTQ "v1" format Qwen published, the planar layout the kernels read, GPTQLinear.

Official tensors of one quantized linear (in = K, out = N; QWEN_V1_SPEC.md section 7):
  qweight int32 [K * bits / 32, N]  values packed along the input dim, least significant bits first
  qzeros  int32 [n_groups, N * bits / 32]  zero points packed along the output dim, stored as zero - 1
  scales  fp16  [n_groups, N]
  g_idx   int32 [K]  group of every input row (i // group_size, or a permutation-based one with desc_act)
  bias    fp16  [N]  (zeros where the fp model had none)
  W[i, n] = scales[g_idx[i], n] * (q[i, n] - (qzeros_stored[g_idx[i], n] + 1)), and y = x @ W + bias.
The format needs K and N to be multiples of 32 / bits (8 for int4, 4 for int8).

`repack` turns them into the planar layout of nanoqwen/kernels/gptq_matmul.py (its docstring defines it): rows
sorted by group (act-order becomes a `perm` of the input features), planar int32 words, true zero points unpacked
into the scales' dtype. `GPTQLinear` holds that layout; its `load_state_dict` accepts either layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels.gemv import pick
from ..kernels.gptq_matmul import (MAGIC_MAX_ROWS, chunk_rows, dequantize_planar, gptq_matmul_ref, kernel_supports,
                                   pack_factor, pack_planar, unpack_planar, use_triton)

PLANAR_FORMAT = "nanoqwen-gptq-planar-v1"  # name of the repacked layout: a converter can record it in its metadata
OFFICIAL_KEYS = ("qweight", "qzeros", "scales", "g_idx")  # + optional "bias"
PLANAR_KEYS = ("qweight_planar", "scales", "zeros")  # + optional "perm" (int32) and "bias"
INT32_BUFFERS = ("qweight_planar", "perm")  # integer buffers: never cast them to a float dtype


class GPTQFormatError(ValueError):
    """A GPTQ config or tensor does not match the format; the message says which and how."""


# ----------------------------------------------------------------------------------------------- quantize_config

@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group over the whole input dim
    sym: bool = True
    desc_act: bool = False


def read_quantize_config(config_dict: dict) -> GPTQConfig:
    """Validate a `quantize_config.json` dict (or a config.json holding one as `quantization_config`)."""
    if not isinstance(config_dict, dict):
        raise GPTQFormatError(f"quantize config must be a JSON object, got {type(config_dict).__name__}")
    q = config_dict.get("quantization_config", config_dict)
    if not isinstance(q, dict):
        raise GPTQFormatError("quantization_config must be a JSON object")
    method = q.get("quant_method", "gptq")
    if str(method).lower() != "gptq":
        raise GPTQFormatError(f"quant_method {method!r} is not supported: nanoqwen reads GPTQ checkpoints only")
    fmt = q.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise GPTQFormatError(f"checkpoint_format {fmt!r} is not supported: nanoqwen reads AutoGPTQ's v1 'gptq' "
                              "format (stored zero = zero - 1), as Qwen published it")
    bits = q.get("bits")
    if isinstance(bits, bool) or bits not in (4, 8):
        raise GPTQFormatError(f"quantize config bits = {bits!r}: nanoqwen supports 4 and 8 bits")
    group_size = q.get("group_size", -1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise GPTQFormatError(f"quantize config group_size = {group_size!r}: use a positive integer, or -1 for one "
                              "group over each whole input dimension")
    sym, desc_act = q.get("sym", True), q.get("desc_act", False)
    for name, value in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(value, bool):
            raise GPTQFormatError(f"quantize config {name} = {value!r}: must be true or false")
    return GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)


# ----------------------------------------------------------------------------------------------- official format

def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words along `dim`, least significant field first: value r * (32/bits) + j of the result along
    `dim` is (words[r] >> (bits * j)) & (2^bits - 1). Returns int32 with 32/bits times more entries along `dim`."""
    if words.dtype != torch.int32:
        raise GPTQFormatError(f"packed GPTQ words must be int32, got {words.dtype} (a float cast corrupts them)")
    pack = pack_factor(bits)
    dim = dim % words.dim()
    shifts = torch.arange(pack, dtype=torch.int32, device=words.device) * bits
    w = words.unsqueeze(dim + 1)
    shape = [1] * w.dim()
    shape[dim + 1] = pack
    q = (w >> shifts.view(shape)) & ((1 << bits) - 1)
    return q.flatten(dim, dim + 1)


def _check_official(qweight, qzeros, scales, g_idx, bits) -> tuple[int, int]:
    pack = pack_factor(bits)
    for name, t in (("qweight", qweight), ("qzeros", qzeros)) + ((("g_idx", g_idx),) if g_idx is not None else ()):
        if t.dtype != torch.int32:
            raise GPTQFormatError(f"{name} must be int32, got {t.dtype}: int32 GPTQ tensors must never be cast "
                                  "to a float dtype (packed words exceed float's exact integers)")
    K, N = qweight.shape[0] * pack, qweight.shape[1]
    if scales.dim() != 2 or scales.shape[1] != N:
        raise GPTQFormatError(f"scales {list(scales.shape)} does not match qweight {list(qweight.shape)} "
                              f"(expected [n_groups, {N}])")
    if qzeros.shape != (scales.shape[0], -(-N // pack)):
        raise GPTQFormatError(f"qzeros {list(qzeros.shape)} does not match scales {list(scales.shape)} at "
                              f"{bits} bits (expected [{scales.shape[0]}, {-(-N // pack)}])")
    if g_idx is not None and g_idx.shape != (K,):
        raise GPTQFormatError(f"g_idx {list(g_idx.shape)} does not match qweight {list(qweight.shape)} at "
                              f"{bits} bits (expected [{K}])")
    return K, N


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """Official tensors -> fp32 W [out, in] = scales[g] * (q - (stored_zero + 1)) computed in fp32: bit for bit
    the golden `dequant/...` tensors (the true zero is not masked to `bits` bits, as in the golden reference)."""
    if g_idx is None:
        raise GPTQFormatError("dequantize_gptq needs g_idx (for a checkpoint without one: "
                              "torch.arange(K) // group_size)")
    _check_official(qweight, qzeros, scales, g_idx, bits)
    N = qweight.shape[1]
    q = unpack_int32(qweight, bits, dim=0)  # [K, N]
    z = unpack_int32(qzeros, bits, dim=1)[:, :N] + 1  # [G, N] true zero points
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).t()


# ----------------------------------------------------------------------------------------------- repacking

def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, bits: int,
           group_size: int) -> dict[str, torch.Tensor]:
    """Official tensors -> the planar layout: {"qweight_planar", "scales", "zeros"} and "perm" for act-order.

    The rows are stably sorted by g_idx; afterwards group g must own rows g * group_size .. (g + 1) * group_size - 1
    (true of every AutoGPTQ checkpoint, desc_act or not). No bias here: it is unchanged.
    """
    K, N = _check_official(qweight, qzeros, scales, g_idx, bits)
    n_groups = 1 if group_size == -1 else -(-K // group_size)
    if group_size != -1 and group_size <= 0:
        raise GPTQFormatError(f"group_size must be positive or -1, got {group_size}")
    if scales.shape[0] != n_groups:
        raise GPTQFormatError(f"scales has {scales.shape[0]} groups but K={K} with group_size {group_size} needs "
                              f"{n_groups}: is quantize_config's group_size right?")
    q = unpack_int32(qweight, bits, dim=0)
    zeros = (unpack_int32(qzeros, bits, dim=1)[:, :N] + 1).to(scales.dtype)
    perm = None
    if g_idx is not None:
        expected = torch.arange(K, device=g_idx.device) // group_size if group_size > 0 else torch.zeros_like(g_idx)
        if not torch.equal(g_idx.long(), expected.long()):
            perm = torch.sort(g_idx.long(), stable=True).indices
            if not torch.equal(g_idx.long()[perm], expected.long()):
                raise GPTQFormatError(f"g_idx does not assign {group_size} input rows to each group (sorted by "
                                      "group it is not i // group_size): this layout cannot be repacked")
            q = q[perm]
            perm = perm.to(torch.int32)
    out = {"qweight_planar": pack_planar(q, bits), "scales": scales.contiguous(), "zeros": zeros.contiguous()}
    if perm is not None:
        out["perm"] = perm
    return out


def planar_word_rows(start: int, stop: int, bits: int) -> tuple[int, int]:
    """The planar word rows holding kernel-order rows start..stop-1 (whole chunks: a chunk's rows share its words)."""
    chunk = chunk_rows(bits)
    return start // chunk * 16, -(-stop // chunk) * 16


def slice_planar_rows(words: torch.Tensor, bits: int, start: int, stop: int, in_features: int) -> torch.Tensor:
    """Planar words of kernel-order rows start..stop-1 alone, from `words`: the word rows `planar_word_rows` names (of
    a linear with `in_features` rows). Chunk-aligned slices are the words themselves; others are unpacked and
    repacked (tensor parallelism splits a linear's input rows on group boundaries, which need not be chunks)."""
    chunk = chunk_rows(bits)
    if start % chunk == 0 and (stop % chunk == 0 or stop == in_features):
        return words.contiguous()
    base = start // chunk * chunk
    q = unpack_planar(words, bits, words.shape[0] * pack_factor(bits))
    return pack_planar(q[start - base:stop - base], bits)


# ----------------------------------------------------------------------------------------------- the module

class GPTQLinear(nn.Module):
    """y = x @ W.T + bias with W GPTQ-quantized (4 or 8 bits), held in the planar layout.

    Buffers (the state_dict; safetensors-friendly):
      qweight_planar int32 [K_pad * bits / 32, N]  planar words, K_pad = K rounded up to 512 / bits (INTEGER)
      scales         fp16  [n_groups, N]   (any float dtype works; Qwen ships fp16)
      zeros          scales' dtype [n_groups, N]   true zero points (small integers, exact)
      perm           int32 [K]   only with act-order g_idx (INTEGER)
      bias           fp16  [N]   only when built with a bias
    `load_state_dict` also accepts the official tensors (qweight, qzeros, scales, g_idx, bias) and repacks them;
    int32 tensors arriving as floats are refused. `.to(dtype)` casts only the float buffers (PyTorch leaves
    integer buffers alone); keep scales fp16 for parity with the reference.
    forward: Triton kernels on CUDA (or with NANOQWEN_KERNELS=triton), else dequantize-then-matmul in torch. Up to
    MAGIC_MAX_ROWS rows, the old split-K kernel and the magic-number GEMV are both candidates (kernels/gemv.py `pick`:
    timed once per shape on the GPU, NANOQWEN_GEMV forces either). When the input needs a gradient (Q-LoRA: LoRA
    trained on a frozen GPTQ base), the same forward runs inside `DequantMatmul`, whose backward gives
    dx = dy @ W through the dequantized weight.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 act_order: bool = False, device=None, scales_dtype: torch.dtype = torch.float16):
        super().__init__()
        pack = pack_factor(bits)
        if not (group_size == -1 or group_size > 0):
            raise GPTQFormatError(f"group_size must be positive or -1, got {group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        chunk = 16 * pack
        n_groups = 1 if group_size == -1 else -(-in_features // group_size)
        k_pad = -(-in_features // chunk) * chunk
        self.register_buffer("qweight_planar", torch.zeros(k_pad // pack, out_features, dtype=torch.int32,
                                                           device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device)
                             if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=scales_dtype, device=device) if bias else None)
        self._sym_key, self._sym = None, False  # whether every zero is 2^(bits-1), for the zeros' (ptr, version)

    # -- construction
    @classmethod
    def from_official(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                      group_size: int) -> "GPTQLinear":
        """Build from one linear's official AutoGPTQ tensors (repacks them)."""
        planar = repack(qweight, qzeros, scales, g_idx, bits, group_size)
        return cls.from_planar(planar, bits, group_size, in_features=qweight.shape[0] * pack_factor(bits), bias=bias)

    @classmethod
    def from_planar(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int, in_features: int,
                    bias: torch.Tensor | None = None) -> "GPTQLinear":
        """Build from planar tensors {"qweight_planar", "scales", "zeros", optional "perm", "bias"} (e.g. one
        module's slice of a converted checkpoint). in_features is needed: the planar words are padded."""
        bias = tensors.get("bias", bias)
        m = cls(in_features, tensors["scales"].shape[1], bits, group_size, bias=bias is not None,
                act_order="perm" in tensors, device=tensors["scales"].device, scales_dtype=tensors["scales"].dtype)
        m._set_planar({**tensors, **({"bias": bias} if bias is not None else {})})
        return m

    def _set_planar(self, t: dict[str, torch.Tensor]) -> None:
        for name in INT32_BUFFERS:
            if name in t and t[name].dtype != torch.int32:
                raise GPTQFormatError(f"GPTQ buffer {name} must be int32, got {t[name].dtype}: integer tensors must "
                                      "never be cast to a float dtype")
        expect = {"qweight_planar": self.qweight_planar.shape, "scales": self.scales.shape,
                  "zeros": self.zeros.shape, "perm": (self.in_features,), "bias": (self.out_features,)}
        for name, value in t.items():
            if name in expect and value is not None and value.shape != expect[name]:
                raise GPTQFormatError(f"GPTQ tensor {name} has shape {list(value.shape)}, expected "
                                      f"{list(expect[name])} for in={self.in_features} out={self.out_features} "
                                      f"bits={self.bits} group_size={self.group_size}")
        device = self.scales.device if self.scales.device.type != "meta" else t["scales"].device
        for name in ("qweight_planar", "scales", "zeros"):
            setattr(self, name, t[name].to(device))
        self.perm = t["perm"].to(device) if t.get("perm") is not None else None
        bias = t.get("bias")
        self.bias = bias.to(device) if bias is not None else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept the planar state dict or the official tensors (repacked here); perm/bias may come or not."""
        mine = {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix) and "." not in k[len(prefix):]}
        try:
            if "qweight" in mine:
                missing = [k for k in ("qweight", "qzeros", "scales") if k not in mine]
                if missing:
                    missing_keys.extend(prefix + k for k in missing)
                    return
                k_official = mine["qweight"].shape[0] * pack_factor(self.bits)
                if k_official != self.in_features:
                    raise GPTQFormatError(f"qweight {list(mine['qweight'].shape)} holds {k_official} input rows at "
                                          f"{self.bits} bits, the module expects {self.in_features}")
                tensors = repack(mine["qweight"], mine["qzeros"], mine["scales"], mine.get("g_idx"), self.bits,
                                 self.group_size)
                used = set(OFFICIAL_KEYS)
            else:
                missing = [k for k in PLANAR_KEYS if k not in mine]
                if missing:
                    missing_keys.extend(prefix + k for k in missing)
                    return
                tensors = {k: mine[k] for k in PLANAR_KEYS + ("perm",) if k in mine}
                used = set(PLANAR_KEYS) | {"perm"}
            if "bias" in mine:
                tensors["bias"] = mine["bias"]
            elif self.bias is not None:
                tensors["bias"] = torch.zeros_like(self.bias)  # AutoGPTQ's bias-less layers are zero biases
            self._set_planar(tensors)
        except (GPTQFormatError, ValueError) as e:
            error_msgs.append(f"{prefix or 'GPTQLinear'}: {e}")
            return
        if strict:
            unexpected_keys.extend(prefix + k for k in mine if k not in used | {"bias"})

    # -- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GPTQLinear expects inputs [..., {self.in_features}], got {list(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            return DequantMatmul.apply(x, self)
        return self.matmul(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T + bias, no autograd: a kernel (the faster of the two for decode-sized inputs) or the torch
        reference."""
        args = (x, self.qweight_planar, self.scales, self.zeros, self.bits, self.group_size, self.bias, self.perm)
        if not use_triton(x.device):
            return gptq_matmul_ref(*args)
        from ..kernels.gptq_matmul import gptq_gemv, gptq_matmul
        base = gptq_matmul if kernel_supports(self.group_size) else gptq_matmul_ref
        if not 0 < x.numel() <= MAGIC_MAX_ROWS * self.in_features:
            return base(*args)
        sym = self._symmetric()
        candidates = {"gptq": lambda: base(*args), "magic": lambda: gptq_gemv(*args, sym=sym)}
        kind = f"gptq{self.bits}g{self.group_size}{'s' if sym else ''}{'p' if self.perm is not None else ''}"
        return candidates[pick(kind, x, self.out_features, self.in_features, candidates)]()

    def _symmetric(self) -> bool:
        """Every zero point is 2^(bits-1) (symmetric quantization, as Qwen's checkpoints): checked once per version
        of the zeros (one host sync, in the eager warm-up), never inside a CUDA-graph capture (then False, which is
        correct for any zeros, only slower)."""
        key = (self.zeros.data_ptr(), self.zeros._version)
        if key != self._sym_key:
            if self.zeros.is_cuda and torch.cuda.is_current_stream_capturing():
                return False
            self._sym_key, self._sym = key, bool((self.zeros == 2 ** (self.bits - 1)).all())
        return self._sym

    def dequantize(self) -> torch.Tensor:
        """fp32 W [out, in] (the nn.Linear weight), original input order."""
        return dequantize_planar(self.qweight_planar, self.scales, self.zeros, self.perm, self.bits, self.group_size,
                                 self.in_features)

    @staticmethod
    def cat(linears: list["GPTQLinear"]) -> "GPTQLinear":
        """One GPTQLinear computing torch.cat([m(x) for m in linears], -1): same input dim, bits, group size and
        g_idx (act-order permutation). Used to fuse the MLP's w2 and w1 (w2 first) into one matmul."""
        first = linears[0]
        for m in linears[1:]:
            same = (m.in_features, m.bits, m.group_size, m.scales.dtype) == \
                   (first.in_features, first.bits, first.group_size, first.scales.dtype)
            same_perm = (m.perm is None and first.perm is None) or \
                        (m.perm is not None and first.perm is not None and torch.equal(m.perm, first.perm))
            if not (same and same_perm):
                raise GPTQFormatError("GPTQLinear.cat needs the same in_features, bits, group_size, scales dtype and "
                                      "g_idx in every part")
        with_bias = any(m.bias is not None for m in linears)
        tensors = {name: torch.cat([getattr(m, name) for m in linears], dim=1)
                   for name in ("qweight_planar", "scales", "zeros")}
        if first.perm is not None:
            tensors["perm"] = first.perm
        if with_bias:
            tensors["bias"] = torch.cat([m.bias if m.bias is not None else m.scales.new_zeros(m.out_features)
                                         for m in linears])
        return GPTQLinear.from_planar(tensors, first.bits, first.group_size, first.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, act_order={self.perm is not None}")


class DequantMatmul(torch.autograd.Function):
    """y = GPTQLinear(x), differentiable in x (the weights are frozen buffers).

    The forward is the inference one (kernel or reference) and keeps nothing but the module; the backward dequantizes
    W again, in dy's dtype, for dx = dy @ W. A plain F.linear on the dequantized W would keep that fp16/bf16 copy of
    every layer alive until the backward: as much memory as the unquantized model, which Q-LoRA exists to avoid."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "GPTQLinear") -> torch.Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        return module.matmul(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = ctx.module.dequantize().to(dy.dtype)
        return (dy @ w).to(ctx.x_dtype), None


# ----------------------------------------------------------------------------------------------- model surgery

QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w2_w1", "mlp.c_proj")  # in nanoqwen's module names


def swap_linears(model: nn.Module, bits: int, group_size: int, device=None) -> nn.Module:
    """Replace the quantized linears of every block by empty GPTQLinear modules (gpt-fast style: quantization is a
    swap of modules; `load_state_dict` then fills them). Embedding, norms and lm_head stay as they are."""
    for block in model.transformer.h:
        for path in QUANTIZED_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            lin = getattr(parent, name)
            setattr(parent, name, GPTQLinear(lin.in_features, lin.out_features, bits, group_size, bias=True,
                                             device=device or lin.weight.device))
    return model
