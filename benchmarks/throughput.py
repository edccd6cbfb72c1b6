"""Continuous-batching throughput: a seeded workload of N requests through nanoqwen's engine, and (with transformers
installed) the same workload through Hugging Face `generate()` in static left-padded batches, in the same run.

    python benchmarks/throughput.py --tiny                  # CPU smoke run, under a minute
    python benchmarks/throughput.py                         # Qwen-7B shapes, random bf16 weights, a GPU
    python benchmarks/throughput.py --num-requests 256 --hf-batch 64

Reports output tokens/s, time to first token and per-request latency (p50, p99), peak KV blocks used, and the ratio
to HF. Writes JSON to $OUT when set. Greedy, ignore_eos: every request produces exactly its drawn output length.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoqwen import LLM, Qwen, QwenConfig, SamplingParams, Tokenizer  # noqa: E402

QWEN_7B = dict(vocab_size=151936, hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, kv_channels=128,
               intermediate_size=22016, seq_length=8192)
TINY = dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_channels=16,
            intermediate_size=256, seq_length=2048)


def find_vocab() -> Path:
    for d in (ROOT / ".bench", ROOT.parent / "shared" / "qwen" / "Qwen-7B", ROOT.parent / "shared" / "golden" /
              "qwen-tiny" / "checkpoint"):
        if (d / "qwen.tiktoken").is_file():
            return d
    sys.exit("qwen.tiktoken not found: copy it into .bench/ (e.g. from ../shared/qwen/Qwen-7B)")


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def workload(n, prompt_range, output_range, vocab, seed):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
            for _ in range(n)]


def run_nanoqwen(llm, work):
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    llm.generate(work[0][0][:8], SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))  # warm-up
    sync()
    t0 = time.perf_counter()
    ids = [llm.add_request(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)) for p, n in work]
    done, peak_blocks, steps = {}, 0, 0
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        peak_blocks = max(peak_blocks, llm.blocks.num_blocks - llm.blocks.num_free)
    sync()
    wall = time.perf_counter() - t0
    outs = [done[i] for i in ids]
    n_out = sum(len(o.token_ids) for o in outs)
    ttft = [o.metrics["first_token"] - t0 for o in outs]
    lat = [o.metrics["finished"] - t0 for o in outs]
    return {"output_tok_s": n_out / wall, "wall_s": wall, "output_tokens": n_out, "steps": steps,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99),
            "peak_kv_blocks": peak_blocks, "kv_blocks": llm.blocks.num_blocks,
            "preemptions": llm.num_preemptions}


def hf_from_nanoqwen(model: Qwen):
    """A transformers Qwen2ForCausalLM holding the same weights (its decoder math equals Qwen v1's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = model.config
    hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_width,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=32768,
                     rms_norm_eps=cfg.layer_norm_epsilon, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base)})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    with torch.device(model.device):  # built in place (its RoPE buffer must be real), then given our tensors
        hf = Qwen2ForCausalLM(hc)
    torch.set_default_dtype(prev)
    sd, H, new = model.state_dict(), cfg.hidden_size, {}
    new["model.embed_tokens.weight"], new["model.norm.weight"] = sd["transformer.wte.weight"], sd["transformer.ln_f.weight"]
    new["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
            new[q + f"self_attn.{n}.weight"] = sd[p + "attn.c_attn.weight"][j * H:(j + 1) * H]
            new[q + f"self_attn.{n}.bias"] = sd[p + "attn.c_attn.bias"][j * H:(j + 1) * H]
        new[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        gate, up = sd[p + "mlp.w2_w1.weight"].chunk(2)
        new[q + "mlp.gate_proj.weight"], new[q + "mlp.up_proj.weight"] = gate, up
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.c_proj.weight"]
        new[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
    hf.load_state_dict(new, strict=True, assign=True)
    return hf.eval()


def run_hf(hf, work, batch_size, device):
    pad = 151646
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    n_useful = 0
    for b in range(0, len(work), batch_size):
        chunk = work[b:b + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
        mask = (torch.arange(width, device=device)[None] >= torch.tensor([width - len(p) for p, _ in chunk],
                                                                          device=device)[:, None]).long()
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(n for _, n in chunk),
                        min_new_tokens=max(n for _, n in chunk), do_sample=False, pad_token_id=pad,
                        eos_token_id=None)
        n_useful += sum(n for _, n in chunk)  # tokens past a request's own length are waste, not throughput
    sync()
    wall = time.perf_counter() - t0
    return {"output_tok_s": n_useful / wall, "wall_s": wall, "batch_size": batch_size}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke run)")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch", type=int, default=None, help="HF static batch size (default 64, tiny 8)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = args.num_requests or (32 if args.tiny else 256)
    prompt_range = args.prompt_len or ((4, 64) if args.tiny else (32, 1024))
    output_range = args.output_len or ((4, 32) if args.tiny else (32, 512))
    cfg = QwenConfig.from_dict(TINY if args.tiny else QWEN_7B)
    torch.manual_seed(args.seed)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen(cfg).init_weights().eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    model.rotary.float()
    llm = LLM(model, tokenizer=Tokenizer.from_pretrained(find_vocab()), max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=16,
              num_kv_blocks=4096 if device.type == "cpu" else None)
    work = workload(n, prompt_range, output_range, cfg.vocab_size, args.seed)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "num_requests": n,
           "prompt_len": prompt_range, "output_len": output_range, "nanoqwen": run_nanoqwen(llm, work)}
    if not args.no_hf:
        try:
            llm.close()  # give the KV cache's memory back before HF builds its copy of the model
            hf = hf_from_nanoqwen(model)
            res["hf"] = run_hf(hf, work, args.hf_batch or (8 if args.tiny else 64), device)
            res["ratio_vs_hf"] = res["nanoqwen"]["output_tok_s"] / res["hf"]["output_tok_s"]
        except ImportError:
            print("transformers not installed: HF comparison skipped")
    nq = res["nanoqwen"]
    print(f"\ndevice {res['device']}  requests {n}  prompt {prompt_range}  output {output_range}")
    print(f"{'engine':<22}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'lat p50':>10}{'lat p99':>10}")
    print(f"{'nanoqwen':<22}{nq['output_tok_s']:>10.1f}{nq['ttft_p50_s']:>10.3f}{nq['ttft_p99_s']:>10.3f}"
          f"{nq['latency_p50_s']:>10.3f}{nq['latency_p99_s']:>10.3f}")
    if "hf" in res:
        print(f"{'HF generate (bs ' + str(res['hf']['batch_size']) + ')':<22}{res['hf']['output_tok_s']:>10.1f}")
        print(f"ratio nanoqwen / HF: {res['ratio_vs_hf']:.2f}x   (target on a GPU: >= 20x HF eager, PERFORMANCE.md)")
    print(f"KV blocks: peak {nq['peak_kv_blocks']} of {nq['kv_blocks']}, preemptions {nq['preemptions']}, "
          f"steps {nq['steps']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "throughput.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
