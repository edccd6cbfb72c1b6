"""Config validation and converter/loader errors: each bad checkpoint gives a clear message naming what is wrong."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, qwen7b_dir
from nanoqwen import Qwen, QwenConfig
from nanoqwen.checkpoint import CheckpointError, convert, nanoqwen_shapes, official_shapes
from nanoqwen.config import ConfigError
from nanoqwen.testing import random_official_state_dict, tiny_config, write_official_checkpoint

SMALL = dict(vocab_size=512, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, kv_channels=16,
             intermediate_size=64, seq_length=16)


@pytest.fixture
def ckpt(tmp_path):
    return write_official_checkpoint(tmp_path / "official", tiny_config(**SMALL))


def test_config_from_real_qwen7b():
    folder = qwen7b_dir()
    if folder is None:
        pytest.skip("../shared/qwen/Qwen-7B not present")
    cfg = QwenConfig.from_json(folder / "config.json")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.head_dim) == (4096, 32, 32, 128)
    assert (cfg.mlp_width, cfg.seq_length, cfg.vocab_size) == (11008, 8192, 151936)
    # every tensor of the real index, and nothing else, is what the config implies
    names = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == set(official_shapes(cfg))
    n_params = sum(torch.Size(s).numel() for s in official_shapes(cfg).values())
    assert n_params == 7_721_324_544


def test_config_v10_names_mapped():
    cfg = QwenConfig.from_dict(dict(n_embd=64, n_head=4, n_layer=2, ffn_hidden_size=256, padded_vocab_size=1000,
                                    kv_channels=16, seq_length=2048))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size,
            cfg.vocab_size) == (64, 4, 2, 256, 1000)


@pytest.mark.parametrize("change, message", [
    (dict(kv_channels=8), r"kv_channels \* num_attention_heads"),
    (dict(hidden_size=33), "not divisible"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (dict(intermediate_size=63), "must be even"),
    (dict(rotary_pct=0), "rotary_pct"),
])
def test_config_validation(change, message):
    with pytest.raises(ConfigError, match=message):
        QwenConfig.from_dict({**SMALL, **change})


def test_config_needs_seq_length():
    with pytest.raises(ConfigError, match="seq_length"):
        QwenConfig.from_dict({k: v for k, v in SMALL.items() if k != "seq_length"})


def test_convert_round_trip(ckpt, tmp_path):
    out = convert(ckpt, tmp_path / "conv", "float32")
    assert (out / "nanoqwen.json").is_file() and (out / "generation_config.json").is_file()
    a = Qwen.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    b = Qwen.from_pretrained(out, device="cpu", dtype=torch.float32)
    sd = random_official_state_dict(a.config)
    w2w1 = b.state_dict()["transformer.h.1.mlp.w2_w1.weight"]
    torch.testing.assert_close(w2w1, torch.cat([sd["transformer.h.1.mlp.w2.weight"], sd["transformer.h.1.mlp.w1.weight"]]).float())
    assert set(b.state_dict()) == set(nanoqwen_shapes(b.config))
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)


def test_convert_cli(ckpt, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), str(ckpt), str(tmp_path / "c"),
                        "--dtype", "bfloat16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "c" / "nanoqwen.json").read_text())["dtype"] == "bfloat16"
    m = Qwen.from_pretrained(tmp_path / "c", device="cpu")
    assert m.dtype == torch.float32  # the CPU default; the stored bf16 values are upcast
    bad = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), str(tmp_path / "nope"),
                          str(tmp_path / "d")], capture_output=True, text=True)
    assert bad.returncode == 1 and "is not a folder" in bad.stderr and "Traceback" not in bad.stderr


def test_missing_shard(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        Qwen.from_pretrained(ckpt, device="cpu")


def test_truncated_file(ckpt):
    f = ckpt / "model-00001-of-00002.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors is truncated"):
        Qwen.from_pretrained(ckpt, device="cpu")
    f.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Qwen.from_pretrained(ckpt, device="cpu")


def _rewrite(ckpt, edit):
    cfg = QwenConfig.from_json(ckpt)
    sd = random_official_state_dict(cfg)
    edit(sd)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    write_official_checkpoint(ckpt, cfg, state_dict=sd)


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda sd: sd.pop("transformer.h.1.mlp.w1.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*transformer\.h\.1\.mlp\.w1\.weight"):
        Qwen.from_pretrained(ckpt, device="cpu")


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"transformer.h.5.attn.c_attn.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected .*transformer\.h\.5\.attn\.c_attn\.weight"):
        Qwen.from_pretrained(ckpt, device="cpu")


def test_wrong_shape(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(96, 16)}))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.weight has shape \[96, 16\].*\[96, 32\]"):
        Qwen.from_pretrained(ckpt, device="cpu")


def test_pickle_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMALL))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="never loads pickled weights"):
        Qwen.from_pretrained(folder, device="cpu")


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen.from_pretrained(tmp_path, device="cpu")


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        Qwen.from_pretrained(tmp_path / "missing", device="cpu")


def test_ignored_buffers_accepted(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"transformer.h.0.attn.rotary_emb.inv_freq": torch.zeros(8)}))
    Qwen.from_pretrained(ckpt, device="cpu")


def test_model_input_errors(ckpt):
    m = Qwen.from_pretrained(ckpt, device="cpu")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        m(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"must be in \[0, 512\)"):
        m(torch.tensor([[1, 600]]))
    with pytest.raises(TypeError, match="integer"):
        m(torch.tensor([[1.0, 2.0]]))


def test_dtypes(ckpt):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = Qwen.from_pretrained(ckpt, device="cpu", dtype=dtype)
        assert m.dtype == dtype and m.lm_head.weight.dtype == dtype
        out = m(torch.tensor([[1, 2, 3]]))
        assert out.dtype == dtype and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown dtype"):
        Qwen.from_pretrained(ckpt, device="cpu", dtype="float8")


def test_progress_bar_on_large_checkpoints(ckpt, tmp_path, monkeypatch, capsys):
    """Conversion and loading show a progress bar on stderr for checkpoints above the size threshold."""
    import nanoqwen.checkpoint as ck
    monkeypatch.setattr(ck, "PROGRESS_MIN_BYTES", 0)
    convert(ckpt, tmp_path / "conv")
    assert "converting official" in capsys.readouterr().err
    Qwen.from_pretrained(tmp_path / "conv", device="cpu")
    assert "loading conv" in capsys.readouterr().err


# ------------------------------------------------------------------------- the cached conversion behind --ckpt
def _home_entries(home):
    return sorted(p.name for p in home.iterdir()) if home.exists() else []


def test_missing_tokenizer_refused_before_converting(ckpt, tmp_path, monkeypatch):
    """A folder without qwen.tiktoken is refused at once (no conversion), naming the folder the user gave."""
    from nanoqwen import LLM
    home = tmp_path / "home"
    monkeypatch.setenv("NANOQWEN_HOME", str(home))
    with pytest.raises(CheckpointError, match=f"{ckpt} has no qwen.tiktoken"):
        LLM(ckpt, device="cpu")
    assert _home_entries(home) == []


def test_conversion_cache_failures(ckpt, qwen_tiktoken, tmp_path, monkeypatch):
    """An unwritable NANOQWEN_HOME says so and names the variable; a conversion that fails leaves no .tmp folder;
    the converted weights get the same permissions as the other files."""
    import shutil
    from nanoqwen.checkpoint import resolve_checkpoint
    shutil.copyfile(qwen_tiktoken, ckpt / "qwen.tiktoken")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NANOQWEN_HOME", str(blocker / "home"))  # under a file: no folder can be made (even as root)
    with pytest.raises(CheckpointError, match="set NANOQWEN_HOME to a writable folder"):
        resolve_checkpoint(ckpt, progress=False)
    home = tmp_path / "home"
    monkeypatch.setenv("NANOQWEN_HOME", str(home))
    shard = ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        resolve_checkpoint(ckpt, progress=False)
    assert _home_entries(home) == []
    shard.write_bytes(data)
    out = resolve_checkpoint(ckpt, progress=False)
    assert _home_entries(home) == [out.name]
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(out / "model.safetensors") == mode(out / "config.json"), (oct(mode(out / "model.safetensors")),)


def test_device_errors(ckpt):
    from nanoqwen.checkpoint import resolve_device
    with pytest.raises(ValueError, match="unknown device 'nonsense': use cpu, cuda or cuda:N"):
        resolve_device("nonsense")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        for dev in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="use --device cpu"):
                Qwen.from_pretrained(ckpt, device=dev)
    else:
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("cpu") == torch.device("cpu")
