"""Build Triton kernels for a GPU without one: what Triton's interpreter does not check.

The interpreter runs a kernel's Python with numpy; the compiler also type-checks it (a name's type must stay the same
through loops and runtime branches, constexpr rules) and allocates registers. This records the launches a model's
steps make with the CUDA code path (NANOQWEN_KERNELS=triton, NANOQWEN_GEMV=triton, the GPU's tile choices: no
interpreter, Triton's `JITFunction.run` replaced by a recorder, so no kernel runs and the CPU tensors' contents are
garbage), then builds every distinct (kernel, argument types, constexprs, options) for sm_90 with
`triton.compile(ASTSource(...))`, GPUTarget("cuda", 90, 32), pointers and multiples of 16 marked divisible by 16 as a
launch specializes them; with Triton's bundled ptxas it prints registers, spills and shared memory.

Workloads (Qwen-7B's head dim 128, a small model): bf16 with the bf16 KV cache, int8 KV (default and qwen modes) and
fp16 GPTQ int4/int8, each a 100-token prefill, a 20-token chunk over a cached prefix and decode steps at batch 1 and
16 (attention, KV stores, norms, RoPE, SiLU, GEMV/GEMM, paged decode and its reduction); the fused sampler's draw
variants; the LoRA shrink/expand kernels.

    python benchmarks/compile_check.py              # every recorded variant; exit 1 if one fails to build
    python benchmarks/compile_check.py --no-ptxas   # the same to PTX only (tests/test_benchmarks.py runs this)
    python benchmarks/compile_check.py --quick      # the bf16 decode step and the chat sampler only

Run it with the Triton of the GPU image where that differs (PYTHONPATH=<a triton 3.6 install>).
"""
from __future__ import annotations

import argparse
import glob
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JITFunctions, the GPU's tile choices
os.environ["NANOQWEN_KERNELS"] = "triton"  # the CUDA code path on CPU tensors
os.environ["NANOQWEN_GEMV"] = "triton"  # the Triton GEMVs rather than cuBLAS at decode sizes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


class Recorder:
    """Replaces JITFunction.run: records each launch's kernel, argument types, constexprs and options; runs nothing."""

    def __init__(self):
        self.launches: dict[tuple, tuple] = {}

    def __enter__(self):
        self.saved = JITFunction.run
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            recorder.record(kernel, args, kwargs)

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self.saved

    def record(self, kernel: JITFunction, args: tuple, kwargs: dict) -> None:
        names = [p.name for p in kernel.params]
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        signature, constexprs, divisible = {}, {}, []
        for p in kernel.params:
            if p.name not in values:
                if p.default is inspect.Parameter.empty:
                    raise TypeError(f"{kernel.fn.__name__}: no value for {p.name}")
                value = p.default
            else:
                value = values[p.name]
            value = getattr(value, "value", value)  # tl.constexpr(...) -> its value
            if p.is_constexpr or value is None or (type(value) is int and value == 1):  # as a launch specializes
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[p.name] = "*" + DTYPES[value.dtype]
                divisible.append(p.name)
            elif isinstance(value, bool):
                signature[p.name] = "i1"
            elif isinstance(value, int):
                signature[p.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
                if value % 16 == 0:
                    divisible.append(p.name)
            elif isinstance(value, float):
                signature[p.name] = "fp32"
            else:
                raise TypeError(f"{kernel.fn.__name__}: {p.name} = {value!r} is not a launch argument type")
        key = (kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()),
               tuple((k, repr(v)) for k, v in constexprs.items()), tuple(sorted(options.items())))
        self.launches.setdefault(key, (kernel, signature, constexprs, divisible, options))


def workloads(quick: bool):
    """Yield after each workload (the recorder gathers the launches)."""
    from nanoqwen import Qwen, QwenConfig
    from nanoqwen.attention import AttentionMetadata
    from nanoqwen.kv_cache import KVCache
    from nanoqwen.sampling import DeviceSampler, SamplingParams

    cfg = QwenConfig.from_dict(dict(vocab_size=1024, hidden_size=256, num_attention_heads=2, kv_channels=128,
                                    num_hidden_layers=1, intermediate_size=1024, seq_length=8192))
    block = 16
    variants = [(torch.bfloat16, None, "default", None)]
    if not quick:
        variants += [(torch.bfloat16, "int8", "default", None), (torch.bfloat16, "int8", "qwen", None),
                     (torch.float16, None, "default", 4), (torch.float16, None, "default", 8)]
    for dtype, kv, mode, bits in variants:
        torch.manual_seed(0)
        model = Qwen(cfg).init_weights().to(dtype).eval().requires_grad_(False)
        if bits:
            from nanoqwen.quant.gptq import swap_linears
            swap_linears(model, bits, 128, device=torch.device("cpu"))
        cache = KVCache(1, 64, block, cfg.num_attention_heads, cfg.head_dim, dtype, "cpu", kv, mode)
        tables = torch.arange(64, dtype=torch.int32).view(4, 16)

        def step(lens, starts, decode):
            slots = torch.cat([tables[i, torch.arange(s, s + n) // block] * block + torch.arange(s, s + n) % block
                               for i, (n, s) in enumerate(zip(lens, starts))]).long()
            ends = [s + n for n, s in zip(lens, starts)]
            meta = AttentionMetadata.for_prefill(
                lens, "cpu", [0] * len(lens), starts, slot_mapping=slots, block_tables=tables[:len(lens)],
                context_lens=torch.tensor(ends, dtype=torch.int32), max_context_len=256 if decode else max(ends),
                is_decode=decode, logits_indices=None if decode else torch.tensor(lens).cumsum(0) - 1)
            with torch.no_grad():
                model(torch.randint(0, cfg.vocab_size, (sum(lens),)), meta, cache)

        if not quick:
            step([100], [0], False)  # a prompt (GEMM rows)
            step([20], [100], False)  # a chunk over a cached prefix
            step([1] * 4, [120, 60, 30, 90], True)  # decode at batch 4
        step([1], [120], True)  # decode at batch 1
        yield f"{dtype} kv {kv or dtype} {mode if kv else ''} gptq {bits or '-'}"
    for vocab in ([4096] if quick else [4096, 600]):  # K = 1,024 candidates of 4,096, and the whole row
        for params, graph in ([(SamplingParams(top_p=0.8, repetition_penalty=1.1), True)] if quick else [
                (SamplingParams(top_p=0.8, repetition_penalty=1.1), True), (SamplingParams(top_p=0.8), False),
                (SamplingParams(temperature=0.7, top_k=2000, presence_penalty=0.5), False),
                (SamplingParams(temperature=0.7), False)]):
            sampler = DeviceSampler(4, vocab, "cpu", capturable=True, fused=True, num_candidates=1024)
            for slot in range(3):
                sampler.add(slot, params, slot, [1, 2, 3])
            sampler.add(3, SamplingParams(temperature=0), 3, [])
            flags = sampler.flags(range(4))
            sampler.sample(torch.randn(4, vocab, dtype=torch.bfloat16), torch.arange(4),
                           flags.for_graph() if graph else flags)
        yield f"sampler vocab {vocab}"
    if not quick:  # unmerged LoRA: shrink + expand at decode and prefill rows, 1 to 3 stacked outputs (c_attn)
        from nanoqwen.kernels.lora import add_lora
        for dtype in (torch.bfloat16, torch.float16):
            for rows in (1, 100):
                for stacked in (1, 3):
                    x = torch.randn(rows, 256, dtype=dtype)
                    add_lora(x, torch.randn(rows, 256 * stacked, dtype=dtype),
                             torch.randn(4, stacked * 16, 256, dtype=dtype), torch.randn(4, 256 * stacked, 16, dtype=dtype),
                             torch.ones(4, stacked), torch.zeros(rows, dtype=torch.int64))
        yield "LoRA shrink/expand"


def ptxas_report(ptx: str) -> str:
    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    tools = sorted(glob.glob(str(here / "ptxas*")), key=lambda p: not p.endswith("blackwell"))  # the newer PTX ISA
    if not tools:
        return "(no ptxas)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        arch = "sm_90a" if ".target sm_90a" in ptx else "sm_90"
        r = subprocess.run([tools[0], "-v", f"-arch={arch}", str(src), "-o", str(Path(tmp, "k.cubin"))],
                           capture_output=True, text=True)
    lines = [line.split("info    : ")[-1].strip() for line in (r.stderr + r.stdout).splitlines()
             if "Used" in line or "spill" in line]
    return "; ".join(lines) if r.returncode == 0 else f"ptxas failed: {r.stderr.strip()[-300:]}"


def build(kernel, signature: dict, constexprs: dict, divisible: list, options: dict, ptxas: bool
          ) -> tuple[bool, str]:
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
    except Exception as e:  # the compiler's message names the line and the reason
        return False, f"{type(e).__name__}: {str(e).strip()[-1500:]}" + (f" <- caused by: {str(e.__cause__).strip()[-1500:]}" if e.__cause__ else "")
    return True, f"shared {compiled.metadata.shared} B" + (f"; {ptxas_report(compiled.asm['ptx'])}" if ptxas else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the bf16 decode step and the chat sampler only")
    ap.add_argument("--no-ptxas", action="store_true", help="build to PTX only (no registers and spills)")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90", flush=True)
    with Recorder() as recorder:
        for name in workloads(args.quick):
            print(f"recorded: {name} ({len(recorder.launches)} distinct launches so far)", flush=True)
    failed = 0
    for (module, name, *_), (kernel, signature, constexprs, divisible, options) in sorted(
            recorder.launches.items(), key=lambda kv: kv[0][:2]):
        ok, info = build(kernel, signature, constexprs, divisible, options, ptxas=not args.no_ptxas)
        failed += not ok
        shown = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper())
        print(f"{'ok  ' if ok else 'FAIL'} {module.split('.')[-1]}.{name} [{shown}]: {info}", flush=True)
    print(f"{len(recorder.launches) - failed} of {len(recorder.launches)} built", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
