"""The split-K linear GEMV against its torch reference, the run-time kernel choice (`pick`), and the model's decode-sized
linears through it (golden tiny models, fp and GPTQ, in Triton's CPU interpreter without a GPU).

Inputs are fresh random every run (the seed is in every message; KERNEL_TEST_SEED=<seed> replays one), outputs are
NaN-poisoned before the kernel. Tolerances: two units of the output dtype's eps, relative to the norm (the output is
rounded once, half an eps per element; the fp32 sums add far less), 1e-5 for fp32 (K-term fp32 sums).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# tests/conftest.py sets TRITON_INTERPRET=1 without a GPU before anything imports triton
from nanoqwen.kernels import gemv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])  # the interpreter's bf16 tl.dot is wrong
TOL = {torch.float32: 1e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------------------------- the linear GEMV

@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gemv_vs_reference(dtype, rng):
    """Rows 1, 3, 16; N and K not multiples of a tile (72, 200); with and without bias; split-K none, uneven and more
    splits than steps; a weight whose rows are longer than K (a view), 3-D x."""
    seed = rng.initial_seed()
    for M, N, K, bias, config in ((1, 72, 200, True, {}), (3, 40, 136, False, dict(split_k=3, block_k=32)),
                                  (16, 72, 64, True, dict(block_n=64, split_k=1)),
                                  (2, 24, 96, True, dict(split_k=64, block_k=32))):
        big = randn(rng, N, K + 8, dtype=dtype, scale=0.1)
        w = big[:, :K]  # row stride K + 8
        b = randn(rng, N, dtype=dtype) if bias else None
        x = randn(rng, M, K, dtype=dtype)
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        y = gemv.linear_gemv(x, w, b, out=out, **config)
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any(), f"unwritten outputs, seed {seed}"
        ref = x.double() @ w.double().t() + (b.double() if bias else 0)
        err = rel_err(y, ref)
        assert err < TOL[dtype], f"M={M} N={N} K={K} {dtype} {config}: rel err {err:.2e}, seed {seed}"
        ref_torch = gemv.linear_ref(x, w, b)  # the module's reference agrees to the output's rounding
        torch.testing.assert_close(y, ref_torch, rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item(),
                                   msg=lambda m: f"{dtype} M={M}, seed {seed}: {m}")
    x3 = randn(rng, 2, 3, 40, dtype=dtype)
    w = randn(rng, 24, 40, dtype=dtype, scale=0.1)
    torch.testing.assert_close(gemv.linear_gemv(x3, w), gemv.linear_ref(x3, w), rtol=TOL[dtype],
                               atol=TOL[dtype] * 4, msg=lambda m: f"3-D x, seed {seed}: {m}")
    for locks in gemv._LOCKS.values():
        assert int(locks.abs().sum()) == 0, "split-K arrival counters must end at zero"


def test_linear_gemv_rejects():
    x = torch.randn(17, 32, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv.linear_gemv(x, torch.randn(8, 32, device=DEVICE))
    with pytest.raises(ValueError, match="x's dtype"):
        gemv.linear_gemv(x[:2], torch.randn(8, 32, device=DEVICE).half())


# ----------------------------------------------------------------------------------------------- the choice

class FakeCuda:
    """Just enough of a CUDA tensor for `pick` (device, dtype, numel), so its logic runs without a GPU."""
    device = torch.device("cuda", 0)
    dtype = torch.float16

    def __init__(self, rows, K):
        self.rows, self.K = rows, K

    def numel(self):
        return self.rows * self.K


def test_pick_forced_modes_and_cpu(monkeypatch):
    """Forced modes take the baseline or the first new kernel without timing; auto on the CPU is the baseline."""
    monkeypatch.setattr(gemv, "_time_ms", lambda fn, dev: pytest.fail("timed outside CUDA"))
    cands = {"cublas": lambda: 0, "triton": lambda: 1, "other": lambda: 2}
    x = torch.zeros(1, 8)
    monkeypatch.setenv("NANOQWEN_GEMV", "cublas")
    assert gemv.pick("linear", FakeCuda(1, 8), 4, 8, cands) == "cublas"
    monkeypatch.setenv("NANOQWEN_GEMV", "triton")
    assert gemv.pick("linear", FakeCuda(1, 8), 4, 8, cands) == "triton"
    assert gemv.pick("linear", x, 4, 8, {"only": lambda: 0}) == "only"
    monkeypatch.setenv("NANOQWEN_GEMV", "auto")
    assert gemv.pick("linear", x, 4, 8, cands) == "cublas"
    monkeypatch.setenv("NANOQWEN_GEMV", "fastest")
    with pytest.raises(ValueError, match="NANOQWEN_GEMV='fastest'"):
        gemv.pick("linear", x, 4, 8, cands)


def test_pick_times_once_per_shape_and_never_in_a_capture(monkeypatch):
    """On CUDA (emulated): the first call of a (kind, row bucket, N, K) times every candidate and remembers the
    fastest; later calls and other rows of the same bucket reuse it; inside a capture an undecided shape runs the
    baseline untimed, and is decided at the next eager call."""
    monkeypatch.setenv("NANOQWEN_GEMV", "auto")
    monkeypatch.setattr(gemv, "_CHOICES", {})
    timed = []
    speed = {"cublas": 2.0, "triton": 1.0}
    monkeypatch.setattr(gemv, "_time_ms", lambda fn, dev: timed.append(fn()) or speed[fn()])
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cands = {"cublas": lambda: "cublas", "triton": lambda: "triton"}
    assert gemv.pick("linear", FakeCuda(3, 64), 32, 64, cands) == "cublas" and timed == []  # capture: untimed
    assert gemv.choices() == {}
    capturing[0] = False
    assert gemv.pick("linear", FakeCuda(3, 64), 32, 64, cands) == "triton" and timed == ["cublas", "triton"]
    capturing[0] = True  # decided: a capture reuses the choice
    assert gemv.pick("linear", FakeCuda(4, 64), 32, 64, cands) == "triton" and len(timed) == 2  # rows 3, 4: bucket 4
    capturing[0] = False
    speed["cublas"] = 0.5
    assert gemv.pick("linear", FakeCuda(5, 64), 32, 64, cands) == "cublas" and len(timed) == 4  # bucket 8: timed
    assert set(gemv.choices().values()) == {"triton", "cublas"}


@pytest.mark.skipif(not CUDA, reason="CUDA events and graphs")
def test_pick_on_cuda_times_eagerly_and_captures_without_timing(monkeypatch, rng):
    """The real thing on a GPU: a capture of an undecided shape runs the baseline untimed (and the graph replays it
    right); an eager call times both candidates, remembers the faster, and the result is right either way."""
    seed = rng.initial_seed()
    monkeypatch.setenv("NANOQWEN_GEMV", "auto")
    monkeypatch.setattr(gemv, "_CHOICES", {})
    lin = gemv.Linear(512, 384).to(DEVICE, torch.bfloat16)
    x = randn(rng, 3, 512, dtype=torch.bfloat16)
    ref = gemv.linear_ref(x, lin.weight, lin.bias)
    with torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lin(x)
        graph.replay()
        torch.cuda.synchronize()
        assert gemv.choices() == {}
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), msg=lambda m: f"seed {seed}: {m}")
        y = lin(x)
    assert list(gemv.choices().values())[0] in ("cublas", "triton")
    torch.testing.assert_close(y, ref, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16] * ref.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")


def test_linear_module_routes_decode_rows(monkeypatch, rng):
    """gemv.Linear is an nn.Linear (same state dict); with the Triton kernels on, up to 16 rows take the GEMV when
    forced, more rows and NANOQWEN_GEMV=cublas take F.linear; without them (the CPU default) nothing changes."""
    seed = rng.initial_seed()
    lin = gemv.Linear(40, 24).to(DEVICE)
    assert isinstance(lin, nn.Linear) and set(lin.state_dict()) == {"weight", "bias"}
    calls = []
    real = gemv.linear_gemv
    monkeypatch.setattr(gemv, "linear_gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = randn(rng, 2, 8, 40)
    ref = F.linear(x, lin.weight, lin.bias)
    monkeypatch.setenv("NANOQWEN_GEMV", "triton")
    if not CUDA:
        monkeypatch.setenv("NANOQWEN_KERNELS", "torch")
        assert torch.equal(lin(x), ref) and calls == []  # the CPU's default: F.linear
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
        assert calls == [(2, 8, 40)]
        lin(randn(rng, 17, 40))
        assert len(calls) == 1  # 17 rows: F.linear
        monkeypatch.setenv("NANOQWEN_GEMV", "cublas")
        lin(x)
        assert len(calls) == 1


# ----------------------------------------------------------------------------------------------- golden models

def test_golden_fp_model_through_the_gemv(golden, tiny_ref, tiny_ref_tensors, monkeypatch):
    """The golden tiny model's first 16 tokens (16 rows: every linear, lm_head included, through linear_gemv), fp32
    activations: the reference logits (causal, so positions 0 and 11 are those of the 22-token reference)."""
    from nanoqwen.model import Qwen
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    monkeypatch.setenv("NANOQWEN_GEMV", "triton")
    calls = []
    real = gemv.linear_gemv
    monkeypatch.setattr(gemv, "linear_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = Qwen.from_pretrained(golden / "qwen-tiny" / "checkpoint", device=DEVICE, dtype=torch.float32)
    name = "fp32/forward/text"
    case = tiny_ref["cases"][name]
    with torch.no_grad():
        logits = model(torch.tensor([case["input_ids"][:16]], device=DEVICE))[0].cpu()
    assert len(calls) == 4 * model.config.num_hidden_layers + 1
    keep = [i for i, p in enumerate(case["positions"]) if p < 16]
    torch.testing.assert_close(logits[[case["positions"][i] for i in keep]], tiny_ref_tensors[f"{name}/logits"][keep],
                               rtol=0, atol=1e-4)
    assert logits.argmax(-1).tolist() == case["argmax"][:16]


@pytest.mark.parametrize("bits", [4, 8])
def test_golden_gptq_model_through_the_magic_gemv(golden, bits, monkeypatch, tmp_path):
    """The golden GPTQ int4/int8 model (converted) with every quantized linear on the magic-number GEMV (22 rows: the
    32-row tile) and a 1-row step: the reference logits, fp32 activations."""
    import json
    from safetensors.torch import load_file
    from nanoqwen.checkpoint import convert
    from nanoqwen.kernels import gptq_matmul as gm
    from nanoqwen.model import Qwen
    folder = golden / f"qwen-tiny-int{bits}"
    ref = json.loads((folder / "reference.json").read_text())
    tensors = load_file(str(folder / "reference.safetensors"))
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    monkeypatch.setenv("NANOQWEN_GEMV", "triton")
    calls = []
    real = gm.gptq_gemv
    monkeypatch.setattr(gm, "gptq_gemv", lambda *a, **k: calls.append(k["sym"]) or real(*a, **k))
    model = Qwen.from_pretrained(convert(folder / "checkpoint", tmp_path / "conv", dtype=None), device=DEVICE,
                                 dtype=torch.float32)
    case = ref["cases"]["gptq/forward/text"]
    with torch.no_grad():
        logits = model(torch.tensor([case["input_ids"]], device=DEVICE))[0].cpu()
        one = model(torch.tensor([case["input_ids"][:1]], device=DEVICE))[0, 0].cpu()
    assert len(calls) == 2 * 4 * model.config.num_hidden_layers
    torch.testing.assert_close(logits[case["positions"]], tensors["gptq/forward/text/logits"], atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == case["argmax"]
    torch.testing.assert_close(one, logits[0], atol=1e-4, rtol=0)
