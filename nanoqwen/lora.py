"""PEFT LoRA adapters for Qwen (v1): read what Qwen's finetune.py saves, merge one into the weights, serve many at
once in one batch, or train one (nanoqwen.finetune) and save it as peft does.

An adapter folder, as peft's `save_pretrained` writes it: `adapter_config.json` (r, lora_alpha, target_modules,
modules_to_save, ...) and `adapter_model.safetensors` with, for every adapted linear,
`base_model.model.transformer.h.{i}.{attn.c_attn|attn.c_proj|mlp.w1|mlp.w2|mlp.c_proj}.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]; for a base-model fine-tune also full copies `base_model.model.transformer.wte.weight`
and `base_model.model.lm_head.weight` (modules_to_save). An adapted linear computes
    y = x W^T + b + scaling * (x A^T) B^T,   scaling = lora_alpha / r   (peft's rule; lora_alpha / sqrt(r) with rslora)
Two ways to use one:
- merged (`load_model(path, lora=ADAPTER)`, `merge_adapter`): W += scaling * B @ A once at load time, wte/lm_head
  replaced by the adapter's copies; no cost per token. Impossible on GPTQ weights (refused).
- unmerged (`LoraManager`): every adapted linear becomes a `LoRALinear` adding, per token row, the product of that
  row's adapter (or none), through the kernels of nanoqwen/kernels/lora.py. Fp and GPTQ bases alike.
- trained (`add_trainable_lora`): every adapted linear becomes a `TrainableLoRALinear` with fp32 A and B parameters
  and peft's dropout; `remove_trainable_lora` gives the result back as a `LoraAdapter` for `save_adapter`.
nanoqwen fuses mlp.w2 and mlp.w1 into mlp.w2_w1 (w2's rows first): their LoRAs become two slices of that linear.
c_attn's LoRA is one A shared by q, k and v with a [3 * hidden, r] B, as peft adapts the fused c_attn.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_safetensors_header
from .config import QwenConfig
from .kernels.lora import add_lora

CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."  # peft's prefix of every saved key
# the linears of a block peft can adapt (official names) -> (the nanoqwen linear holding them, slice in it)
LINEARS = {"attn.c_attn": ("attn.c_attn", 0), "attn.c_proj": ("attn.c_proj", 0), "mlp.w2": ("mlp.w2_w1", 0),
           "mlp.w1": ("mlp.w2_w1", 1), "mlp.c_proj": ("mlp.c_proj", 0)}
SLICES = {"attn.c_attn": 1, "attn.c_proj": 1, "mlp.w2_w1": 2, "mlp.c_proj": 1}  # nanoqwen linears and their slices
SAVED_MODULES = {"transformer.wte": "transformer.wte.weight", "lm_head": "lm_head.weight"}  # modules_to_save we read
DEFAULT_TARGETS = ("c_attn", "c_proj", "w1", "w2")  # finetune.py's lora_target_modules
LORA_KEY = re.compile(r"transformer\.h\.(\d+)\.(" + "|".join(re.escape(m) for m in LINEARS) + r")\.lora_([AB])\.weight")
FLOAT_DTYPES = ("F32", "F16", "BF16")
TO_SAFETENSORS = ("python -c \"import torch; from safetensors.torch import save_file; "
                  "sd = torch.load('adapter_model.bin', map_location='cpu', weights_only=True); "
                  "save_file({k: v.contiguous() for k, v in sd.items()}, 'adapter_model.safetensors')\"")


class AdapterError(ValueError):
    """A LoRA adapter that cannot be used, with what is wrong and what to do."""


def linear_dims(cfg: QwenConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every adaptable linear of a block, official names."""
    H, F = cfg.hidden_size, cfg.mlp_width
    return {"attn.c_attn": (H, 3 * H), "attn.c_proj": (H, H), "mlp.w1": (H, F), "mlp.w2": (H, F),
            "mlp.c_proj": (F, H)}


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class LoraAdapter:
    """One LoRA adapter in memory. `weights`: official linear name ("transformer.h.0.attn.c_attn") -> (A [r, in],
    B [out, r]) fp32 on the CPU; `scaling`: the same names -> lora_alpha / r; `saved_modules`: official tensor names
    of the full copies in the file (modules_to_save: "transformer.wte.weight", "lm_head.weight"), read on demand."""
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]
    config: dict = field(default_factory=dict)
    saved_modules: tuple[str, ...] = ()
    path: Path | None = None

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)

    def saved_tensor(self, name: str, device, dtype: torch.dtype) -> torch.Tensor:
        """The adapter's full copy of `name` (e.g. "lm_head.weight") read from its file, cast to `dtype`."""
        with safe_open(str(self.path / WEIGHTS_FILE), framework="pt", device=str(device)) as f:
            return f.get_tensor(PREFIX + name).to(dtype)


def read_adapter(path, cfg: QwenConfig) -> LoraAdapter:
    """Read and check a PEFT LoRA folder against a model config (the architecture, its sizes, the targets)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter {folder} is not a folder: pass the folder that finetune.py (peft's "
                           f"save_pretrained) wrote, with {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"{folder} has no {CONFIG_FILE}: it is not a PEFT adapter folder (pass the output_dir of "
                           "finetune.py --use_lora, which holds adapter_config.json and adapter_model.safetensors)")
    if not (folder / WEIGHTS_FILE).is_file():
        if (folder / PICKLE_FILE).is_file():
            raise AdapterError(f"{folder} holds its weights only as {PICKLE_FILE}, a pickle: nanoqwen never loads "
                               f"pickles (they can run code). Convert it once, in that folder:\n    {TO_SAFETENSORS}\n"
                               "(or save the adapter again with save_pretrained(..., safe_serialization=True))")
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE}: the adapter's weights are missing; copy the whole "
                           "folder that save_pretrained wrote")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{folder / CONFIG_FILE} is not valid JSON ({e}); save the adapter again") from e
    r, alpha, rslora = _check_config(config, folder)
    expected = _targeted(config, cfg, folder)
    saved = _saved_modules(config, folder)

    header = read_safetensors_header(folder / WEIGHTS_FILE)
    dims, n_layers = linear_dims(cfg), cfg.num_hidden_layers
    found, unknown, in_file = {}, [], set()
    for key, (dtype, shape) in header.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = LORA_KEY.fullmatch(name)
        if name in SAVED_MODULES.values():
            in_file.add(name)
            want = (cfg.vocab_size, cfg.hidden_size)
            if shape != want:
                raise AdapterError(f"{folder}: {key} has shape {list(shape)}, but this model's {name} is "
                                   f"{list(want)}: the adapter was trained on another model (vocab_size "
                                   f"{cfg.vocab_size}, hidden_size {cfg.hidden_size} here)")
        elif m is None:
            unknown.append(key)
            continue
        elif int(m[1]) >= n_layers:
            raise AdapterError(f"{folder}: {key} adapts layer {m[1]}, but this model has {n_layers} layers: the "
                               "adapter was trained on another model size; load it with its own base model")
        else:
            found.setdefault(f"transformer.h.{m[1]}.{m[2]}", {})[m[3]] = (key, shape)
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{folder}: {key} is {dtype}, LoRA weights are floats (F32, F16 or BF16); save the "
                               "adapter again")
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise AdapterError(f"{folder / WEIGHTS_FILE} holds tensors that are not LoRA weights of a Qwen (v1) linear: "
                           f"{', '.join(sorted(unknown)[:5])}{more}. This adapter was made for another architecture "
                           "(Qwen (v1) adapts transformer.h.N.attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj) "
                           "or with a peft feature nanoqwen does not load (LoRA on embeddings, biases, DoRA)")
    missing = sorted(set(expected) - set(found), key=_natural)
    extra = sorted(set(found) - set(expected), key=_natural)
    if missing or extra:
        what = (f"lacks the LoRA weights of {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}, which "
                "target_modules selects" if missing else
                f"holds LoRA weights for {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which "
                "target_modules does not select")
        raise AdapterError(f"{folder / WEIGHTS_FILE} {what}: the weights and {CONFIG_FILE} do not belong together "
                           "(or the file is incomplete); save the adapter again")
    absent = sorted(set(saved) - in_file)
    if absent:
        raise AdapterError(f"{folder / WEIGHTS_FILE} lacks {PREFIX}{absent[0]}, the copy that modules_to_save in "
                           f"{CONFIG_FILE} announces; save the adapter again")

    weights, scaling = {}, {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        for name in sorted(expected, key=_natural):
            pair = found[name]
            for part in "AB":
                if part not in pair:
                    raise AdapterError(f"{folder / WEIGHTS_FILE} has {pair[next(iter(pair))][0]} but no "
                                       f"lora_{part}: the file is incomplete; save the adapter again")
            module = name.split(".", 3)[3]
            d_in, d_out = dims[module]
            (key_a, shape_a), (key_b, shape_b) = pair["A"], pair["B"]
            if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[1] != d_in or shape_b[0] != d_out:
                bad, shape, want = (key_a, shape_a, ["r", d_in]) if len(shape_a) != 2 or shape_a[1] != d_in else \
                    (key_b, shape_b, [d_out, "r"])
                raise AdapterError(f"{folder}: {bad} has shape {list(shape)}, but this model needs {want} "
                                   f"(hidden_size {cfg.hidden_size}, MLP width {cfg.mlp_width}): the adapter was "
                                   "trained on another model; load it with its own base model")
            r_name, alpha_name = _patterned(config, name, r, alpha)
            if not shape_a[0] == shape_b[1] == r_name:
                raise AdapterError(f"{folder}: {key_a} {list(shape_a)} and {key_b} {list(shape_b)} do not have the "
                                   f"rank r = {r_name} that {CONFIG_FILE} gives this module; the weights and the "
                                   "config do not belong together")
            weights[name] = (f.get_tensor(key_a).float(), f.get_tensor(key_b).float())
            scaling[name] = alpha_name / (math.sqrt(r_name) if rslora else r_name)
    return LoraAdapter(weights, scaling, config, tuple(sorted(saved)), folder)


def _check_config(config: dict, folder: Path) -> tuple[int, float, bool]:
    def need(ok, msg):
        if not ok:
            raise AdapterError(f"{folder / CONFIG_FILE}: {msg}")
    need(isinstance(config, dict), "must be a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    need(peft_type == "LORA", f"peft_type is {peft_type}: nanoqwen loads LoRA adapters only (finetune.py --use_lora)")
    need(not config.get("use_dora"), "use_dora is true: DoRA adapters are not supported; train a plain LoRA, or "
                                     "merge it with peft's merge_and_unload() and load the merged checkpoint")
    need(config.get("bias", "none") == "none", f"bias is {config.get('bias')!r}: only bias='none' (finetune.py's) "
                                               "is supported; merge it with peft's merge_and_unload() instead")
    r, alpha = config.get("r"), config.get("lora_alpha")
    need(isinstance(r, int) and not isinstance(r, bool) and r > 0, f"r must be a positive integer, got {r!r}")
    need(isinstance(alpha, (int, float)) and not isinstance(alpha, bool), f"lora_alpha must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        need(isinstance(config.get(key) or {}, dict), f"{key} must be an object")
    return r, float(alpha), bool(config.get("use_rslora", False))


def _targeted(config: dict, cfg: QwenConfig, folder: Path) -> list[str]:
    """The linears (official names) that peft adapts under this config: its target_modules rule (a list: the name or
    a dotted suffix of it; a string: a regular expression over the whole name) and layers_to_transform."""
    targets = config.get("target_modules")
    layers = config.get("layers_to_transform")
    if layers is None:
        layers = range(cfg.num_hidden_layers)
    layers = {layers} if isinstance(layers, int) else set(layers)
    names = [f"transformer.h.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in LINEARS]
    if isinstance(targets, str):
        hit = [n for n in names if re.fullmatch(targets, n)]
        if not hit:
            raise AdapterError(f"{folder / CONFIG_FILE}: target_modules {targets!r} matches no linear of Qwen (v1) "
                               "(c_attn, c_proj, w1, w2): the adapter was made for another architecture")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        unknown = [t for t in targets if not any(_peft_match(n, t) for n in names)]
        if unknown:
            raise AdapterError(f"{folder / CONFIG_FILE}: unknown target_modules {', '.join(map(repr, unknown))}: "
                               "Qwen (v1) has the linears c_attn, c_proj (attention and MLP), w1 and w2 (LoRA on "
                               "wte or lm_head is not supported); the adapter was made for another architecture "
                               "(q_proj, v_proj, ... are Llama and Qwen1.5/2 names)")
        hit = [n for n in names if any(_peft_match(n, t) for t in targets)]
    else:
        raise AdapterError(f"{folder / CONFIG_FILE}: target_modules must be a list of module names or a regular "
                           f"expression, got {targets!r}")
    return [n for n in hit if int(n.split(".")[2]) in layers]


def _peft_match(name: str, target: str) -> bool:
    """peft's rule for a target_modules list entry: the module's full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _saved_modules(config: dict, folder: Path) -> list[str]:
    """Official tensor names of the modules_to_save copies (wte and lm_head only, as finetune.py saves them)."""
    out = []
    for entry in config.get("modules_to_save") or []:
        hit = [w for m, w in SAVED_MODULES.items() if m == entry or m.endswith("." + str(entry))]
        if not hit:
            raise AdapterError(f"{folder / CONFIG_FILE}: modules_to_save {entry!r} is not supported: nanoqwen "
                               "reads full copies of wte and lm_head only (what finetune.py saves for a base model)")
        out += hit
    return out


def _patterned(config: dict, name: str, r: int, alpha: float) -> tuple[int, float]:
    """peft's rank_pattern / alpha_pattern: the first pattern key k with `.*\\.k$` matching the module's name."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    key = next((k for k in list(ranks) + list(alphas) if re.match(rf".*\.{k}$", name)), name)
    return ranks.get(key, r), float(alphas.get(key, alpha))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def save_adapter(folder, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, lora_alpha: float,
                 modules_to_save: dict[str, torch.Tensor] | None = None, **config) -> Path:
    """Write a PEFT LoRA folder as peft 0.7 saves one: `weights` maps official linear names to (A [r, in], B [out, r]);
    `modules_to_save` official tensor names ("transformer.wte.weight", "lm_head.weight") to full copies. Other
    adapter_config.json fields come from `config`; target_modules defaults to the adapted linears' short names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = modules_to_save or {}
    targets = sorted({n.rsplit(".", 1)[1] for n in weights})
    doc = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
           "layers_to_transform": None, "loftq_config": {}, "lora_alpha": lora_alpha, "lora_dropout": 0.0,
           "megatron_config": None, "megatron_core": "megatron.core",
           "modules_to_save": [n.split(".")[-2] for n in saved] or None, "peft_type": "LORA", "r": r,
           "rank_pattern": {}, "revision": None, "target_modules": targets, "task_type": "CAUSAL_LM",
           **config}  # every field peft 0.7.1 writes (the golden adapter's), so peft reads it as its own
    tensors = {f"{PREFIX}{n}.lora_{p}.weight": t.contiguous() for n, ab in weights.items() for p, t in zip("AB", ab)}
    tensors.update({PREFIX + n: t.contiguous() for n, t in saved.items()})
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return folder


# ----------------------------------------------------------------------------------------------- merged

def adapter_for_merging(path, cfg: QwenConfig, what: str = "the checkpoint") -> LoraAdapter:
    """`read_adapter`, after refusing a GPTQ base (before any weight is loaded)."""
    if cfg.quantization_config is not None:
        raise AdapterError(f"cannot merge the LoRA adapter {path} into {what}: its linears are GPTQ-quantized, and "
                           "W + scaling * B @ A has no exact quantized form (Q-LoRA adapters are meant to stay "
                           "separate). Run it unmerged: nanoqwen.lora.LoraManager(model).add(name, path) (in the "
                           "engine: LLM(ckpt, enable_lora=True), then add_lora(name, path) and "
                           "SamplingParams(lora=name))")
    return read_adapter(path, cfg)


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: LoraAdapter) -> nn.Module:
    """Fold the adapter into the model's weights: W += scaling * B @ A (in fp32, as peft's merge_and_unload, rounded
    once to the weight's dtype; c_attn's bias untouched) and the modules_to_save copies (wte, lm_head) replace the
    model's. Costs nothing per token afterwards; the model stays a plain Qwen."""
    for name, (A, B) in adapter.weights.items():
        _, _, layer, module = name.split(".", 3)
        fused, j = LINEARS[module]
        lin = model.transformer.h[int(layer)].get_submodule(fused)
        if not isinstance(lin, nn.Linear):
            raise AdapterError(f"cannot merge a LoRA adapter into {name}: it is a {type(lin).__name__}, not an fp "
                               "nn.Linear (GPTQ weights cannot hold W + scaling * B @ A); use "
                               "nanoqwen.lora.LoraManager to run the adapter unmerged")
        width = lin.out_features // SLICES[fused]
        rows = lin.weight[j * width:(j + 1) * width]
        delta = (B.to(rows.device) @ A.to(rows.device)) * adapter.scaling[name]
        rows.copy_((rows.float() + delta).to(rows.dtype))
    for name in adapter.saved_modules:
        weight = model.get_parameter(name)
        weight.copy_(adapter.saved_tensor(name, weight.device, weight.dtype))
    return model


# ----------------------------------------------------------------------------------------------- unmerged

class _Wrapped(nn.Module):
    """A module around a linear `base` that reads as one: its in_features and out_features."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class LoRALinear(_Wrapped):
    """A linear (nn.Linear or GPTQLinear, kept as `base`) plus, for each token row, its adapter's low-rank product.

    Slot buffers (every slot preallocated, zero when empty: a CUDA graph reads them in place):
      lora_a [max_loras, slices * R, in], lora_b [max_loras, out, R] in the activation dtype, lora_scale
      [max_loras, slices] fp32, R = the manager's padded rank. Ranks below R are zero-padded."""

    def __init__(self, base: nn.Module, manager: "LoraManager", slices: int):
        super().__init__()
        self.base, self.manager, self.slices = base, manager, slices
        L, R, dev, dt = manager.max_loras, manager.padded_rank, manager.device, manager.dtype
        self.register_buffer("lora_a", torch.zeros(L, slices * R, base.in_features, dtype=dt, device=dev),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(L, base.out_features, R, dtype=dt, device=dev), persistent=False)
        self.register_buffer("lora_scale", torch.zeros(L, slices, dtype=torch.float32, device=dev), persistent=False)

    def set_slice(self, slot: int, j: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        R, width = self.manager.padded_rank, self.out_features // self.slices
        r = A.shape[0]
        self.lora_a[slot, j * R:j * R + r].copy_(A)
        self.lora_b[slot, j * width:(j + 1) * width, :r].copy_(B)
        self.lora_scale[slot, j] = scale

    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_scale[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        out = add_lora(x2, y2, self.lora_a, self.lora_b, self.lora_scale, self.manager.indices(x2.shape[0]))
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"max_loras={self.lora_a.shape[0]}, rank={self.manager.padded_rank}, slices={self.slices}"


class LoraManager:
    """Up to `max_loras` adapters served at once, unmerged, on an fp or GPTQ Qwen.

    Building it swaps every attn.c_attn, attn.c_proj, mlp.w2_w1 and mlp.c_proj of the model for a `LoRALinear`
    (as quant.gptq.swap_linears swaps modules) with preallocated slot buffers: `add` and `remove` only copy into
    them, so a CUDA graph captured once stays valid. Before each forward, `set_token_indices` says which slot each
    token row uses (-1: none); the indices live in one static buffer of `max_num_tokens` rows.
    Adapters with modules_to_save (full wte/lm_head copies of base-model fine-tunes) are refused here: load those
    merged (`load_model(path, lora=ADAPTER)`).
    """

    def __init__(self, model: nn.Module, max_loras: int = 4, max_lora_rank: int = 16, max_num_tokens: int = 8192):
        for name, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank),
                            ("max_num_tokens", max_num_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LoraManager: {name} must be a positive integer, got {value!r}")
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ValueError("this model already has a LoraManager (its linears are LoRALinear): use that one, or "
                             "close() it first")
        self.model, self.config = model, model.config
        self.max_loras, self.max_lora_rank, self.max_num_tokens = max_loras, max_lora_rank, max_num_tokens
        self.padded_rank = max(16, 1 << (max_lora_rank - 1).bit_length())  # tl.dot wants a power of two >= 16
        self.device, self.dtype = model.device, model.dtype
        self._names: list[str | None] = [None] * max_loras
        self._ids: dict[str, int] = {}
        self._next_id = 0
        self._indices = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=self.device)
        self._num_tokens: int | None = None
        self.linears: list[dict[str, LoRALinear]] = []
        for block in model.transformer.h:
            wrapped = {}
            for path, slices in SLICES.items():
                parent, attr = path.split(".")
                owner = getattr(block, parent)
                wrapped[path] = LoRALinear(getattr(owner, attr), self, slices)
                setattr(owner, attr, wrapped[path])
            self.linears.append(wrapped)

    # -- adapters
    @property
    def names(self) -> list[str]:
        """The loaded adapters, by slot."""
        return [n for n in self._names if n is not None]

    def slot(self, name: str) -> int:
        """The slot index of a loaded adapter (what set_token_indices takes)."""
        if name not in self._names:
            raise KeyError(f"no LoRA adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'}); "
                           "add it first with add(name, path)")
        return self._names.index(name)

    def adapter_id(self, name: str) -> int:
        """A number unique to this add() of `name` (never reused): a prefix cache keys its blocks with it, so an
        adapter removed and added again under the same name never shares KV blocks with its former self."""
        self.slot(name)
        return self._ids[name]

    def add(self, name: str, adapter) -> int:
        """Load an adapter (a PEFT folder or a LoraAdapter) into a free slot; returns the slot."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA adapter needs a non-empty string name, got {name!r}")
        if name in self._names:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded; remove({name!r}) it first or pick "
                             "another name")
        if not isinstance(adapter, LoraAdapter):
            adapter = read_adapter(adapter, self.config)
        where = adapter.path or name
        if adapter.saved_modules:
            raise AdapterError(f"LoRA adapter {where} carries full copies of {', '.join(adapter.saved_modules)} "
                               "(modules_to_save: a base-model fine-tune), which cannot be switched per token: load "
                               "it merged instead, load_model(ckpt, lora=path) or LLM(ckpt, lora=path)")
        if adapter.rank > self.max_lora_rank:
            raise AdapterError(f"LoRA adapter {where} has rank {adapter.rank}, above this manager's max_lora_rank "
                               f"{self.max_lora_rank}: create the LoraManager (LLM(..., max_lora_rank=...)) with "
                               f"max_lora_rank >= {adapter.rank}")
        if None not in self._names:
            raise AdapterError(f"all {self.max_loras} LoRA slots are in use ({', '.join(self.names)}): remove one "
                               "with remove(name), or create the manager with a larger max_loras")
        slot = self._names.index(None)
        for layer in self.linears:
            for lin in layer.values():
                lin.clear(slot)
        for full, (A, B) in adapter.weights.items():
            _, _, layer, module = full.split(".", 3)
            fused, j = LINEARS[module]
            self.linears[int(layer)][fused].set_slice(slot, j, A, B, adapter.scaling[full])
        self._names[slot] = name
        self._ids[name] = self._next_id
        self._next_id += 1
        return slot

    def remove(self, name: str) -> None:
        """Free an adapter's slot (zeroed, so stale indices add nothing). The caller makes sure no running sequence
        still uses it."""
        slot = self.slot(name)
        for layer in self.linears:
            for lin in layer.values():
                lin.clear(slot)
        self._names[slot] = None
        del self._ids[name]

    # -- per-token indices
    def token_indices(self, adapters: Sequence[str | None], counts: Sequence[int]) -> torch.Tensor:
        """[sum(counts)] int32 on the CPU: `counts[i]` rows of adapter `adapters[i]`'s slot (None: -1), in order.
        For a batch laid out sequence by sequence (the engine's, or model(input_ids) with [B, S]: counts = [S] * B)."""
        if len(adapters) != len(counts):
            raise ValueError(f"token_indices: {len(adapters)} adapters but {len(counts)} counts; give one of each per "
                             "sequence")
        slots = torch.tensor([-1 if a is None else self.slot(a) for a in adapters], dtype=torch.int32)
        return torch.repeat_interleave(slots, torch.tensor(counts, dtype=torch.int64))

    def set_token_indices(self, indices) -> None:
        """The slot of every token row of the next forward(s), -1 for none: a [T] integer tensor (or list), T the
        number of rows the model will see (for a CUDA graph: the padded batch, pad rows -1). Copied into a static
        buffer; CPU values are checked, device values are not (no host sync)."""
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise ValueError(f"set_token_indices takes a 1-D integer tensor (one slot per token row, -1 for no "
                             f"adapter), got {idx.dtype} of shape {list(idx.shape)}")
        T = idx.numel()
        if T > self.max_num_tokens:
            raise ValueError(f"set_token_indices got {T} rows, above this manager's max_num_tokens "
                             f"{self.max_num_tokens}: create the LoraManager with a larger max_num_tokens")
        if idx.device.type == "cpu" and T:
            loaded = {-1} | {i for i, n in enumerate(self._names) if n is not None}
            bad = sorted(set(idx.unique().tolist()) - loaded)
            if bad:
                raise ValueError(f"set_token_indices: slot(s) {bad} hold no adapter (loaded: "
                                 f"{dict((n, i) for i, n in enumerate(self._names) if n)}); use slot(name), or -1")
        self._indices[:T].copy_(idx, non_blocking=True)
        self._num_tokens = T

    def indices(self, num_rows: int) -> torch.Tensor:
        """The static [num_rows] view the LoRALinear layers read; num_rows must be what set_token_indices got."""
        if self._num_tokens != num_rows:
            got = "was never called" if self._num_tokens is None else f"was given {self._num_tokens} rows"
            raise ValueError(f"the model runs {num_rows} token rows but LoraManager.set_token_indices {got}: call "
                             "set_token_indices (one slot per token row, -1 for no adapter) before each forward")
        return self._indices[:num_rows]

    def close(self) -> None:
        """Put the model's original linears back (the adapters are dropped)."""
        for block, layer in zip(self.model.transformer.h, self.linears):
            for path, lin in layer.items():
                parent, attr = path.split(".")
                setattr(getattr(block, parent), attr, lin.base)
        self.linears, self._names = [], [None] * self.max_loras


# ----------------------------------------------------------------------------------------------- trained

class TrainableLoRALinear(_Wrapped):
    """A frozen linear (`base`: nn.Linear or GPTQLinear) plus trainable LoRA weights: fine-tuning.

    peft's semantics per adapted official linear, carried onto nanoqwen's fused ones: output slice j (of
    `len(names)` equal slices) adds scaling * B_j(A_j(dropout(x))), each slice with its own A, B and its own dropout
    draw, since peft's mlp.w2 and mlp.w1 are two modules (the slices of mlp.w2_w1); a slice whose linear is not a
    target adds nothing. c_attn is one slice: peft adapts the fused q|k|v with one A.
    A [r, in] and B [out / slices, r] are fp32 parameters (the optimizer's master weights), keyed by the official
    linear's last name ("c_attn", "w2", ...); under autocast the low-rank product runs in the autocast dtype,
    otherwise in fp32 (peft casts x to the LoRA dtype) and is added in the base output's dtype.
    """

    def __init__(self, base: nn.Module, names: list[str | None], r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base, self.names, self.scaling = base, list(names), lora_alpha / r
        device = next(iter(base.parameters()), None)
        device = (device if device is not None else next(base.buffers())).device
        width = base.out_features // len(names)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in filter(None, names):
            A = torch.empty(r, base.in_features, dtype=torch.float32)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # peft's init: B = 0, so no change yet
            self.lora_A[name] = nn.Parameter(A.to(device))
            self.lora_B[name] = nn.Parameter(torch.zeros(width, r, dtype=torch.float32, device=device))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        parts = y.split(self.out_features // len(self.names), dim=-1)
        out = []
        for part, name in zip(parts, self.names):
            if name is not None:
                A, B = self.lora_A[name], self.lora_B[name]
                h = self.lora_dropout(x)
                h = F.linear(F.linear(h if autocast else h.to(A.dtype), A), B) * self.scaling
                part = part + h.to(part.dtype)
            out.append(part)
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

    def extra_repr(self) -> str:
        return f"adapted={[n for n in self.names if n]}, scaling={self.scaling}"


def add_trainable_lora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                       target_modules=DEFAULT_TARGETS, generator: torch.Generator | None = None) -> list[str]:
    """Wrap every linear that `target_modules` selects (peft's list rule: a name or dotted suffix, e.g. "c_proj"
    selects attn.c_proj and mlp.c_proj) in a `TrainableLoRALinear` with peft's init; returns the adapted official
    linear names. Freezes nothing: the caller decides what trains."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    cfg = model.config
    names = [f"transformer.h.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in LINEARS]
    unknown = [t for t in targets if not any(_peft_match(n, t) for n in names)]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target module(s) {', '.join(map(repr, unknown)) or '(none given)'}: Qwen (v1) "
                         "has the linears c_attn, c_proj (attention and MLP), w1 and w2, or a full name such as "
                         "transformer.h.0.mlp.w1")
    adapted = []
    for i, block in enumerate(model.transformer.h):
        for path in SLICES:
            official = [m for m, (fused, _) in LINEARS.items() if fused == path]  # in slice order
            chosen = [m.split(".")[1] if any(_peft_match(f"transformer.h.{i}.{m}", t) for t in targets) else None
                      for m in sorted(official, key=lambda m: LINEARS[m][1])]
            if not any(chosen):
                continue
            parent, attr = path.split(".")
            owner = getattr(block, parent)
            setattr(owner, attr, TrainableLoRALinear(getattr(owner, attr), chosen, r, lora_alpha, lora_dropout,
                                                     generator))
            adapted += [f"transformer.h.{i}.{parent}.{n}" for n in chosen if n]
    return adapted


def _trained_layers(model: nn.Module):
    """(official linear name, TrainableLoRALinear, its slice name) for every adapted slice, layer by layer."""
    for i, block in enumerate(model.transformer.h):
        for path in SLICES:
            parent, attr = path.split(".")
            lin = getattr(getattr(block, parent), attr)
            if isinstance(lin, TrainableLoRALinear):
                for name in filter(None, lin.names):
                    yield f"transformer.h.{i}.{parent}.{name}", lin, name


def trainable_lora_adapter(model: nn.Module) -> LoraAdapter:
    """The model's trained LoRA weights as a `LoraAdapter` (fp32 CPU copies): for save_adapter or merge_adapter."""
    weights, scaling = {}, {}
    for official, lin, name in _trained_layers(model):
        weights[official] = (lin.lora_A[name].detach().float().cpu().clone(),
                             lin.lora_B[name].detach().float().cpu().clone())
        scaling[official] = lin.scaling
    return LoraAdapter(weights, scaling)


@torch.no_grad()
def set_trainable_lora(model: nn.Module, adapter: LoraAdapter) -> None:
    """Copy an adapter's A and B into the model's TrainableLoRALinear layers (same targets, ranks and scaling)."""
    layers = {official: (lin, name) for official, lin, name in _trained_layers(model)}
    if set(layers) != set(adapter.weights):
        diff = sorted(set(layers) ^ set(adapter.weights), key=_natural)
        raise AdapterError(f"the adapter and the model's trainable LoRA layers adapt different linears (e.g. "
                           f"{', '.join(diff[:3])}): train with the adapter's target_modules")
    for official, (A, B) in adapter.weights.items():
        lin, name = layers[official]
        if lin.lora_A[name].shape != A.shape or lin.lora_B[name].shape != B.shape or \
                not math.isclose(lin.scaling, adapter.scaling[official]):
            raise AdapterError(f"{official}: the adapter has A {list(A.shape)}, B {list(B.shape)}, scaling "
                               f"{adapter.scaling[official]}; the model's LoRA layer A "
                               f"{list(lin.lora_A[name].shape)}, B {list(lin.lora_B[name].shape)}, scaling "
                               f"{lin.scaling}: use the adapter's r and lora_alpha")
        lin.lora_A[name].copy_(A)
        lin.lora_B[name].copy_(B)


def remove_trainable_lora(model: nn.Module) -> LoraAdapter:
    """Put the model's original linears back; returns the trained LoRA weights (trainable_lora_adapter)."""
    adapter = trainable_lora_adapter(model)
    for block in model.transformer.h:
        for path in SLICES:
            parent, attr = path.split(".")
            lin = getattr(getattr(block, parent), attr)
            if isinstance(lin, TrainableLoRALinear):
                setattr(getattr(block, parent), attr, lin.base)
    return adapter
