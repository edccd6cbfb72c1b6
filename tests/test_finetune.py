"""Fine-tuning (nanoqwen.finetune) against the golden that Qwen's finetune.py, peft 0.7.1 and the HF Trainer's loss
made (../shared/golden/qwen-tiny/lora/README.md), and its own promises: the loss falls on real text, a saved adapter
or checkpoint reloads to the trained model, a resumed run continues the same curve, the data errors are readable.

Tolerances come from the golden README's float noise (each tensor recomputed in float64 by its maker): loss 1.3e-5,
gradients 1e-5 of each tensor's largest value, one AdamW step from float64 gradients 1.1e-6; two implementations
each that far from the exact value differ by up to twice that. Adam's first step is about lr * sign(g), so an element
whose reference gradient is within that noise of 0 may step anywhere in [-lr, lr] (the README says so): those
elements are held only to 2 * lr. Reloads of the same fp32 weights through the same code are exact; merged against
unmerged LoRA is test_lora.py's 1e-4 (its measured float noise is 3.1e-5).
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from nanoqwen.checkpoint import load_model, official_shapes
from nanoqwen.finetune import (DataError, FinetuneArgs, SupervisedData, Trainer, batch_nll, encode_conversation,
                               load_conversations, lr_at, make_optimizer, preprocess, split_rows)
from nanoqwen.finetune.cli import main as cli_main
from nanoqwen.lora import (PREFIX, LoraManager, _trained_layers, add_trainable_lora, read_adapter, set_trainable_lora)
from nanoqwen.tokenizer import Tokenizer

LOSS_NOISE, GRAD_NOISE, STEP_NOISE = 1.3e-5, 1e-5, 1.1e-6  # the golden README's float noise
LR, BETAS, EPS, WD = 3e-4, (0.9, 0.95), 1e-8, 0.1  # the golden step's AdamW
MERGED_ATOL = 1e-4

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
      ("How many legs does a spider have?", "A spider has eight legs."),
      ("What do bees make?", "Bees make honey and wax."),
      ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
      ("What is water made of?", "Water is made of hydrogen and oxygen."),
      ("How many days are in a week?", "A week has seven days."),
      ("What is the largest ocean?", "The Pacific is the largest ocean.")]


def qa_records(n=len(QA)):
    return [{"id": f"qa{i}", "conversations": [{"from": "user", "value": QA[i % len(QA)][0]},
                                              {"from": "assistant", "value": QA[i % len(QA)][1]}]}
            for i in range(n)]


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False))
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt):
    return Tokenizer.from_pretrained(tiny_ckpt)


def golden_rows(lora_ref):
    return lora_ref["cases"]["finetune/batch"]["rows"]


def train_args(tiny_ckpt, data, out, **kw):
    base = dict(ckpt=str(tiny_ckpt), data=str(data), out=str(out), lora_r=8, lora_alpha=16, lr=1e-2, epochs=4,
                batch_size=2, grad_accum=2, max_len=64, dtype="float32", modules_to_save="none", progress=False)
    return FinetuneArgs(**{**base, **kw})


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).float()


# ----------------------------------------------------------------------------------------------- data

def test_preprocess_matches_golden(lora_ref, tokenizer):
    """finetune.py's preprocess, row by row and as one call: ids, labels, mask, dtypes, pre-padding length."""
    case = lora_ref["cases"]["finetune/batch"]
    for row in golden_rows(lora_ref):
        out = preprocess([row["conversations"]], tokenizer, case["max_len"], row["system_message"])
        assert out["input_ids"].dtype == torch.int32 and out["labels"].dtype == torch.int32
        assert out["attention_mask"].dtype == torch.bool
        assert out["input_ids"][0].tolist() == row["input_ids"], row["id"]
        assert out["labels"][0].tolist() == row["labels"], row["id"]
        assert out["attention_mask"][0].int().tolist() == row["attention_mask"], row["id"]
        messages = [(m["from"], m["value"]) for m in row["conversations"]]
        assert len(encode_conversation(tokenizer, messages, row["system_message"])[0]) == \
            row["n_tokens_before_padding_or_truncation"]
    # the training set's own path: records with their "system", padded the same way
    records = [{"conversations": r["conversations"], "system": r["system_message"]} for r in golden_rows(lora_ref)]
    data = SupervisedData.build(load_conversations_from(records), tokenizer, case["max_len"])
    assert data.input_ids.tolist() == [r["input_ids"] for r in golden_rows(lora_ref)]
    assert data.labels.tolist() == [r["labels"] for r in golden_rows(lora_ref)]
    assert data.n_labels.sum().item() == case["n_label_tokens"]


def load_conversations_from(records):
    from nanoqwen.finetune.data import check_conversations
    return check_conversations(records)


def test_first_assistant_message_dropped_and_system_forms(tokenizer):
    """finetune.py drops one leading non-user message; a system message may come as a field or a first message."""
    recs = load_conversations_from([
        {"conversations": [{"from": "assistant", "value": "x"}, {"from": "user", "value": "q"},
                           {"from": "assistant", "value": "a"}]},
        {"system": "S", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "q"},
                           {"from": "assistant", "value": "a"}]}])
    assert recs[0]["messages"] == [("user", "q"), ("assistant", "a")]
    assert recs[1] == recs[2] and recs[1]["system"] == "S"
    want = preprocess([[{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]], tokenizer, 40, "S")
    assert encode_conversation(tokenizer, recs[1]["messages"], "S")[0] == \
        want["input_ids"][0][want["attention_mask"][0]].tolist()


BAD_RECORDS = [
    ({"id": "a"}, r"record 1 \(id 'a'\): has no \"conversations\""),
    ({"conversations": []}, r"record 1: \"conversations\" must be a non-empty list"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, r"record 1: conversations\[0\]\.from is \"human\": "
                                                            r"use \"user\" or \"assistant\" \(FastChat"),
    ({"conversations": [{"from": "user", "value": 3}]}, r"conversations\[0\]\.value must be a string"),
    ({"conversations": [{"from": "user"}]}, r"conversations\[0\] must be an object with \"from\" and \"value\""),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "system", "value": "s"}]},
     r"conversations\[1\]\.from is \"system\".*goes first"),
    ({"system": 1, "conversations": [{"from": "user", "value": "q"}]}, r"\"system\" must be a string"),
    ("text", r"record 1: is a JSON str, not an object"),
]


@pytest.mark.parametrize("bad,message", BAD_RECORDS, ids=[str(i) for i in range(len(BAD_RECORDS))])
def test_malformed_record_reported_with_index(tmp_path, bad, message):
    path = write_json(tmp_path / "d.json", qa_records(1) + [bad] + qa_records(1))
    with pytest.raises(DataError, match=message) as err:
        load_conversations(path)
    assert "1 malformed record(s) of 3" in str(err.value)


def test_data_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_conversations(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('[{"conversations": [}]')
    with pytest.raises(DataError, match=r"not valid JSON: .* line 1, column"):
        load_conversations(tmp_path / "broken.json")
    with pytest.raises(DataError, match="must be a JSON list of records, got a JSON dict"):
        load_conversations(write_json(tmp_path / "obj.json", {"conversations": []}))
    many = [{"id": i} for i in range(12)]
    with pytest.raises(DataError, match=r"12 malformed record\(s\) of 12(.|\n)*and 2 more"):
        load_conversations(write_json(tmp_path / "many.json", many))


def test_cli_reports_bad_data_without_traceback(tmp_path, tiny_ckpt, capsys):
    path = write_json(tmp_path / "d.json", qa_records(2) + [{"id": "x", "conversations": "hi"}])
    code = cli_main(["--ckpt", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "o"), "--dtype",
                     "float32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "record 2 (id 'x'): \"conversations\" must be a non-empty list" in err


def test_console_command_has_finetune(capsys):
    from nanoqwen.__main__ import main
    with pytest.raises(SystemExit) as done:
        main(["finetune", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nanoqwen finetune") and "--lora-r" in out and "--gradient-checkpointing" in out


# ----------------------------------------------------------------------------------------------- golden step

def golden_model(tiny_ckpt, lora_dir, **kw):
    model = load_model(tiny_ckpt, "cpu", torch.float32)
    add_trainable_lora(model, 8, 16, 0.0)
    set_trainable_lora(model, read_adapter(lora_dir / "adapter", model.config))
    for key, value in kw.items():
        setattr(model, key, value)
    return model.train()


def lora_params(model):
    """{peft key: parameter} of the model's trainable LoRA weights."""
    return {f"{PREFIX}{official}.lora_{p}.weight": getattr(lin, f"lora_{p}")[name]
            for official, lin, name in _trained_layers(model) for p in "AB"}


def golden_loss_and_grads(model, lora_ref):
    rows = golden_rows(lora_ref)
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    nll, count = batch_nll(model, ids, labels)
    loss = nll / count
    loss.backward()
    with torch.no_grad():
        per_token, _ = batch_nll(model, ids, labels, reduction="none")
    token_nll = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    token_nll[labels[:, 1:] != -100] = per_token
    return loss.detach(), count, token_nll, {k: p.grad.clone() for k, p in lora_params(model).items()}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_loss_gradients_and_adamw_step_match_golden(tiny_ckpt, lora_dir, lora_ref, lora_tensors, checkpointing):
    model = golden_model(tiny_ckpt, lora_dir, gradient_checkpointing=checkpointing)
    loss, count, token_nll, grads = golden_loss_and_grads(model, lora_ref)
    case = lora_ref["cases"]["finetune/batch"]
    assert count == case["n_label_tokens"]
    torch.testing.assert_close(loss, lora_tensors["finetune/loss"], atol=2 * LOSS_NOISE, rtol=0)
    ref_nll = lora_tensors["finetune/token_nll"]
    assert torch.equal(token_nll != 0, ref_nll != 0)
    # each NLL is a logsumexp minus one logit: within 2 * the logits' noise (2e-5) of exact, per implementation
    torch.testing.assert_close(token_nll, ref_nll, atol=4 * 2e-5, rtol=0)
    assert len(grads) == 20
    for key, g in grads.items():
        ref = lora_tensors[f"finetune/grad/{key}"]
        torch.testing.assert_close(g, ref, atol=2 * GRAD_NOISE * ref.abs().max().item(), rtol=0, msg=lambda m: key + m)
    optimizer = make_optimizer(model, LR, WD, BETAS, EPS)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [WD]  # LoRA matrices only, all decayed
    optimizer.step()
    for key, p in lora_params(model).items():
        ref, g_ref = lora_tensors[f"finetune/after_step/{key}"], lora_tensors[f"finetune/grad/{key}"]
        noisy = g_ref.abs() <= 2 * GRAD_NOISE * g_ref.abs().max()
        diff = (p.detach() - ref).abs()
        assert diff[~noisy].max() <= 2 * STEP_NOISE, f"{key}: {diff[~noisy].max()}"
        assert not noisy.any() or diff[noisy].max() <= 2 * LR, key


def test_training_through_kernels_matches_torch(tiny_ckpt, lora_dir, lora_ref, lora_tensors, monkeypatch):
    """With the Triton kernels forced, every op on the gradient's path must still be differentiable: the golden
    LoRA gradients, and a full fine-tune's gradients of every parameter (embedding included), as on the torch path."""
    from nanoqwen.kernels import HAVE_TRITON
    if not HAVE_TRITON:
        pytest.skip("Triton is not installed")
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    loss, _, _, grads = golden_loss_and_grads(golden_model(tiny_ckpt, lora_dir), lora_ref)
    torch.testing.assert_close(loss, lora_tensors["finetune/loss"], atol=2 * LOSS_NOISE, rtol=0)
    for key, g in grads.items():
        ref = lora_tensors[f"finetune/grad/{key}"]
        torch.testing.assert_close(g, ref, atol=2 * GRAD_NOISE * ref.abs().max().item(), rtol=0, msg=lambda m: key + m)
    rows = golden_rows(lora_ref)
    ids, labels = torch.tensor([r["input_ids"] for r in rows]), torch.tensor([r["labels"] for r in rows])
    full = {}
    for kernels in ("triton", "torch"):
        monkeypatch.setenv("NANOQWEN_KERNELS", kernels)
        model = load_model(tiny_ckpt, "cpu", torch.float32).requires_grad_(True).train()
        nll, count = batch_nll(model, ids, labels)
        (nll / count).backward()
        full[kernels] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in full["torch"].items():
        assert full["triton"][name] is not None, f"{name}: no gradient through the kernels"
        torch.testing.assert_close(full["triton"][name], g, atol=2 * GRAD_NOISE * g.abs().max().item(), rtol=0,
                                   msg=lambda m: name + m)


# ----------------------------------------------------------------------------------------------- schedule, batches

def test_cosine_schedule_matches_transformers():
    """After the warm-up, the Trainer's cosine (transformers' get_cosine_schedule_with_warmup); the warm-up rises
    from above 0 (the Trainer's first step has lr 0) to the peak."""
    get_cosine_schedule_with_warmup = pytest.importorskip("transformers").get_cosine_schedule_with_warmup
    total, ratio, peak = 200, 0.05, 3e-4
    warmup = math.ceil(ratio * total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    hf = [peak * sched.lr_lambdas[0](s) for s in range(total)]
    ours = [lr_at(s, peak, warmup, total) for s in range(total)]
    torch.testing.assert_close(torch.tensor(ours[warmup:]), torch.tensor(hf[warmup:]), rtol=1e-12, atol=0)
    ramp = ours[:warmup + 1]
    assert ramp[0] > 0 and all(a < b for a, b in zip(ramp, ramp[1:])) and ramp[-1] == peak


@pytest.mark.parametrize("n_rows,world,bs", [(8, 2, 2), (5, 2, 2), (1, 2, 1), (7, 3, 2), (4, 1, 3)])
def test_split_rows_covers_the_global_batch(n_rows, world, bs):
    rows = torch.randperm(50)[:n_rows]
    splits = [split_rows(rows, r, world, bs) for r in range(world)]
    assert len({len(s) for s in splits}) == 1  # as many micro-batches everywhere
    real = sorted(int(i) for s in splits for chunk, w in s if w for i in chunk)
    assert real == sorted(rows.tolist())
    assert all(len(chunk) <= bs and (w == 1 or len(chunk) == 1) for s in splits for chunk, w in s)


# ----------------------------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def lora_run(tiny_ckpt, tmp_path_factory):
    """A LoRA fine-tune of the tiny model on a few real Q/A pairs, with --merge, and its eval loss before training."""
    root = tmp_path_factory.mktemp("lora_run")
    data = write_json(root / "train.json", qa_records())
    trainer = Trainer(train_args(tiny_ckpt, data, root / "out", eval_data=str(data), merge=True, lora_dropout=0.05))
    before = trainer.evaluate()
    result = trainer.run()
    return trainer, result, before


def test_loss_falls_on_real_text(lora_run):
    trainer, result, before = lora_run
    evals = [before] + [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert len(evals) == 1 + trainer.args.epochs
    assert all(b < a for a, b in zip(evals, evals[1:])), evals
    steps = [r for r in result.history if "loss" in r]
    assert len(steps) == result.steps == trainer.args.epochs * 2
    assert all(r["tokens"] > 0 and r["grad_norm"] > 0 for r in steps)


def test_saved_adapter_reloads_to_the_trained_model(lora_run, tiny_ckpt, golden):
    trainer, result, _ = lora_run
    out = result.out
    ids = trainer.train_data.batch([0, 3], "cpu")[0]
    trained = logits_of(trainer.core, ids)  # merged in place by save_outputs (--merge)
    config = json.loads((out / "adapter_config.json").read_text())
    golden_config = json.loads((golden / "qwen-tiny" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert set(config) == set(golden_config)  # every field peft 0.7.1 writes
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert sorted(config["target_modules"]) == sorted(golden_config["target_modules"])
    assert config["base_model_name_or_path"] == str(tiny_ckpt.resolve())
    assert set(load_file(str(out / "adapter_model.safetensors"))) == \
        set(load_file(str(golden / "qwen-tiny" / "lora" / "adapter" / "adapter_model.safetensors")))
    # the merged checkpoint, and the adapter merged by the loader: the same fp32 weights, exactly
    torch.testing.assert_close(logits_of(load_model(out / "merged", "cpu", torch.float32), ids), trained, atol=0,
                               rtol=0)
    torch.testing.assert_close(logits_of(load_model(tiny_ckpt, "cpu", torch.float32, lora=out), ids), trained,
                               atol=0, rtol=0)
    # unmerged: the serving LoraManager, and the training layers with the saved weights
    served = load_model(tiny_ckpt, "cpu", torch.float32)
    manager = LoraManager(served, max_loras=1, max_lora_rank=8)
    manager.add("ft", out)
    manager.set_token_indices(manager.token_indices(["ft"] * ids.shape[0], [ids.shape[1]] * ids.shape[0]))
    torch.testing.assert_close(logits_of(served, ids), trained, atol=MERGED_ATOL, rtol=0)
    again = load_model(tiny_ckpt, "cpu", torch.float32)
    add_trainable_lora(again, 8, 16, 0.05)
    set_trainable_lora(again, read_adapter(out, again.config))
    torch.testing.assert_close(logits_of(again, ids), trained, atol=MERGED_ATOL, rtol=0)
    base = logits_of(load_model(tiny_ckpt, "cpu", torch.float32), ids)
    assert (base - trained).abs().max() > 100 * MERGED_ATOL  # the adapter does something


def test_peft_reads_the_saved_adapter(lora_run, tiny_ckpt):
    """peft, on a module with the reference model's linear names and the base weights, loads the adapter (keys,
    shapes, scaling) and merges it into the weights of the --merge checkpoint."""
    peft = pytest.importorskip("peft")
    from torch import nn
    trainer, result, _ = lora_run
    cfg = trainer.cfg
    H, F = cfg.hidden_size, cfg.mlp_width

    class Config(dict):
        __getattr__ = dict.get

        def to_dict(self):
            return dict(self)

    class Skeleton(nn.Module):  # modeling_qwen.py's module tree, linears only
        def __init__(self):
            super().__init__()
            self.config = Config(model_type="qwen", tie_word_embeddings=False)
            self.transformer = nn.Module()
            self.transformer.h = nn.ModuleList()
            for _ in range(cfg.num_hidden_layers):
                block = nn.Module()
                block.attn, block.mlp = nn.Module(), nn.Module()
                block.attn.c_attn, block.attn.c_proj = nn.Linear(H, 3 * H), nn.Linear(H, H, bias=False)
                block.mlp.w1, block.mlp.w2 = nn.Linear(H, F, bias=False), nn.Linear(H, F, bias=False)
                block.mlp.c_proj = nn.Linear(F, H, bias=False)
                self.transformer.h.append(block)

        def prepare_inputs_for_generation(self, *args, **kwargs):  # peft wants the attribute; never called
            raise NotImplementedError("a test skeleton: it only holds weights for peft to merge")

    base = {}
    for f in sorted(tiny_ckpt.glob("*.safetensors")):
        base.update(load_file(str(f)))
    skeleton = Skeleton()
    skeleton.load_state_dict({k: v.float() for k, v in base.items() if ".h." in k and "ln_" not in k})
    merged = peft.PeftModel.from_pretrained(skeleton, str(result.out)).merge_and_unload().state_dict()
    ours = {}
    for f in (result.out / "merged").glob("*.safetensors"):
        ours.update(load_file(str(f)))
    assert set(merged) <= set(ours)
    for name, w in merged.items():
        torch.testing.assert_close(ours[name], w, msg=lambda m: name + m)  # fp32 rounding of W + s * B @ A
    assert any(not torch.equal(ours[n], base[n].float()) for n in merged)


def test_resume_continues_the_same_curve(tiny_ckpt, tmp_path):
    data = write_json(tmp_path / "train.json", qa_records(6))
    kw = dict(max_steps=6, save_steps=3, lora_dropout=0.1, batch_size=1, grad_accum=2, lr=5e-3)
    straight = Trainer(train_args(tiny_ckpt, data, tmp_path / "a", **kw)).run()
    assert (tmp_path / "a" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "a" / "checkpoint-6").exists()  # the end writes the outputs instead
    resumed = Trainer(train_args(tiny_ckpt, data, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"),
                                 **kw)).run()
    assert resumed.history[:3] == straight.history[:3]
    assert [r["loss"] for r in resumed.history[3:]] == [r["loss"] for r in straight.history[3:]]
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 7))
    with pytest.raises(ValueError, match=r"lora_r: 8 then, 4 now"):
        Trainer(train_args(tiny_ckpt, data, tmp_path / "c", resume=str(tmp_path / "a" / "checkpoint-3"),
                           **{**kw, "lora_r": 4})).run()


def test_checkpoints_pruned_to_limit(tiny_ckpt, tmp_path):
    data = write_json(tmp_path / "train.json", qa_records(4))
    Trainer(train_args(tiny_ckpt, data, tmp_path, max_steps=5, save_steps=1, save_total_limit=2, batch_size=1,
                       grad_accum=1)).run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_full_finetune_writes_an_official_checkpoint(tiny_ckpt, tmp_path):
    data = write_json(tmp_path / "train.json", qa_records(4))
    trainer = Trainer(train_args(tiny_ckpt, data, tmp_path / "out", full=True, max_steps=2, lr=1e-3))
    assert trainer.args.learning_rate == 1e-3 and FinetuneArgs("", "", "", full=True).learning_rate == 1e-5
    result = trainer.run()
    out = result.out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / f)))
    assert {n: tuple(t.shape) for n, t in tensors.items()} == official_shapes(trainer.cfg)  # w2 and w1 apart again
    for f in ("config.json", "generation_config.json", "qwen.tiktoken"):
        assert (out / f).read_bytes() == (tiny_ckpt / f).read_bytes()
    ids = trainer.train_data.batch([0, 1], "cpu")[0]
    torch.testing.assert_close(logits_of(load_model(out, "cpu", torch.float32), ids), logits_of(trainer.core, ids),
                               atol=0, rtol=0)
    base = load_model(tiny_ckpt, "cpu", torch.float32).state_dict()
    changed = [n for n, p in trainer.core.state_dict().items() if n in base and not torch.equal(p, base[n])]
    assert "transformer.wte.weight" in changed and "transformer.h.1.mlp.w2_w1.weight" in changed


def test_base_model_lora_trains_embeddings_as_finetune_py(tiny_ckpt, tmp_path):
    """modules_to_save: finetune.py trains wte and lm_head copies for a base (non-chat) model; the adapter carries
    them and loads merged (the LoraManager refuses it, as for peft's own such adapters)."""
    data = write_json(tmp_path / "train.json", qa_records(4))
    trainer = Trainer(train_args(tiny_ckpt, data, tmp_path / "out", modules_to_save="auto", max_steps=2, lr=1e-3))
    assert trainer.save_modules == ["transformer.wte.weight", "lm_head.weight"]  # "checkpoint" has no "chat"
    result = trainer.run()
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "wte"]
    ids = trainer.train_data.batch([0, 1], "cpu")[0]
    torch.testing.assert_close(logits_of(load_model(tiny_ckpt, "cpu", torch.float32, lora=result.out), ids),
                               logits_of(trainer.core, ids), atol=MERGED_ATOL, rtol=0)
    base = load_model(tiny_ckpt, "cpu", torch.float32)
    assert not torch.equal(trainer.core.lm_head.weight, base.lm_head.weight)


def test_option_errors(tiny_ckpt, golden, tmp_path):
    data = write_json(tmp_path / "train.json", qa_records(2))
    with pytest.raises(ValueError, match="GPTQ-quantized checkpoint: its weights cannot be trained in full"):
        Trainer(train_args(golden / "qwen-tiny-int4" / "checkpoint", data, tmp_path, full=True))
    with pytest.raises(ValueError, match="--merge: .* GPTQ-quantized"):
        Trainer(train_args(golden / "qwen-tiny-int4" / "checkpoint", data, tmp_path, merge=True))
    with pytest.raises(ValueError, match="--batch-size 0: must be a positive integer"):
        Trainer(train_args(tiny_ckpt, data, tmp_path, batch_size=0))
    with pytest.raises(ValueError, match="unknown LoRA target module.*'q_proj'"):
        Trainer(train_args(tiny_ckpt, data, tmp_path, lora_target=("q_proj",)))
