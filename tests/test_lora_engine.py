"""LoRA adapters through the engine: merged at load (LLM(lora=), --lora), and unmerged, several in one batch
(enable_lora, add_lora, SamplingParams(lora=)), against the golden adapter of ../shared/golden/qwen-tiny/lora."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from nanoqwen import LLM, SamplingParams


@pytest.fixture(scope="module")
def adapter(lora_dir):
    return lora_dir / "adapter"


@pytest.fixture(scope="module")
def case(lora_dir):
    return json.loads((lora_dir / "reference.json").read_text())["cases"]["lora/generate/text"]


@pytest.fixture(scope="module")
def scaled_adapter(adapter, tmp_path_factory):
    """The golden adapter with lora_alpha 32 (scaling 4 instead of 2): a second, different adapter."""
    out = tmp_path_factory.mktemp("scaled") / "adapter"
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["lora_alpha"] = 32
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def greedy(case, **kw):
    return SamplingParams(temperature=0, max_new_tokens=case["max_new_tokens"],
                          repetition_penalty=case["repetition_penalty"], ignore_eos=True, **kw)


def engine(tiny_ckpt, **kw):
    kw.setdefault("num_kv_blocks", 128)
    return LLM(tiny_ckpt, device="cpu", dtype=torch.float32, block_size=4, **kw)


def test_merged_at_load(tiny_ckpt, adapter, case):
    assert engine(tiny_ckpt, lora=adapter).generate(case["input_ids"], greedy(case)).token_ids == case["output_ids"]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static-decode-path"])
def test_unmerged_adapters_share_batches(tiny_ckpt, adapter, scaled_adapter, case, graphs):
    """The golden adapter, no adapter and a second adapter in one batch: each request gives what it gives alone
    (the golden tokens for the golden adapter), through the eager and the CUDA-graph decode path."""
    llm = engine(tiny_ckpt, enable_lora=True, max_loras=2, max_lora_rank=8, cuda_graphs=graphs, max_num_seqs=8,
                 max_model_len=128)
    llm.add_lora("golden", adapter)
    llm.add_lora("scaled", scaled_adapter)
    prompt = case["input_ids"]
    params = [greedy(case, lora="golden"), greedy(case), greedy(case, lora="scaled"), greedy(case, lora="golden")]
    prompts = [prompt, prompt, prompt, prompt[:7]]
    outs = llm.generate(prompts, params)
    assert outs[0].token_ids == case["output_ids"]
    alone = [llm.generate(p, sp).token_ids for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in outs] == alone
    base = engine(tiny_ckpt).generate(prompt, greedy(case)).token_ids
    assert outs[1].token_ids == base and outs[2].token_ids != outs[0].token_ids != base


def test_prefix_cache_never_shared_between_adapters(tiny_ckpt, adapter):
    llm = engine(tiny_ckpt, enable_lora=True, max_loras=1, max_lora_rank=8)
    llm.add_lora("golden", adapter)
    prompt = list(range(100, 141))
    p = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    first = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True, lora="golden"))
    assert first.metrics["cached_tokens"] == 0
    assert llm.generate(prompt, p).metrics["cached_tokens"] == 0  # the base model may not reuse the adapter's K/V
    again = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True, lora="golden"))
    assert again.metrics["cached_tokens"] == 40 and again.token_ids == first.token_ids


def test_errors(tiny_ckpt, adapter):
    plain = engine(tiny_ckpt)
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.add_request([1, 2], SamplingParams(lora="golden"))
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.add_lora("golden", adapter)
    llm = engine(tiny_ckpt, enable_lora=True, max_loras=1, max_lora_rank=8)
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        llm.add_request([1, 2], SamplingParams(lora="other"))
    llm.add_lora("golden", adapter)
    rid = llm.add_request([1, 2], SamplingParams(lora="golden", max_new_tokens=3))
    with pytest.raises(ValueError, match="in use by request"):
        llm.remove_lora("golden")
    llm.abort(rid)
    llm.remove_lora("golden")
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        llm.remove_lora("golden")
    with pytest.raises(ValueError, match="lora must be an adapter name"):
        SamplingParams(lora="")


def test_cli_lora(tiny_ckpt, adapter, case):
    """`--lora PATH` merges the adapter: the chat answer equals the engine's with lora=."""
    llm = engine(tiny_ckpt, lora=adapter)
    expect = llm.generate(llm.chat_context("你好"), SamplingParams(temperature=0, max_new_tokens=6)).text
    r = subprocess.run([sys.executable, "-m", "nanoqwen", "generate", "--ckpt", str(tiny_ckpt), "--lora", str(adapter),
                        "--prompt", "你好", "--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32",
                        "--repetition-penalty", "1.0"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expect.strip()
