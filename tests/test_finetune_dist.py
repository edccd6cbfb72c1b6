"""Data-parallel fine-tuning under torchrun on the CPU (gloo): two processes must train as one process with the same
global batch (LoRA through DDP, full fine-tuning through FSDP2), and a sharded run must resume.

Runs the real command line (`torchrun --nproc-per-node 2 -m nanoqwen.finetune ...`) in subprocesses, one thread
each. The two runs see the same rows in every step; only the order of float sums differs (gloo's all-reduce against
one process's batch sums; float32), so the losses and gradient norms agree to float32 rounding of the per-token
terms, compounded over a few steps: held to 1e-5 relative, the golden README's gradient noise (measured: 1e-7).
The final weights agree to the AdamW step's own float noise (up to 2 * lr for an element whose gradient is within
noise of 0, the README says; a few ulps elsewhere): compared by the logits they give, to test_lora.py's 1e-4.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoqwen.checkpoint import load_model
from test_finetune import MERGED_ATOL, logits_of, qa_records, write_json

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-5


def finetune(nproc: int, *args) -> list[dict]:
    """Run the command line in `nproc` processes; returns the log records of the run."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + ["-m", "nanoqwen.finetune", "--no-progress", "--dtype", "float32", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = Path(args[args.index("--out") + 1])
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(log, key="loss"):
    return [r[key] for r in log if key in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Nine rows: with a global batch of 4 every epoch ends on a step of one row (one process idles on it)."""
    root = tmp_path_factory.mktemp("dist_data")
    return write_json(root / "train.json", qa_records(9))


def common(ckpt, data, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--max-len", "64", "--epochs", "2",
            "--grad-accum", "2", "--seed", "3", *extra]


def test_ddp_lora_two_processes_equal_one(tiny_ckpt, data, tmp_path):
    lora = ["--lora-r", "8", "--lora-dropout", "0", "--modules-to-save", "none", "--lr", "5e-3", "--eval-data",
            str(data)]
    one = finetune(1, *common(tiny_ckpt, data, tmp_path / "one", "--batch-size", "2", *lora))
    two = finetune(2, *common(tiny_ckpt, data, tmp_path / "two", "--batch-size", "1", *lora))
    assert len(losses(one)) == len(losses(two)) == 6
    assert [r["tokens"] for r in one if "loss" in r] == [r["tokens"] for r in two if "loss" in r]
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=LOSS_RTOL, atol=0)
    # AdamW and clipping hide a wrong gradient scale from the losses: the gradient norms show it
    torch.testing.assert_close(torch.tensor(losses(two, "grad_norm")), torch.tensor(losses(one, "grad_norm")),
                               rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(losses(two, "eval_loss")), torch.tensor(losses(one, "eval_loss")),
                               rtol=LOSS_RTOL, atol=0)
    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]])
    merged = [logits_of(load_model(tiny_ckpt, "cpu", torch.float32, lora=tmp_path / n), ids) for n in ("one", "two")]
    torch.testing.assert_close(merged[1], merged[0], atol=MERGED_ATOL, rtol=0)


def test_fsdp_full_two_processes_equal_one_and_resume(tiny_ckpt, data, tmp_path):
    full = ["--full", "--lr", "1e-3", "--max-steps", "4", "--save-steps", "2"]
    one = finetune(1, *common(tiny_ckpt, data, tmp_path / "one", "--batch-size", "2", *full))
    two = finetune(2, *common(tiny_ckpt, data, tmp_path / "two", "--batch-size", "1", *full))
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=LOSS_RTOL, atol=0)
    # AdamW and clipping hide a wrong gradient scale from the losses: the gradient norms show it
    torch.testing.assert_close(torch.tensor(losses(two, "grad_norm")), torch.tensor(losses(one, "grad_norm")),
                               rtol=LOSS_RTOL, atol=0)
    shards = sorted(p.name for p in (tmp_path / "two" / "checkpoint-2").glob("state-rank*.safetensors"))
    assert shards == ["state-rank0.safetensors", "state-rank1.safetensors"]
    resumed = finetune(2, *common(tiny_ckpt, data, tmp_path / "resumed", "--batch-size", "1", *full, "--resume",
                                  str(tmp_path / "two" / "checkpoint-2")))
    assert losses(resumed) == losses(two)
    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]])
    logits = {n: logits_of(load_model(tmp_path / n, "cpu", torch.float32), ids) for n in ("one", "two", "resumed")}
    torch.testing.assert_close(logits["resumed"], logits["two"], atol=0, rtol=0)
    torch.testing.assert_close(logits["two"], logits["one"], atol=MERGED_ATOL, rtol=0)
