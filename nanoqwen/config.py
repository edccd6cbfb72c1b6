"""`QwenConfig`: the model shape and long-context settings, read from an official Qwen (v1) `config.json`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Qwen v1.0 (Aug 2023) configs used GPT-2 style names; v1.1 renamed them. Map old -> new.
V10_NAMES = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_positions": "max_position_embeddings",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
}


class ConfigError(ValueError):
    """A config.json that nanoqwen cannot run, with the reason and the file."""


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_hidden_layers: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # the MLP width is intermediate_size // 2 (a Qwen quirk)
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    layer_norm_epsilon: float = 1e-6
    seq_length: int = 8192  # threshold of dynamic NTK and LogN
    max_position_embeddings: int = 32768  # informational: the reference code never reads it
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)  # every other key of config.json, kept for round trips

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "QwenConfig":
        d = dict(d)
        for old, new in V10_NAMES.items():
            if old in d and new not in d:
                d[new] = d.pop(old)
        names = {f.name for f in fields(cls)} - {"extra"}
        if "seq_length" not in d:
            raise ConfigError(f"{source}: has no 'seq_length' (the NTK/LogN threshold; 8192 for Qwen-7B, 2048 for "
                              "Qwen-14B). Add it to config.json: the reference code cannot run without it either.")
        kwargs = {k: d[k] for k in names if k in d}
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls(**kwargs, extra=extra)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "QwenConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: pass a Qwen checkpoint folder (it holds config.json, "
                              "*.safetensors and qwen.tiktoken)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return {**extra, **d}

    def validate(self, source: str = "config") -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"{source}: {msg}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "kv_channels",
                     "intermediate_size", "seq_length"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        need(self.kv_channels * self.num_attention_heads == self.hidden_size,
             f"kv_channels * num_attention_heads = {self.kv_channels} * {self.num_attention_heads} = "
             f"{self.kv_channels * self.num_attention_heads} != hidden_size {self.hidden_size}; Qwen v1 needs them "
             "equal (no grouped-query attention)")
        need(self.intermediate_size % 2 == 0, f"intermediate_size {self.intermediate_size} must be even (MLP width "
             "is intermediate_size // 2)")
        need(0 < self.rotary_pct <= 1, f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        need(self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
             f"rotary dim kv_channels * rotary_pct = {self.rotary_dim} must be a positive even number")
        need(self.rotary_emb_base > 0, f"rotary_emb_base must be positive, got {self.rotary_emb_base}")
        need(self.layer_norm_epsilon > 0, f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")
        need(not self.tie_word_embeddings, "tie_word_embeddings=true is not a Qwen v1 model (its lm_head is untied)")
        q = self.quantization_config
        need(q is None or isinstance(q, dict), "quantization_config must be an object")
