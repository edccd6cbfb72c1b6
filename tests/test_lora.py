"""LoRA adapters (nanoqwen.lora) against the golden adapter made by peft 0.7.1 as Qwen's finetune.py makes one.

The golden README (../shared/golden/qwen-tiny/lora/README.md) says what each case is. Tolerances are its own: fp32
1e-4 (its float noise: final_hidden 5e-6, logits 2e-5; merged vs unmerged up to 3.1e-5), tokens exact. Rows of a
packed batch against the same sequence run alone get the same 1e-4: the base model alone already differs by 1.3e-5
in the logits there (matmuls over 218 rows instead of 30 block and round differently), beyond the 1e-5 of
tests/test_model_golden.py's batch of two equal-length rows.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import conftest
from conftest import NO_TRITON, run_paged
from nanoqwen import Qwen
from nanoqwen.attention import AttentionMetadata
from nanoqwen.checkpoint import load_model
from nanoqwen.lora import AdapterError, LoraManager, LoRALinear, merge_adapter, read_adapter, save_adapter
from nanoqwen.rope import ntk_index

FORWARD = ["text", "random", "long"]
ATOL = 1e-4


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def adapter_dir(lora_dir):
    return lora_dir / "adapter"


@pytest.fixture(scope="session")
def adapters(adapter_dir, tiny_ckpt, tmp_path_factory):
    """The golden adapter "g"; "g2x": the same weights with lora_alpha 32 (scaling 4); "r4": a random rank-4 adapter
    on c_attn and w1 only (a partial adapter, a lower rank, and one slice of the fused w2_w1)."""
    root = tmp_path_factory.mktemp("adapters")
    golden = read_adapter(adapter_dir, tiny_cfg(tiny_ckpt))
    g2x = save_adapter(root / "g2x", golden.weights, r=8, lora_alpha=32)
    gen = torch.Generator().manual_seed(4)
    weights = {}
    for i in range(2):
        for module, (d_in, d_out) in (("attn.c_attn", (64, 192)), ("mlp.w1", (64, 128))):
            weights[f"transformer.h.{i}.{module}"] = (torch.randn(4, d_in, generator=gen) / 8,
                                                      torch.randn(d_out, 4, generator=gen) * 0.01)
    r4 = save_adapter(root / "r4", weights, r=4, lora_alpha=8)
    return {"g": adapter_dir, "g2x": g2x, "r4": r4}


def tiny_cfg(ckpt):
    from nanoqwen.config import QwenConfig
    return QwenConfig.from_json(ckpt)


def plain(ckpt, **kw):
    return Qwen.from_pretrained(ckpt, device="cpu", dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def served(tiny_ckpt, adapters):
    """One fp32 tiny model with a LoraManager holding g, g2x and r4 (slots 0, 1, 2 of 4)."""
    model = plain(tiny_ckpt)
    manager = LoraManager(model, max_loras=4, max_lora_rank=8, max_num_tokens=256)
    for name in ("g", "g2x", "r4"):
        manager.add(name, adapters[name])
    return model, manager


def final_hidden(model, run):
    """run() under a hook capturing ln_f's output (the golden's final_hidden)."""
    seen = []
    def hook(module, inputs, out):  # ln_f returns (normed, residual) when the last block's residual is fused in
        seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handle = model.transformer.ln_f.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = run()
    finally:
        handle.remove()
    return seen[-1], out


def alone(model, manager, name, ids):
    """One sequence on one adapter (None: none) through model(input_ids): (final_hidden [S, H], logits [S, V])."""
    manager.set_token_indices(manager.token_indices([name], [len(ids)]))
    hidden, logits = final_hidden(model, lambda: model(torch.tensor([ids])))
    return hidden, logits[0]


class Routed:
    """The model with every row of each call on one adapter, for conftest.run_paged (prefill, then decode steps)."""

    def __init__(self, model, manager, name):
        self.model, self.manager, self.name = model, manager, name

    def __getattr__(self, attr):
        return getattr(self.model, attr)

    def __call__(self, tokens, meta=None, kv_cache=None):
        self.manager.set_token_indices(self.manager.token_indices([self.name], [tokens.shape[0]]))
        return self.model(tokens, meta, kv_cache)


def check_forward_case(case, hidden, logits, hidden_ref, last_logits_ref, argmax_key="argmax"):
    torch.testing.assert_close(hidden, hidden_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[-1], last_logits_ref, atol=ATOL, rtol=0)
    assert logits.argmax(-1).tolist() == case[argmax_key]
    for pos, (ids, vals) in enumerate(zip(case["top10_ids"], case["top10_logits"])):
        torch.testing.assert_close(logits[pos, ids], torch.tensor(vals), atol=ATOL, rtol=0, msg=lambda m: f"{pos}: {m}")


# ----------------------------------------------------------------------------------------------- reading

def test_read_golden_adapter(adapter_dir, tiny_ckpt, lora_ref):
    a = read_adapter(adapter_dir, tiny_cfg(tiny_ckpt))
    assert a.rank == 8 and set(a.scaling.values()) == {lora_ref["scaling"]} and not a.saved_modules
    keys = {f"base_model.model.{n}.lora_{p}.weight": list(t.shape)
            for n, ab in a.weights.items() for p, t in zip("AB", ab)}
    assert keys == lora_ref["adapter_keys"]


# ----------------------------------------------------------------------------------------------- merged

def test_merged_weights(tiny_ckpt, adapter_dir, lora_tensors):
    """Layer 0 as merge_and_unload leaves it: W + 2 B @ A (w2's rows then w1's in w2_w1), c_attn's bias untouched.
    Tolerance: the fp32 rounding of a rank-8 sum and one addition, a few ulps of the largest term."""
    base, merged = plain(tiny_ckpt), plain(tiny_ckpt, lora=adapter_dir)
    a = read_adapter(adapter_dir, tiny_cfg(tiny_ckpt))
    h, hb = merged.transformer.h[0], base.transformer.h[0]

    def layer0(block):
        return {"attn.c_attn": block.attn.c_attn.weight, "attn.c_proj": block.attn.c_proj.weight,
                "mlp.w2": block.mlp.w2_w1.weight[:128], "mlp.w1": block.mlp.w2_w1.weight[128:],
                "mlp.c_proj": block.mlp.c_proj.weight}
    before = layer0(hb)
    for name, w in layer0(h).items():
        ref = lora_tensors[f"merged/weights/transformer.h.0.{name}.weight"]
        A, B = a.weights[f"transformer.h.0.{name}"]
        eps = torch.finfo(torch.float32).eps
        tol = (A.shape[0] + 2) * eps * float(ref.abs().max() + 2 * (B.abs() @ A.abs()).max())
        torch.testing.assert_close(w, ref, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")
        assert (before[name] - ref).abs().max() > 100 * tol, f"{name}: the merge must move the weights"
    assert torch.equal(h.attn.c_attn.bias, lora_tensors["merged/weights/transformer.h.0.attn.c_attn.bias"])
    assert torch.equal(h.attn.c_attn.bias, hb.attn.c_attn.bias)


@pytest.fixture(scope="module")
def merged_model(tiny_ckpt, adapter_dir):
    return plain(tiny_ckpt, lora=adapter_dir)


@pytest.mark.parametrize("name", FORWARD)
def test_merged_forward(merged_model, lora_ref, lora_tensors, name):
    case = lora_ref["cases"][f"lora/forward/{name}"]
    hidden, logits = final_hidden(merged_model, lambda: merged_model(torch.tensor([case["input_ids"]]))[0])
    check_forward_case(case, hidden, logits, lora_tensors[f"merged/forward/{name}/final_hidden"],
                       lora_tensors[f"lora/forward/{name}/last_logits"], "merged_argmax")


def test_merged_generate_paged(merged_model, lora_ref):
    """Greedy tokens exact through a paged prefill then decode steps (teacher-forced on the golden tokens: every step's
    argmax is the next golden token, which is what free-running greedy decoding gives)."""
    case = lora_ref["cases"]["lora/generate/text"]
    out = case["output_ids"]
    steps = run_paged(merged_model, case["input_ids"] + out[:-1], len(case["input_ids"]))
    assert [int(s.argmax()) for s in steps] == out


def test_from_pretrained_and_load_model_agree(tiny_ckpt, adapter_dir, merged_model):
    m = load_model(tiny_ckpt, device="cpu", dtype=torch.float32, lora=adapter_dir)
    for (n, p), q in zip(m.state_dict().items(), merged_model.state_dict().values()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------------------------- unmerged

@pytest.mark.parametrize("name", FORWARD)
def test_unmerged_forward(served, lora_ref, lora_tensors, name):
    model, manager = served
    case = lora_ref["cases"][f"lora/forward/{name}"]
    hidden, logits = alone(model, manager, "g", case["input_ids"])
    check_forward_case(case, hidden, logits, lora_tensors[f"lora/forward/{name}/final_hidden"],
                       lora_tensors[f"lora/forward/{name}/last_logits"])


def test_unmerged_generate_paged(served, lora_ref):
    model, manager = served
    case = lora_ref["cases"]["lora/generate/text"]
    out = case["output_ids"]
    steps = run_paged(Routed(model, manager, "g"), case["input_ids"] + out[:-1], len(case["input_ids"]))
    assert [int(s.argmax()) for s in steps] == out


def mixed_batch(lora_ref):
    """(adapter, ids) per sequence: the golden adapter, none, the scaled one, the rank-4 one; lengths 1..100."""
    text, rnd, long = (lora_ref["cases"][f"lora/forward/{n}"]["input_ids"] for n in FORWARD)
    return [("g", text), (None, rnd), ("r4", long[:40]), ("g2x", text), ("g", rnd[:7]), (None, long[:1]),
            ("r4", rnd[:3]), ("g", long)]


def run_packed(model, manager, batch):
    """All sequences of `batch` in one packed forward (no cache): (final_hidden, logits) of every row."""
    lens = [len(ids) for _, ids in batch]
    cfg = model.config
    meta = AttentionMetadata.for_prefill(lens, "cpu", [ntk_index(n, cfg.seq_length, cfg.use_dynamic_ntk) for n in lens])
    manager.set_token_indices(manager.token_indices([a for a, _ in batch], lens))
    tokens = torch.tensor([t for _, ids in batch for t in ids])
    return final_hidden(model, lambda: model(tokens, meta))


def test_mixed_batch_rows_as_alone(served, tiny_ckpt, adapters, lora_ref, lora_tensors):
    """Each sequence of a batch mixing adapters (and none) gets what it gets alone; alone, each adapter matches its
    merged model (and the golden adapter the golden), and no adapter matches the plain model."""
    model, manager = served
    batch = mixed_batch(lora_ref)
    hidden, logits = run_packed(model, manager, batch)
    refs = {"g": plain(tiny_ckpt, lora=adapters["g"]), "g2x": plain(tiny_ckpt, lora=adapters["g2x"]),
            "r4": plain(tiny_ckpt, lora=adapters["r4"]), None: plain(tiny_ckpt)}
    start = 0
    for i, (name, ids) in enumerate(batch):
        rows = slice(start, start + len(ids))
        start += len(ids)
        h1, l1 = alone(model, manager, name, ids)
        msg = lambda m: f"sequence {i} ({name}, {len(ids)} tokens): {m}"  # noqa: E731
        torch.testing.assert_close(logits[rows], l1, atol=ATOL, rtol=0, msg=msg)
        with torch.no_grad():
            ref = refs[name](torch.tensor([ids]))[0]
        torch.testing.assert_close(l1, ref, atol=ATOL, rtol=0, msg=msg)
    text = lora_ref["cases"]["lora/forward/text"]
    torch.testing.assert_close(hidden[:len(text["input_ids"])], lora_tensors["lora/forward/text/final_hidden"],
                               atol=ATOL, rtol=0)
    assert logits[:len(text["input_ids"])].argmax(-1).tolist() == text["argmax"]


def test_mixed_batch_through_kernels(served, lora_ref, lora_tensors, monkeypatch):
    """The same batch with every kernel in Triton (the CPU interpreter here): equal to the torch path, golden rows to
    the golden."""
    model, manager = served
    batch = mixed_batch(lora_ref)[:5]
    _, want = run_packed(model, manager, batch)
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    hidden, logits = run_packed(model, manager, batch)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    n = len(batch[0][1])
    torch.testing.assert_close(hidden[:n], lora_tensors["lora/forward/text/final_hidden"], atol=ATOL, rtol=0)
    assert logits[:n].argmax(-1).tolist() == lora_ref["cases"]["lora/forward/text"]["argmax"]


def test_slots_are_reused_clean(tiny_ckpt, adapters, lora_ref):
    """remove() then add() into the same slot leaves nothing of the former adapter (r4 adapts fewer linears than g)."""
    ids = lora_ref["cases"]["lora/forward/random"]["input_ids"]
    model = plain(tiny_ckpt)
    manager = LoraManager(model, max_loras=1, max_lora_rank=8)
    manager.add("g", adapters["g"])
    first = manager.adapter_id("g")
    manager.remove("g")
    lins = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lins) == 8 and not any(t.any() for m in lins for t in m.buffers() if t.is_floating_point()), \
        "a removed adapter's slot is zeroed: stale device indices must add nothing"
    assert manager.names == [] and manager.add("r4", adapters["r4"]) == 0
    _, got = alone(model, manager, "r4", ids)
    with torch.no_grad():
        want = plain(tiny_ckpt, lora=adapters["r4"])(torch.tensor([ids]))[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    manager.remove("r4")
    manager.add("g", adapters["g"])
    assert manager.adapter_id("g") != first  # a new id for a new add(), whatever the name
    manager.close()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids]))[0], plain(tiny_ckpt)(torch.tensor([ids]))[0], atol=0,
                                   rtol=0)


# ----------------------------------------------------------------------------------------------- GPTQ base

def dequantized_copy(model):
    """conftest.dequantized_copy, after checking that the GPTQ linears without a bias store zeros (AutoGPTQ)."""
    from nanoqwen.quant.gptq import GPTQLinear
    for name, module in model.named_modules():
        if isinstance(module, GPTQLinear) and not name.endswith("c_attn"):
            assert not module.bias.any()  # no_bias: AutoGPTQ stores zeros
    return conftest.dequantized_copy(model)


def test_gptq_base_against_dequantize_then_merge(golden, adapters, lora_ref, monkeypatch):
    ckpt = golden / "qwen-tiny-int4" / "checkpoint"
    model = plain(ckpt)
    reference = merge_adapter(dequantized_copy(model), read_adapter(adapters["g"], model.config))
    plain_ref = dequantized_copy(model)
    manager = LoraManager(model, max_loras=2, max_lora_rank=8)
    manager.add("g", adapters["g"])
    cases = lora_ref["cases"]
    batch = [("g", cases["lora/forward/text"]["input_ids"]), (None, cases["lora/forward/random"]["input_ids"][:9])]
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("NANOQWEN_KERNELS", kernels)
        _, logits = run_packed(model, manager, batch)
        with torch.no_grad():
            want = torch.cat([reference(torch.tensor([batch[0][1]]))[0], plain_ref(torch.tensor([batch[1][1]]))[0]])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0, msg=lambda m: f"{kernels}: {m}")


def test_gptq_merge_refused(golden, adapter_dir):
    with pytest.raises(AdapterError, match=r"cannot merge the LoRA adapter .* GPTQ-quantized.*LoraManager"):
        plain(golden / "qwen-tiny-int4" / "checkpoint", lora=adapter_dir)


# ----------------------------------------------------------------------------------------------- modules_to_save

@pytest.fixture(scope="module")
def base_variant(tiny_ckpt, adapter_dir, lora_ref, lora_tensors, tmp_path_factory):
    """The golden README's recipe: adapter/ tensors + fp32 wte and lm_head with rows row_ids replaced + its config."""
    case = lora_ref["cases"]["base_variant/forward/chat"]
    folder = tmp_path_factory.mktemp("adapter_base")
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    base = plain(tiny_ckpt).state_dict()
    for name, rows in (("transformer.wte.weight", "wte_rows"), ("lm_head.weight", "lm_head_rows")):
        full = base[name].float().clone()
        full[case["row_ids"]] = lora_tensors[f"base_variant/{rows}"]
        sd["base_model.model." + name] = full
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(case["adapter_config"]))
    header = {k: {"shape": list(v.shape), "dtype": "F32"} for k, v in sd.items()}
    assert header == case["saved_file_header"]
    return folder


def test_base_variant_merged(tiny_ckpt, base_variant, lora_ref, lora_tensors):
    case = lora_ref["cases"]["base_variant/forward/chat"]
    model = plain(tiny_ckpt, lora=base_variant)
    hidden, logits = final_hidden(model, lambda: model(torch.tensor([case["input_ids"]]))[0])
    torch.testing.assert_close(hidden, lora_tensors["base_variant/forward/chat/final_hidden"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[:, case["row_ids"]], lora_tensors["base_variant/forward/chat/logits_at_row_ids"],
                               atol=ATOL, rtol=0)
    assert logits.argmax(-1).tolist() == case["argmax"]
    for pos, (ids, vals) in enumerate(zip(case["top10_ids"], case["top10_logits"])):
        torch.testing.assert_close(logits[pos, ids], torch.tensor(vals), atol=ATOL, rtol=0)


def test_base_variant_unmerged_refused(served, base_variant):
    _, manager = served
    with pytest.raises(AdapterError, match=r"full copies of lm_head.weight, transformer.wte.weight .*load it merged"):
        manager.add("base", base_variant)


# ----------------------------------------------------------------------------------------------- errors

def broken(adapter_dir, tmp_path, config=None, tensors=None):
    """A copy of the golden adapter with its config updated by `config` and its tensors edited by `tensors(sd)`."""
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    if config is not None:
        doc = json.loads((folder / "adapter_config.json").read_text())
        doc.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(doc))
    if tensors is not None:
        sd = load_file(str(folder / "adapter_model.safetensors"))
        tensors(sd)
        save_file(sd, str(folder / "adapter_model.safetensors"))
    return folder


KEY = "base_model.model.transformer.h.{}.{}.lora_{}.weight"
LLAMA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

ERRORS = {
    "other_hidden_size": (dict(tensors=lambda sd: sd.update({KEY.format(0, "attn.c_attn", "A"): torch.zeros(8, 128)})),
                          r"attn\.c_attn\.lora_A\.weight has shape \[8, 128\], but this model needs \['r', 64\] "
                          r"\(hidden_size 64"),
    "other_mlp_width": (dict(tensors=lambda sd: sd.update({KEY.format(1, "mlp.w1", "B"): torch.zeros(300, 8)})),
                        r"mlp\.w1\.lora_B\.weight has shape \[300, 8\], but this model needs \[128, 'r'\]"),
    "other_architecture_keys": (
        dict(config={"target_modules": ["q_proj", "v_proj"]}),
        r"unknown target_modules 'q_proj', 'v_proj': Qwen \(v1\) has the linears c_attn, c_proj"),
    "unknown_target": (dict(config={"target_modules": ["c_attn", "wte"]}), r"unknown target_modules 'wte'"),
    "llama_tensors": (dict(tensors=lambda sd: sd.update({LLAMA_KEY: torch.zeros(8, 64)})),
                      r"not LoRA weights of a Qwen \(v1\) linear: base_model\.model\.model\.layers\.0\.self_attn"),
    "more_layers": (dict(tensors=lambda sd: sd.update({KEY.format(2, "mlp.w1", "A"): torch.zeros(8, 64)})),
                    r"adapts layer 2, but this model has 2 layers"),
    "missing_module": (dict(tensors=lambda sd: [sd.pop(KEY.format(1, "mlp.c_proj", p)) for p in "AB"]),
                       r"lacks the LoRA weights of transformer\.h\.1\.mlp\.c_proj, which target_modules selects"),
    "not_targeted": (dict(config={"target_modules": ["c_attn", "w1", "w2"]}),
                     r"holds LoRA weights for transformer\.h\.0\.attn\.c_proj, .*which target_modules does not select"),
    "missing_B": (dict(tensors=lambda sd: sd.pop(KEY.format(0, "mlp.w2", "B"))),
                  r"mlp\.w2\.lora_A\.weight but no lora_B"),
    "rank_mismatch": (dict(config={"r": 16}), r"do not have the rank r = 16"),
    "not_lora": (dict(config={"peft_type": "PREFIX_TUNING"}), r"peft_type is PREFIX_TUNING: nanoqwen loads LoRA"),
    "dora": (dict(config={"use_dora": True}), r"use_dora is true"),
    "lora_bias": (dict(config={"bias": "lora_only"}), r"bias is 'lora_only'"),
    "modules_to_save_ln": (dict(config={"modules_to_save": ["ln_f"]}), r"modules_to_save 'ln_f' is not supported"),
    "modules_to_save_missing": (dict(config={"modules_to_save": ["wte"]}),
                                r"lacks base_model\.model\.transformer\.wte\.weight, the copy that modules_to_save"),
    "int_weights": (dict(tensors=lambda sd: sd.update({KEY.format(0, "mlp.w2", "A"): torch.zeros(8, 64).int()})),
                    r"mlp\.w2\.lora_A\.weight is I32"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_adapter_errors(case, adapter_dir, tiny_ckpt, tmp_path):
    edit, message = ERRORS[case]
    folder = broken(adapter_dir, tmp_path, **edit)
    with pytest.raises(AdapterError, match=message):
        read_adapter(folder, tiny_cfg(tiny_ckpt))


def test_folder_errors(adapter_dir, tiny_ckpt, tmp_path):
    cfg = tiny_cfg(tiny_ckpt)
    with pytest.raises(AdapterError, match=r"is not a folder: pass the folder that finetune.py"):
        read_adapter(tmp_path / "nowhere", cfg)
    folder = broken(adapter_dir, tmp_path)
    (folder / "adapter_config.json").write_text("{r: 8")
    with pytest.raises(AdapterError, match=r"adapter_config.json is not valid JSON"):
        read_adapter(folder, cfg)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"has no adapter_config.json: it is not a PEFT adapter folder"):
        read_adapter(folder, cfg)
    shutil.copy(adapter_dir / "adapter_config.json", folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"has no adapter_model.safetensors: the adapter's weights are missing"):
        read_adapter(folder, cfg)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not unpickled")
    with pytest.raises(AdapterError, match=r"(?s)only as adapter_model.bin, a pickle: nanoqwen never loads pickles.*"
                                           r"torch.load\('adapter_model.bin', map_location='cpu', weights_only=True\).*"
                                           r"save_file"):
        read_adapter(folder, cfg)
    with pytest.raises(AdapterError, match=r"only as adapter_model.bin"):  # the same through load_model
        plain(tiny_ckpt, lora=folder)


def test_bin_conversion_command_works(adapter_dir, tiny_ckpt, tmp_path):
    """The command the .bin error prints turns a pickled adapter into one that loads to the same weights."""
    import shlex
    import subprocess
    import sys
    from nanoqwen.lora import TO_SAFETENSORS
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", folder)
    torch.save(load_file(str(adapter_dir / "adapter_model.safetensors")), folder / "adapter_model.bin")
    command = TO_SAFETENSORS.replace("python", shlex.quote(sys.executable), 1)  # the test's python, not PATH's
    subprocess.run(command, shell=True, cwd=folder, check=True, capture_output=True)
    cfg = tiny_cfg(tiny_ckpt)
    a, b = read_adapter(folder, cfg), read_adapter(adapter_dir, cfg)
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(x, y) for n in a.weights for x, y in zip(a.weights[n], b.weights[n]))

def test_manager_errors(tiny_ckpt, adapters, lora_ref):
    model = plain(tiny_ckpt)
    with pytest.raises(ValueError, match=r"max_lora_rank must be a positive integer"):
        LoraManager(model, max_lora_rank=0)
    manager = LoraManager(model, max_loras=2, max_lora_rank=4, max_num_tokens=64)
    with pytest.raises(ValueError, match=r"already has a LoraManager"):
        LoraManager(model)
    with pytest.raises(AdapterError, match=r"has rank 8, above this manager's max_lora_rank 4: .*max_lora_rank >= 8"):
        manager.add("g", adapters["g"])
    manager.add("a", adapters["r4"])
    with pytest.raises(ValueError, match=r"named 'a' is already loaded"):
        manager.add("a", adapters["r4"])
    manager.add("b", adapters["r4"])
    with pytest.raises(AdapterError, match=r"all 2 LoRA slots are in use \(a, b\): remove one"):
        manager.add("c", adapters["r4"])
    with pytest.raises(KeyError, match=r"no LoRA adapter named 'zz' is loaded \(loaded: a, b\)"):
        manager.remove("zz")
    manager.remove("b")
    ids = lora_ref["cases"]["lora/forward/text"]["input_ids"]
    with pytest.raises(ValueError, match=r"runs 22 token rows but LoraManager.set_token_indices was never called"):
        model(torch.tensor([ids]))
    manager.set_token_indices([0] * 21)
    with pytest.raises(ValueError, match=r"runs 22 token rows but LoraManager.set_token_indices was given 21 rows"):
        model(torch.tensor([ids]))
    with pytest.raises(ValueError, match=r"slot\(s\) \[1, 5\] hold no adapter"):
        manager.set_token_indices([0, 1, -1, 5])
    with pytest.raises(ValueError, match=r"got 65 rows, above this manager's max_num_tokens 64"):
        manager.set_token_indices([0] * 65)
    with pytest.raises(ValueError, match=r"1-D integer tensor"):
        manager.set_token_indices(torch.zeros(3))


def test_runs_without_triton(tiny_ckpt, adapter_dir, lora_ref, lora_tensors, tmp_path):
    """A CPU install without Triton: nanoqwen.lora imports and serves adapters through the torch references."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    case = lora_ref["cases"]["lora/forward/text"]
    save_file({"want": lora_tensors["lora/forward/text/last_logits"]}, str(tmp_path / "want.safetensors"))
    code = NO_TRITON + f"""
import torch
from safetensors.torch import load_file
from nanoqwen import Qwen
from nanoqwen.kernels import HAVE_TRITON
from nanoqwen.lora import LoraManager
assert not HAVE_TRITON
model = Qwen.from_pretrained({str(tiny_ckpt)!r}, device="cpu", dtype=torch.float32)
manager = LoraManager(model, max_loras=2, max_lora_rank=8)
manager.add("g", {str(adapter_dir)!r})
ids = {case["input_ids"]!r}
manager.set_token_indices(manager.token_indices(["g"], [len(ids)]))
with torch.no_grad():
    last = model(torch.tensor([ids]))[0, -1]
torch.testing.assert_close(last, load_file({str(tmp_path / "want.safetensors")!r})["want"], atol={ATOL}, rtol=0)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
