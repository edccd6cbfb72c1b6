"""Build Triton kernels for a GPU without one: what Triton's interpreter does not check.

The interpreter runs a kernel's Python with numpy; the compiler also type-checks it (a name's type must stay the same
through loops and runtime branches, constexpr rules, register use). This builds the listed kernels' variants for
sm_90 (`triton.compile(ASTSource(...))`, GPUTarget("cuda", 90, 32), the launch's divisibility hints) and, when
Triton's bundled ptxas is there, prints registers, spills and shared memory. Run it without TRITON_INTERPRET (it
removes it), with the Triton of the GPU image where that differs (PYTHONPATH=<a triton 3.6 install>).

    python benchmarks/compile_check.py            # every variant below; exit 1 if one fails to build
    python benchmarks/compile_check.py --quick    # one variant a kernel (tests/test_sampling_kernels.py runs this)

Kernels covered: the fused sampler's (nanoqwen/kernels/sampling.py). Add a kernel as (function, signature,
constexpr variants, launch options).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nanoqwen.kernels import sampling  # noqa: E402

SCORES_SIG = dict(logits_ptr="*bf16", slots_ptr="*i64", seen_ptr="*u8", counts_ptr="*i32", rep_ptr="*fp32",
                  pres_ptr="*fp32", freq_ptr="*fp32", temp_ptr="*fp32", out_ptr="*fp32", V="i32", stride_l="i32")
DRAW_SIG = dict(scores_ptr="*fp32", values_ptr="*fp32", ids_ptr="*i64", slots_ptr="*i64", top_k_ptr="*i64",
                top_p_ptr="*fp64", greedy_ptr="*u8", lanes_ptr="*i64", steps_ptr="*i64", seen_ptr="*u8",
                counts_ptr="*i32", next_ptr="*i64", pending_ptr="*i8", V="i32", K="i32", scale="fp32")


def _draw(kp, whole, top_k, top_p, greedy, rep, counts):
    return dict(KP=kp, BLOCK=2048, WHOLE_ROW=whole, TOP_K=top_k, TOP_P=top_p, ANY_GREEDY=greedy, REPETITION=rep,
                COUNTS=counts)


KERNELS = [  # (name, jit function, signature, constexpr variants (the first is the quick one), launch options)
    ("sampler scores", sampling._scores_kernel, SCORES_SIG,
     [dict(REPETITION=r, COUNTS=c, TEMPERATURE=t, BLOCK=4096) for r in (True, False) for c in (False, True)
      for t in (True, False)], dict(num_warps=8, enable_fp_fusion=False)),
    ("sampler draw", sampling._draw_kernel, DRAW_SIG,
     [_draw(1024, False, True, True, True, True, True),  # the engine's chat graph (for_graph flags)
      _draw(1024, False, False, True, True, True, False),
      _draw(1, False, False, False, True, True, False),  # no top-p, no top-k: only the row maximum
      _draw(1024, False, True, False, False, False, False),
      _draw(2048, False, True, True, False, True, True),  # top_k above the candidates
      _draw(512, True, True, True, True, True, True)],  # a vocabulary smaller than the candidates
     dict(num_warps=8, enable_fp_fusion=False)),
]


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


def build(fn, signature: dict, constexprs: dict, options: dict) -> tuple[bool, str]:
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    pointers = [i for i, t in enumerate(sig.values()) if t.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    try:
        kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                options=options)
    except Exception as e:  # the compiler's message names the line and the reason
        return False, f"{type(e).__name__}: {str(e).strip()[-1500:]}"
    return True, f"shared {kernel.metadata.shared} B; {ptxas_report(kernel.asm['ptx'])}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first variant of each kernel only, no ptxas")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90", flush=True)
    failed = 0
    for name, fn, signature, variants, options in KERNELS:
        for constexprs in variants[:1] if args.quick else variants:
            ok, info = build(fn, signature, constexprs, options)
            if args.quick and ok:
                info = "built"
            failed += not ok
            shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
            print(f"{'ok  ' if ok else 'FAIL'} {name} [{shown}]: {info}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
