"""Read official Qwen (v1) checkpoints, check them against the config, convert them, and load models.

Official layout: `config.json`, `model.safetensors` or shards + `model.safetensors.index.json`, `qwen.tiktoken`,
`generation_config.json`. nanoqwen layout (written by `convert`): the same side files, `nanoqwen.json` (format marker
and dtype), and the weights in safetensors with the MLP's w2 and w1 fused into `mlp.w2_w1` (one matmul). Only
safetensors are ever read: pickled `*.bin` checkpoints are refused.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import QwenConfig

FORMAT_FILE = "nanoqwen.json"
FORMAT_VERSION = 1
SIDE_FILES = ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json")
IGNORED_SUFFIXES = ("attn.masked_bias", "rotary_emb.inv_freq")  # buffers some exports carry; never weights
PROGRESS_MIN_BYTES = 256 << 20  # show progress bars only for checkpoints at least this large
SHARD_BYTES = 4 << 30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ST_DTYPES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "I16": 2, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded, with what is wrong and what to do."""


def parse_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of bfloat16, float16, float32")
    return DTYPES[dtype]


def resolve_device(device=None) -> torch.device:
    """The device to run on: `device` checked (cpu, cuda or cuda:N, and that it exists here), or cuda when a GPU is
    available, else cpu. Raises ValueError with what to pass instead."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported: nanoqwen runs on cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no NVIDIA GPU is visible"
        raise ValueError(f"device {device!r} was asked for, but {why}; use --device cpu (device='cpu'), or install "
                         "a CUDA build of PyTorch on a machine with a GPU")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {device!r} does not exist: this machine has {count} GPU(s), cuda:0 to "
                         f"cuda:{count - 1}")
    return dev


def default_dtype(device: torch.device, quantized: bool = False) -> torch.dtype:
    """bf16 on CUDA (fp16 for GPTQ checkpoints, as the reference runs them), fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if quantized else torch.bfloat16


# ----------------------------------------------------------------------------------------------- names and shapes

OFFICIAL_QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")  # GPTQ linears of a block
INT32_SUFFIXES = (".qweight", ".qzeros", ".g_idx", ".qweight_planar", ".perm")


def gptq_config(cfg: QwenConfig):
    """The checkpoint's GPTQ settings, or None for an fp checkpoint (other quantization methods are refused)."""
    if cfg.quantization_config is None:
        return None
    from .quant.gptq import read_quantize_config
    return read_quantize_config(cfg.quantization_config)


def official_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint and its shape ([out, in] for linears; the AutoGPTQ tensors of each
    quantized linear for a GPTQ checkpoint, see `optional_names` for the ones that may be absent)."""
    H, F, V = cfg.hidden_size, cfg.mlp_width, cfg.vocab_size
    shapes = {"transformer.wte.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (H,), p + "attn.c_attn.weight": (3 * H, H), p + "attn.c_attn.bias": (3 * H,),
                       p + "attn.c_proj.weight": (H, H), p + "ln_2.weight": (H,), p + "mlp.w1.weight": (F, H),
                       p + "mlp.w2.weight": (F, H), p + "mlp.c_proj.weight": (H, F)})
        if not cfg.no_bias:
            shapes.update({p + "attn.c_proj.bias": (H,), p + "mlp.w1.bias": (F,), p + "mlp.w2.bias": (F,),
                           p + "mlp.c_proj.bias": (H,)})
    g = gptq_config(cfg)
    if g is None:
        return shapes
    pack = 32 // g.bits
    for i in range(cfg.num_hidden_layers):
        for lin in OFFICIAL_QUANTIZED:
            p = f"transformer.h.{i}.{lin}."
            N, K = shapes.pop(p + "weight")
            shapes.pop(p + "bias", None)
            groups = 1 if g.group_size == -1 else -(-K // g.group_size)
            shapes.update({p + "qweight": (K // pack, N), p + "qzeros": (groups, -(-N // pack)),
                           p + "scales": (groups, N), p + "g_idx": (K,), p + "bias": (N,)})
    return shapes


def optional_names(cfg: QwenConfig) -> set[str]:
    """GPTQ tensors a checkpoint may omit: g_idx (then i // group_size) and the zero biases of bias-less layers."""
    if cfg.quantization_config is None:
        return set()
    return {n for n in official_shapes(cfg) if n.endswith(".g_idx") or
            (n.endswith(".bias") and ".attn.c_attn." not in n)}


def nanoqwen_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """The converted layout: official names with mlp.w2 and mlp.w1 fused into mlp.w2_w1; GPTQ linears in the
    planar layout of nanoqwen.quant.gptq (qweight_planar, scales, zeros, bias; perm for act-order)."""
    shapes = {}
    for name, shape in official_shapes(cfg).items():
        if ".mlp.w1." in name:
            continue
        if ".mlp.w2." in name:
            name = name.replace(".mlp.w2.", ".mlp.w2_w1.")
            shape = (2 * shape[0],) + shape[1:] if name.endswith((".weight", ".bias")) else shape
        shapes[name] = shape
    g = gptq_config(cfg)
    if g is None:
        return shapes
    from .quant.gptq import GPTQLinear
    H, F = cfg.hidden_size, cfg.mlp_width
    dims = {"attn.c_attn": (H, 3 * H), "attn.c_proj": (H, H), "mlp.w2_w1": (H, 2 * F), "mlp.c_proj": (F, H)}
    for i in range(cfg.num_hidden_layers):
        for lin, (K, N) in dims.items():
            p = f"transformer.h.{i}.{lin}."
            for n in [n for n in shapes if n.startswith(p)]:
                del shapes[n]
            empty = GPTQLinear(K, N, g.bits, g.group_size, bias=True, device="meta")
            shapes.update({p + n: tuple(b.shape) for n, b in empty.named_buffers()})
    return shapes


# ----------------------------------------------------------------------------------------------- reading files

def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors header, after checking the file holds all the data it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if n is None or n > size - 8 or n > (100 << 20):
            raise CheckpointError(f"{path} is not a readable safetensors file (its header is cut off or corrupt, "
                                  f"{size} bytes on disk); re-download or re-convert it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download or re-convert it") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header declares {8 + n + end:,} bytes but the file has "
                              f"{size:,}; the download or copy was interrupted, fetch the file again")
    return {name: (v["dtype"], tuple(v["shape"])) for name, v in header.items()}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (folder / f).is_file():
                raise CheckpointError(f"checkpoint shard {f} (listed in {index.name}) is missing from {folder}; "
                                      "download the complete checkpoint (every model-*.safetensors file)")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (f" It has {', '.join(pickles[:3])}: nanoqwen never loads pickled weights (they can run code); "
                "download the safetensors version of the checkpoint.") if pickles else ""
        raise CheckpointError(f"no *.safetensors weights in {folder}.{hint}")
    return files


def tensor_locations(folder: Path) -> tuple[dict[str, Path], dict[str, tuple[str, tuple[int, ...]]]]:
    """name -> file and name -> (dtype, shape) over every weight file, each file checked for truncation."""
    where, meta = {}, {}
    for f in weight_files(folder):
        for name, info in read_safetensors_header(f).items():
            where[name], meta[name] = f, info
    return where, meta


def check_tensors(meta: dict, expected: dict, folder: Path, what: str, optional=frozenset()) -> None:
    names = {n for n in meta if not n.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - names - set(optional), key=_natural)
    unexpected = sorted(names - set(expected), key=_natural)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing from the {what}: {', '.join(missing[:5])}"
                              f"{more}. The weights do not match config.json, or a shard is incomplete.")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{folder}: unexpected tensor(s) in the {what}: {', '.join(unexpected[:5])}{more}. "
                              "Is this a Qwen (v1) checkpoint, and does config.json belong to these weights?")
    for name, shape in expected.items():
        if name not in meta:
            continue
        if name.endswith(INT32_SUFFIXES) and meta[name][0] != "I32":
            raise CheckpointError(f"{folder}: GPTQ tensor {name} is {meta[name][0]}, but packed GPTQ tensors are int32 "
                                  "(a float cast corrupts them); re-download the checkpoint")
        if meta[name][1] != tuple(shape):
            raise CheckpointError(f"{folder}: tensor {name} has shape {list(meta[name][1])}, but config.json implies "
                                  f"{list(shape)}; the weights and config.json do not belong together")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]


def is_converted(folder: Path) -> bool:
    return (Path(folder) / FORMAT_FILE).is_file()


# ----------------------------------------------------------------------------------------------- conversion

def iter_official(folder: Path, cfg: QwenConfig, dtype: torch.dtype | None, device="cpu", desc="loading"):
    """Yield (nanoqwen name, tensor) from an official folder, checked, cast to `dtype` (None: as stored), w2/w1
    fused; GPTQ linears repacked into GPTQLinear's planar buffers (never cast)."""
    where, meta = tensor_locations(folder)
    expected = official_shapes(cfg)
    check_tensors(meta, expected, folder, "checkpoint", optional_names(cfg))
    total = sum(_nbytes(*meta[n]) for n in expected if n in meta)
    handles = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < PROGRESS_MIN_BYTES)

    def get(name, cast=True):
        if name not in meta:
            return None
        f = where[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device=str(device))
        bar.update(_nbytes(*meta[name]))
        t = handles[f].get_tensor(name)
        return t if dtype is None or not cast else t.to(dtype)

    def gptq_linear(prefix):
        from .quant.gptq import GPTQLinear
        t = {k: get(prefix + k, cast=False) for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        if t["bias"] is None:
            t["bias"] = torch.zeros(t["scales"].shape[1], dtype=t["scales"].dtype, device=t["scales"].device)
        return GPTQLinear.from_official(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t["bias"], g.bits,
                                        g.group_size)

    g = gptq_config(cfg)
    try:
        if g is not None:
            from .quant.gptq import GPTQLinear
            for i in range(cfg.num_hidden_layers):
                p = f"transformer.h.{i}."
                for name in ("ln_1.weight", "ln_2.weight"):
                    yield p + name, get(p + name)
                lins = {"attn.c_attn": gptq_linear(p + "attn.c_attn."), "attn.c_proj": gptq_linear(p + "attn.c_proj."),
                        "mlp.w2_w1": GPTQLinear.cat([gptq_linear(p + "mlp.w2."), gptq_linear(p + "mlp.w1.")]),
                        "mlp.c_proj": gptq_linear(p + "mlp.c_proj.")}
                for lin, module in lins.items():
                    for name, buf in module.named_buffers():
                        yield f"{p}{lin}.{name}", buf
            for name in ("transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"):
                yield name, get(name)
            return
        for name in nanoqwen_shapes(cfg):
            if ".mlp.w2_w1." in name:
                w2 = get(name.replace(".w2_w1.", ".w2."))
                yield name, torch.cat([w2, get(name.replace(".w2_w1.", ".w1."))])
            else:
                yield name, get(name)
    finally:
        bar.close()


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None, quantized: bool) -> torch.Tensor:
    """Cast an fp tensor to the model dtype; GPTQ linears keep theirs (int32 words, fp16 scales, zeros and bias)."""
    if dtype is None or t.dtype == torch.int32:
        return t
    if quantized and any(f".{lin}." in name for lin in ("attn.c_attn", "attn.c_proj", "mlp.w2_w1", "mlp.c_proj")):
        return t
    return t.to(dtype)


def _nbytes(st_dtype: str, shape) -> int:
    n = ST_DTYPES.get(st_dtype, 2)
    for s in shape:
        n *= s
    return n


def convert(src, dst, dtype=None) -> Path:
    """Convert an official Qwen checkpoint folder into a nanoqwen folder (weights cast to `dtype`; None keeps the
    checkpoint's own dtype)."""
    src, dst = Path(src), Path(dst)
    dtype = parse_dtype(dtype)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder: pass the folder of an official Qwen checkpoint")
    if is_converted(src):
        raise CheckpointError(f"{src} is already a nanoqwen folder; load it directly")
    cfg = QwenConfig.from_json(src)
    gptq_config(cfg)  # refuses quantization methods other than GPTQ
    dst.mkdir(parents=True, exist_ok=True)
    shard, shard_bytes = {}, 0
    tmp, stored = [], dtype
    try:
        for name, t in iter_official(src, cfg, dtype, desc=f"converting {src.name}"):
            stored = stored or t.dtype
            shard[name] = t.contiguous()
            shard_bytes += t.numel() * t.element_size()
            if shard_bytes >= SHARD_BYTES:
                tmp.append(_write_shard(dst, len(tmp), shard))
                shard, shard_bytes = {}, 0
        if shard or not tmp:
            tmp.append(_write_shard(dst, len(tmp), shard))
    except BaseException:  # no half-written shards left behind
        for path in dst.glob(".shard-*.tmp"):
            path.unlink(missing_ok=True)
        raise
    weight_map = {}
    for i, (path, names) in enumerate(tmp):
        final = dst / (f"model-{i + 1:05d}-of-{len(tmp):05d}.safetensors" if len(tmp) > 1 else "model.safetensors")
        path.replace(final)
        weight_map.update({n: final.name for n in names})
    if len(tmp) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    (dst / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    for f in SIDE_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    (dst / FORMAT_FILE).write_text(json.dumps({"format": "nanoqwen", "version": FORMAT_VERSION,
                                               "dtype": str(stored).removeprefix("torch.")}, indent=2))
    return dst


def _write_shard(dst: Path, i: int, tensors: dict) -> tuple[Path, list[str]]:
    path = dst / f".shard-{i}.tmp"
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates files 0600; readable like the other files
    return path, list(tensors)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def converted_tensors(folder: Path, cfg: QwenConfig) -> tuple[dict[str, Path], dict]:
    """name -> file and name -> (dtype, shape) of a nanoqwen folder, checked against the config."""
    marker = json.loads((folder / FORMAT_FILE).read_text())
    if marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder} was converted by a different nanoqwen version (format "
                              f"{marker.get('version')}, this one reads {FORMAT_VERSION}); convert the official "
                              "checkpoint again with convert_checkpoint.py")
    where, meta = tensor_locations(folder)
    optional = {n for n in meta if n.endswith(".perm")}  # act-order GPTQ only
    check_tensors(meta, {**nanoqwen_shapes(cfg), **{n: meta[n][1] for n in optional}}, folder, "converted checkpoint")
    return where, meta


def iter_converted(folder: Path, cfg: QwenConfig, dtype: torch.dtype, device="cpu"):
    """Yield (name, tensor) from a nanoqwen folder, checked against the config."""
    quantized = cfg.quantization_config is not None
    where, meta = converted_tensors(folder, cfg)
    total = sum(_nbytes(*m) for m in meta.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {folder.name}",
              disable=total < PROGRESS_MIN_BYTES) as bar:
        for f in sorted(set(where.values())):
            with safe_open(str(f), framework="pt", device=str(device)) as h:
                for name in h.keys():
                    if name in meta and not name.endswith(IGNORED_SUFFIXES):
                        bar.update(_nbytes(*meta[name]))
                        yield name, _cast(name, h.get_tensor(name), dtype, quantized)


class SliceReader:
    """Parts of a converted checkpoint's tensors, read from the memory-mapped safetensors: only the rows or columns
    asked for are copied (under tensor parallelism each rank reads its shard, never a whole copy of the model)."""

    def __init__(self, folder: Path, cfg: QwenConfig):
        self.folder = Path(folder)
        self.where, self.meta = converted_tensors(self.folder, cfg)
        self._handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][1]

    def read(self, name: str, dim: int = 0, parts=None) -> torch.Tensor:
        """The tensor `name` on the CPU; `parts` along `dim`: None (all of it), a list of (start, stop) ranges
        (concatenated in order), or an index tensor (the whole tensor is read once, then indexed)."""
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        sl = self._handles[f].get_slice(name)
        if parts is None or isinstance(parts, torch.Tensor):
            t = sl[:]
            return t if parts is None else t.index_select(dim, parts.long())
        pieces = [sl[a:b] if dim == 0 else sl[:, a:b] for a, b in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


# ----------------------------------------------------------------------------------------------- loading

def load_model(path, device=None, dtype=None, lora=None, use_dynamic_ntk: bool | None = None,
               use_logn_attn: bool | None = None, tp=None):
    """A `Qwen` from a converted nanoqwen folder or an official folder (converted in memory, never written).
    `lora`: a PEFT LoRA adapter folder merged into the weights (see nanoqwen.lora; refused for GPTQ checkpoints).
    `use_dynamic_ntk` / `use_logn_attn`: override config.json's long-context switches for this model (None: keep
    them). Every path reads them from `model.config`: the model's forward (LogN, the NTK row of `model(input_ids)`),
    the Triton kernels (through the step's metadata) and the engine's scheduler (a sequence's NTK row).
    `tp`: a nanoqwen.distributed.TPGroup: this rank's shard of a converted folder (nanoqwen.distributed)."""
    from .model import Qwen

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass a Qwen checkpoint folder (official or converted by "
                              "convert_checkpoint.py)")
    device = resolve_device(device)
    cfg = QwenConfig.from_json(folder)
    for name, value in (("use_dynamic_ntk", use_dynamic_ntk), ("use_logn_attn", use_logn_attn)):
        if value is not None:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True, False or None (keep config.json's), got {value!r}")
            setattr(cfg, name, value)
    g = gptq_config(cfg)
    dtype = parse_dtype(dtype) or default_dtype(device, quantized=g is not None)
    if tp is not None:
        if lora is not None:
            raise ValueError("LoRA adapters cannot be merged into a tensor-parallel shard: run with "
                             "tensor_parallel_size=1 to use LoRA")
        from .distributed import load_shard
        return load_shard(folder, cfg, device, dtype, tp)
    if lora is not None:  # checked before the weights load
        from .lora import adapter_for_merging, merge_adapter
        adapter = adapter_for_merging(lora, cfg, str(folder))
    tensors = iter_converted(folder, cfg, dtype, device) if is_converted(folder) else \
        iter_official(folder, cfg, dtype, device, desc=f"loading {folder.name}")
    with torch.device("meta"):
        model = Qwen(cfg)
    if g is not None:
        from .quant.gptq import swap_linears
        swap_linears(model, g.bits, g.group_size, device="meta")
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    model.rotary = type(model.rotary)(cfg.rotary_dim, cfg.rotary_emb_base).to(device)
    if lora is not None:
        merge_adapter(model, adapter)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- --ckpt names

KNOWN_CHECKPOINTS = {
    "qwen-7b": "Qwen/Qwen-7B", "qwen-7b-chat": "Qwen/Qwen-7B-Chat",
    "qwen-14b": "Qwen/Qwen-14B", "qwen-14b-chat": "Qwen/Qwen-14B-Chat",
    "qwen-7b-chat-int4": "Qwen/Qwen-7B-Chat-Int4", "qwen-7b-chat-int8": "Qwen/Qwen-7B-Chat-Int8",
    "qwen-14b-chat-int4": "Qwen/Qwen-14B-Chat-Int4", "qwen-14b-chat-int8": "Qwen/Qwen-14B-Chat-Int8",
}
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "qwen.tiktoken"]


def nanoqwen_home() -> Path:
    """Where converted checkpoints are cached: $NANOQWEN_HOME, else ~/.cache/nanoqwen."""
    return Path(os.environ.get("NANOQWEN_HOME") or Path.home() / ".cache" / "nanoqwen")


def resolve_checkpoint(ckpt, progress: bool = True, need_tokenizer: bool = True) -> Path:
    """A loadable nanoqwen folder for `ckpt`: a known name, an `Org/Name` repo id (downloaded with
    huggingface_hub), an official folder (converted once into the cache) or a converted folder. With
    `need_tokenizer`, a folder without qwen.tiktoken is refused before any conversion."""
    import re
    text = str(ckpt)
    path = Path(text).expanduser()
    if path.is_dir():
        if need_tokenizer:
            require_tokenizer(path)
        return path if is_converted(path) else cached_conversion(path, progress)
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or os.sep in text.strip("/").split("/", 1)[-1]
    repo = KNOWN_CHECKPOINTS.get(text.lower())
    if repo is None and not looks_like_path and re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        repo = text
    if repo is None:
        where = f"no folder {path} exists, and it is not" if looks_like_path or os.sep in text else "not"
        raise CheckpointError(f"unknown checkpoint {text!r}: {where} one of the known names "
                              f"({', '.join(KNOWN_CHECKPOINTS)}) or a Hugging Face repo id (Org/Name). To use a local "
                              "copy, pass its folder: --ckpt /path/to/Qwen-7B-Chat")
    folder = download(repo)
    if need_tokenizer:
        require_tokenizer(folder)
    return cached_conversion(folder, progress)


def download(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...: all end the same way for the user
        raise CheckpointError(f"could not download {repo} from the Hugging Face Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}). If you are offline or the repo is "
                              "private, download it elsewhere and pass its folder: --ckpt /path/to/folder") from e


def cached_conversion(src: Path, progress: bool = True) -> Path:
    """Convert an official folder once into the cache (keyed by its path and its files' sizes and times)."""
    import hashlib
    src = src.resolve()
    cfg = QwenConfig.from_json(src)
    gptq_config(cfg)  # refuses quantization methods other than GPTQ
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.iterdir() if f.is_file())
    key = hashlib.sha1(repr((str(src), files)).encode()).hexdigest()[:12]
    home = nanoqwen_home()
    dst = home / f"{src.name}-{key}"
    if is_converted(dst):
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"cannot write the converted checkpoint into {home} ({e.strerror or e}): set "
                              "NANOQWEN_HOME to a writable folder, or convert once yourself with "
                              f"`python convert_checkpoint.py {src} OUT_DIR` and pass OUT_DIR") from None
    if progress:
        import sys
        print(f"converting {src} into {dst} (once; NANOQWEN_HOME sets where)", file=sys.stderr, flush=True)
    try:
        convert(src, tmp, dtype=None)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    except BaseException as e:  # a failed or interrupted conversion leaves nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"converting {src} into {home} failed ({e.strerror or e}): check the free space "
                                  "and permissions there, or set NANOQWEN_HOME to another folder") from None
        raise
    return dst


def require_tokenizer(folder: Path) -> None:
    """An official or converted folder must carry qwen.tiktoken: checked before any slow work, naming the folder."""
    if not (Path(folder) / "qwen.tiktoken").is_file():
        raise CheckpointError(f"{folder} has no qwen.tiktoken (the tokenizer vocabulary): copy it from the same "
                              "Hugging Face repo (it sits beside config.json), then try again")
