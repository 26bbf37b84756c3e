"""LoRA (r1lab.lora) against independent references: PEFT on transformers' DeepseekV3/V2ForCausalLM reading
r1lab's adapters and writing adapters r1lab reads, merged exports, and gradients against autograd on the unfused
formula W + s B A."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from r1lab import Transformer, get_preset, load_pretrained, parallel, save_pretrained
from r1lab.lora import (LoRAError, LoRAExperts, LoRALinear, adapters_off, apply_lora, load_adapter, lora_modules,
                        merge_and_unload, merged_model, parameter_counts, save_adapter)
from r1lab.model.moe import Experts
from test_model import TIE_MARGIN, routing_margin  # the same near-tie guard as the parity tests

VOCAB = 320
V3 = get_preset("tiny").replace(vocab_size=VOCAB)  # q compression, dense layer 0, MoE layers with groups, MTP
V2 = get_preset("deepseek-v2-lite").replace(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=3, max_position_embeddings=1024, rope_scaling=None)
CONFIGS = {"v3": V3, "v2": V2}
# fp32 on both sides; the codebases differ by summation order only (observed 1e-7..3e-7 without adapters, see
# test_model.py): 1e-4 leaves room for other BLAS builds, while a wrong scale or a swapped factor gives > 1e-2.
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls, machine-independent results


@pytest.fixture
def peft():
    pytest.importorskip("transformers")
    p = pytest.importorskip("peft")
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")
    return p


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def base_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = Transformer(cfg).init_weights(seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


def randomize(model, std=0.05, seed=1):
    """Nonzero B (and A) so that every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(seed=1, n=40):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- PEFT reads r1lab's adapters
@pytest.mark.parametrize("name", ["v3", "v2"])
def test_peft_loads_r1lab_adapters_with_equal_logits(name, tmp_path, peft):
    import transformers

    cfg = CONFIGS[name]
    m = base_model(cfg)
    save_pretrained(m, tmp_path / "base", tokenizer=False)
    mods = apply_lora(m, rank=4, alpha=8, targets=["all"], seed=0)
    kinds = {type(x).__name__ for x in mods.values()}
    assert kinds == {"LoRALinear", "LoRAExperts"}
    randomize(m)
    save_adapter(m, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # every r1lab factor arrived: PEFT holds as many adapter weights as r1lab (none dropped, none extra)
    n_peft = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert n_peft == parameter_counts(m)[0]
    x = tokens()
    assert routing_margin(m, x) > TIE_MARGIN
    with torch.no_grad():
        ours, ref = m(x), pm(x).logits
    err = rel_err(ours, ref)
    assert err < TOL, err
    with torch.no_grad(), adapters_off(m):  # and the adapters matter: the base differs by far more
        assert rel_err(m(x), ref) > 1e-2


# ---------------------------------------------------------------------- r1lab reads PEFT's adapters
@pytest.mark.parametrize("name,modules,params", [
    ("v3", ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
     ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.up_proj.weight",
      "mlp.down_proj.weight"]),
    # PEFT's own v4->v5 conversion: gate/up/down targets become the fused routed experts, gate_up with rank 2r
    # and alpha 2 alpha through rank_pattern / alpha_pattern
    ("v2", ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
])
def test_r1lab_loads_peft_adapters_with_equal_logits(name, modules, params, tmp_path, peft):
    import transformers

    cfg = CONFIGS[name]
    m = base_model(cfg)
    save_pretrained(m, tmp_path / "base", tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    lc = peft.LoraConfig(r=4, lora_alpha=12, target_modules=modules, target_parameters=params,
                         init_lora_weights=False)  # random B as well as A
    pm = peft.get_peft_model(hf, lc).eval()
    pm.save_pretrained(tmp_path / "adapter")
    mods = load_adapter(m, tmp_path / "adapter")
    assert any(isinstance(x, LoRAExperts) for x in mods.values())
    x = tokens(2)
    assert routing_margin(m, x) > TIE_MARGIN
    with torch.no_grad():
        err = rel_err(m(x), pm(x).logits)
    assert err < TOL, err


def test_unsupported_adapter_options_are_named(tmp_path):
    m = base_model(V3)
    apply_lora(m, rank=4, alpha=8, targets=["o"])
    save_adapter(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoRAError, match="use_dora"):
        load_adapter(base_model(V3), tmp_path / "a")
    with pytest.raises(LoRAError, match="unknown target 'qkv'"):
        apply_lora(base_model(V3), rank=4, alpha=8, targets=["qkv"])
    with pytest.raises(LoRAError, match="q_a"):  # V2 here has no q compression
        apply_lora(base_model(V2), rank=4, alpha=8, targets=["q_a"])


# ---------------------------------------------------------------------- merged export
def test_merged_export_equals_base_plus_adapters(tmp_path):
    m = base_model(V3)
    apply_lora(m, rank=4, alpha=8, targets=["all"])
    randomize(m)
    x = tokens(3)
    with torch.no_grad():
        want = m(x)
        save_pretrained(merged_model(m), tmp_path / "merged", tokenizer=False)
        got = load_pretrained(tmp_path / "merged")(x)
        # fp32: merging changes only the rounding of W x + s B (A x) into (W + s B A) x
        assert rel_err(got, want) < 1e-5
        assert rel_err(m(x), want) == 0  # merged_model left the adapted model as it was
        plain = merge_and_unload(m)
        assert not lora_modules(plain)
        assert rel_err(plain(x), want) < 1e-5


# ---------------------------------------------------------------------- gradients and the grouped twin
def test_linear_gradients_match_unfused_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False)
    mod = LoRALinear(base, 4, 2.5)
    with torch.no_grad():
        mod.lora_A.normal_(), mod.lora_B.normal_()
    base.requires_grad_(False)
    x = torch.randn(3, 5, 24, requires_grad=True)
    w = torch.randn(3, 5, 40)
    (mod(x) * w).sum().backward()
    got = [mod.lora_A.grad, mod.lora_B.grad, x.grad]
    A, B = mod.lora_A.detach().clone().requires_grad_(), mod.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (torch.nn.functional.linear(x2, base.weight + 2.5 * B @ A) * w).sum().backward()
    for g, r in zip(got, [A.grad, B.grad, x2.grad]):
        assert rel_err(g, r) < 1e-5  # fp32, summation order only


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_expert_gradients_match_unfused_formula(impl):
    torch.manual_seed(0)
    E, D, inter, r = 4, 16, 8, 4
    ex = Experts(E, D, inter)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.3)
    ex.requires_grad_(False)
    mod = LoRAExperts(ex, {"gate_up": r, "down": r}, {"gate_up": 0.7, "down": 1.3})
    with torch.no_grad():
        for p in mod.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, D, requires_grad=True)
    w = torch.randn(10, D)
    (mod(x, counts, impl) * w).sum().backward()
    names = ["gate_up_A", "gate_up_B", "down_A", "down_B"]
    got = [getattr(mod, n).grad for n in names] + [x.grad]
    ref = {n: getattr(mod, n).detach().clone().requires_grad_() for n in names}
    x2 = x.detach().clone().requires_grad_()
    dgu = torch.bmm(ref["gate_up_B"], ref["gate_up_A"]) * 0.7  # (E, 2I, D)
    wg, wu = ex.gate_proj + dgu[:, :inter], ex.up_proj + dgu[:, inter:]
    wd = ex.down_proj + torch.bmm(ref["down_B"], ref["down_A"]) * 1.3
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x2[start:start + n]
        out.append((torch.nn.functional.silu(xe @ wg[e].T) * (xe @ wu[e].T)) @ wd[e].T)
        start += n
    (torch.cat(out) * w).sum().backward()
    for g, r in zip(got, [ref[n].grad for n in names] + [x2.grad]):
        assert rel_err(g, r) < 1e-5  # fp32, summation order only


def test_adapters_off_is_the_base_and_fresh_adapters_change_nothing():
    m = base_model(V3)
    x = tokens(4)
    with torch.no_grad():
        want = m(x)
        apply_lora(m, rank=4, alpha=8, targets=["all"])
        assert rel_err(m(x), want) < 1e-6  # B = 0 at the start
        randomize(m)
        with adapters_off(m):
            assert rel_err(m(x), want) < 1e-6
        assert rel_err(m(x), want) > 1e-2
    trainable, frozen = parameter_counts(m)
    assert trainable > 0 and frozen == sum(p.numel() for p in base_model(V3).parameters())


# ---------------------------------------------------------------------- training through the one loop
def corpus(path, n_docs=40, vocab=64, seed=0):
    """Pre-tokenized arithmetic runs t, t+d, t+2d, ... mod vocab (as test_train.py's)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n, t, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((4, 30), (0, vocab), (1, 4)))
            f.write(json.dumps({"input_ids": [(t + i * d) % vocab for i in range(n)]}) + "\n")
    return path


CK = "checkpoints/step-00000002"  # the 4-step runs' mid-run checkpoint


def metric(run: Path, key: str) -> torch.Tensor:
    """One column of a run's metrics.jsonl, fp64."""
    return torch.tensor([json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines()],
                        dtype=torch.float64)


def seed_resume(src: Path, dst: Path) -> None:
    """dst starts as src's step-2 checkpoint, with src's log lines marked "copied": a run resumed there keeps
    them, a run that started afresh would rewrite them (so a test can tell it really resumed)."""
    shutil.copytree(src / CK, dst / CK)
    lines = [{**json.loads(x), "copied": True} for x in (src / "metrics.jsonl").read_text().splitlines()]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def lora_args(data, out, steps, **extra):
    args = {"model.config": json.dumps({"vocab_size": 64}), "data.train": str(data), "data.seq-len": "32",
            "train.batch-size": "3", "train.grad-accum": "2", "train.steps": str(steps), "ckpt.every": "3",
            "optim.lr": "1e-2", "optim.warmup-steps": "1", "optim.schedule": "constant", "moe.mtp-weight": "0",
            "log.every": "0", "log.tensorboard": "false", "run.out": str(out), "lora.rank": "8",
            "lora.alpha": "16", "lora.targets": "all", "lora.merge": "true", **extra}
    return ["pretrain"] + [x for k, v in args.items() for x in (f"--{k}", v)]


def test_lora_pretrain_learns_resumes_exactly_and_exports(tmp_path, capsys):
    from r1lab.cli import main as cli_main
    from r1lab.train import state

    data = corpus(tmp_path / "c.jsonl")
    assert cli_main(lora_args(data, tmp_path / "full", 6)) == 0
    first = capsys.readouterr()
    assert "trainable and" in first.out + first.err  # the counts are logged first
    ref = [json.loads(ln)["loss"] for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert ref[-1] < ref[0] - 0.1, ref
    # three steps, then resumed to six: the same losses, bit for bit
    assert cli_main(lora_args(data, tmp_path / "half", 3)) == 0
    assert cli_main(lora_args(data, tmp_path / "half", 6) + ["--resume"]) == 0
    got = [json.loads(ln)["loss"] for ln in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert got == ref
    # checkpoints hold the adapters alone
    sd = state.load_checkpoint(state.find_checkpoint(tmp_path / "full"))["model"]
    assert sd and all(".lora_" in k or k.endswith(("_A", "_B")) for k in sd)
    # the exports: PEFT's adapter folder and the merged model, which equal the trained model
    from r1lab.train.loop import build_model
    from r1lab.train.recipe import load_recipe

    base = build_model(load_recipe(tmp_path / "full" / "recipe.toml", "pretrain"), torch.device("cpu")).eval()
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    merged = load_pretrained(tmp_path / "full" / "final").eval()
    load_adapter(base, tmp_path / "full" / "adapter")
    with torch.no_grad():
        assert rel_err(merged(x), base(x)) < 1e-5  # fp32, merging reorders the sums
        with adapters_off(base):
            assert rel_err(merged(x), base(x)) > 1e-3  # the adapters learnt something


def test_lora_trainer_keeps_the_base_frozen_in_bf16_without_masters(tmp_path):
    from r1lab.train.loop import Trainer, build_model
    from r1lab.train.recipe import load_recipe

    r = load_recipe(None, "sft", {"model.config": json.dumps({"vocab_size": 64}), "lora.rank": "4",
                                  "lora.targets": "attention,experts", "run.out": str(tmp_path / "run")})
    model = build_model(r, torch.device("cpu"))
    t = Trainer(r, model, None, dtype=torch.bfloat16, quiet=True)
    trained = {n for n, _ in t.master.named}
    assert trained and all("lora_" in n or n.endswith(("_A", "_B")) for n in trained)
    assert all(m.dtype == torch.float32 for m in t.master.master)  # fp32 masters and AdamW state for the adapters
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for n, p in model.named_parameters()
               if n not in trained)  # the base: bf16, frozen, no master copy
    n_opt = sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])
    assert n_opt == parameter_counts(model)[0] < parameter_counts(model)[1] / 10
    assert t.bias_gamma == 0.0  # the router bias belongs to the frozen base


# ---------------------------------------------------------------------- GRPO with adapters
def lora_grpo_run(tmp_path, seed: int) -> dict:
    """test_grpo_learning's setup (a tiny model fine-tuned on one-digit addition), then 40 GRPO steps that train
    rank-8 adapters only, with the KL to the base (adapters off) in the loss."""
    from test_grpo_learning import CharTokenizer, sft, tiny_model

    from r1lab.tasks.synthetic import Addition
    from r1lab.train.grpo import GRPORecipe, GRPOTrainer, evaluate

    torch.manual_seed(seed)
    tok = CharTokenizer()
    task = Addition(digits=1, template="{a}+{b}=")
    train, test = task.problems(400, "train", seed=0), task.problems(60, "test", seed=1)
    model = tiny_model(seed)
    sft(model, tok, train, steps=150, seed=seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    r = GRPORecipe.defaults()
    r.run.out, r.run.device, r.run.seed = str(tmp_path / f"run{seed}"), "cpu", seed
    r.grpo.prompt_style, r.grpo.rewards, r.grpo.max_tokens = "raw", ["accuracy=1"], 4
    r.grpo.prompts_per_step, r.grpo.group_size, r.grpo.beta = 16, 8, 0.01
    r.optim.lr, r.train.batch_size, r.train.steps = 3e-3, 128, 40
    r.ckpt.every, r.ckpt.export, r.log.every = 0, False, 0
    r.lora.rank, r.lora.alpha, r.lora.targets = 8, 16.0, ["all"]
    trainer = GRPOTrainer(r, model, tok, [{"prompt": p.question, "answer": p.answer} for p in train], quiet=True)
    assert trainer.ref is None and trainer.engine.model is model  # no second model, rollouts on the adapters

    held_out = ([tok.encode(p.question) for p in test], [p.answer for p in test])
    before = evaluate(trainer.engine, *held_out, samples=4, max_tokens=4)
    before_greedy = evaluate(trainer.engine, *held_out, temperature=0, max_tokens=4)
    trainer.fit()
    after = evaluate(trainer.engine, *held_out, samples=4, max_tokens=4)
    after_greedy = evaluate(trainer.engine, *held_out, temperature=0, max_tokens=4)
    recs = [json.loads(ln) for ln in (tmp_path / f"run{seed}" / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(x["reward"] for x in rs) / 5 for rs in (recs[:5], recs[-5:]))
    print(f"seed {seed}: reward {first:.3f} -> {last:.3f}; held-out {before:.3f} -> {after:.3f}, greedy "
          f"{before_greedy:.3f} -> {after_greedy:.3f}; kl {recs[-1]['kl']:.3f}")
    frozen = {n[: -len(".base.weight")] + ".weight" if n.endswith(".base.weight") else n.replace(".base.", "."): p
              for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(frozen[n], p) for n, p in base.items())  # the base never moved
    return {"reward": last - first, "held_out": after - before, "greedy": after_greedy - before_greedy,
            "kl": recs[-1]["kl"]}


def test_lora_grpo_learns_with_the_base_as_kl_reference(tmp_path):
    """Observed (torch 2.13 CPU, Intel Xeon, seeds 0-2): reward of the first 5 -> last 5 steps +0.09/+0.20/+0.14,
    held-out sampled accuracy +0.31/+0.16/+0.13, greedy +0.18/+0.45/+0.18; means +0.14, +0.20, +0.27 (on ATen's
    portable kernels, ATEN_CPU_CAPABILITY=default: +0.12, +0.19, +0.19). Asserted on the means, with room for
    other CPUs' rounding (test_grpo_learning.py explains why one seed's gain is a draw): +0.05, +0.06, +0.08. About
    60 s."""
    runs = [lora_grpo_run(tmp_path, seed) for seed in range(3)]
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("reward", "held_out", "greedy")}
    print("mean gains", {k: round(v, 3) for k, v in mean.items()})
    assert mean["reward"] >= 0.05 and mean["held_out"] >= 0.06 and mean["greedy"] >= 0.08, mean
    assert all(r["kl"] > 0 for r in runs)  # measured against the base: the adapters moved the policy from it


# ---------------------------------------------------------------------- reward model
def test_lora_reward_model_learns_and_exports_a_merged_folder(tmp_path):
    """`r1lab rm` with adapters: the score head trains in full beside them; the exported reward-model folder is
    base + adapters merged, and scores as the trained model did."""
    from test_reward_model import VOCAB as RM_VOCAB, Tok, write_pairs

    from r1lab.rewards import load_reward_model
    from r1lab.train import state
    from r1lab.train.reward_model import evaluate_pairs, load_rm_recipe, read_pairs, run

    data = write_pairs(tmp_path / "pairs.jsonl", 300, seed=1)
    r = load_rm_recipe(None, {
        "run.out": str(tmp_path / "run"), "run.device": "cpu", "data.train": str(data), "data.seq_len": "40",
        "model.config": json.dumps({"vocab_size": RM_VOCAB, "max_position_embeddings": 64,
                                    "num_nextn_predict_layers": 0}),
        "optim.lr": "5e-3", "optim.warmup_steps": "5", "train.steps": "40", "train.batch_size": "16",
        "rm.eval_fraction": "0.2", "rm.eval_every": "40", "ckpt.every": "40", "log.every": "0",
        "log.tensorboard": "false", "lora.rank": "8", "lora.targets": "all"})
    last = run(r, quiet=True, tokenizer=Tok())
    print("held-out pairwise accuracy", last["eval_accuracy"])
    assert last["eval_accuracy"] >= 0.8  # 60 held-out pairs; chance is 0.5
    sd = state.load_checkpoint(state.find_checkpoint(tmp_path / "run"))["model"]
    assert "score_head.weight" in sd
    assert all(k.startswith("score_head.") or "lora_" in k or k.endswith(("_A", "_B")) for k in sd)
    model, _ = load_reward_model(tmp_path / "run" / "final")
    got = evaluate_pairs(model, read_pairs([data], Tok(), 40))
    assert got["eval_accuracy"] >= 0.8
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------- r1lab generate/serve --lora
def adapted_pair(tmp_path):
    """A base folder, an adapter folder, and the adapted model's greedy continuation of "Hello"."""
    from r1lab.engine import Engine, SamplingParams
    from r1lab.tokenizer import load_tokenizer

    m = base_model(get_preset("tiny").replace(num_nextn_predict_layers=0))
    save_pretrained(m, tmp_path / "base")
    apply_lora(m, rank=4, alpha=8, targets=["all"])
    randomize(m, std=0.2)
    save_adapter(m, tmp_path / "adapter")
    tok = load_tokenizer(tmp_path / "base")
    greedy = SamplingParams(temperature=0, max_tokens=8)
    return m, tok, greedy, Engine(m, tok, max_batch=1).generate([tok.encode("Hello")], greedy)


def test_serve_with_an_adapter_serves_the_merged_model(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from r1lab.serve import app as app_mod

    _, tok, greedy, want = adapted_pair(tmp_path)
    seen = {}
    monkeypatch.setattr(app_mod, "create_app", lambda engine, *a, **k: seen.setdefault("engine", engine))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # no server: the engine it would serve is enough
    app_mod.serve(str(tmp_path / "base"), device="cpu", max_batch=1, lora=str(tmp_path / "adapter"))
    eng = seen["engine"]
    assert not lora_modules(eng.model)  # merged: plain modules at the base's speed
    assert eng.generate([tok.encode("Hello")], greedy)[0].token_ids == want[0].token_ids


def test_generate_with_an_adapter_equals_the_adapted_model(tmp_path, capsys):
    from r1lab.cli import main as cli_main
    from r1lab.engine import Engine

    m, tok, greedy, want = adapted_pair(tmp_path)
    with adapters_off(m):
        plain = Engine(m, tok, max_batch=1).generate([tok.encode("Hello")], greedy)
    assert want[0].token_ids != plain[0].token_ids  # the adapter changes the greedy continuation
    assert want[0].text.strip() and want[0].text not in plain[0].text
    args = ["generate", "--model", str(tmp_path / "base"), "--prompt", "Hello", "--temperature", "0",
            "--max-tokens", "8", "--device", "cpu"]
    assert cli_main(args + ["--lora", str(tmp_path / "adapter")]) == 0
    assert want[0].text in capsys.readouterr().out
    assert cli_main(args + ["--lora", str(tmp_path / "missing")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


# ---------------------------------------------------------------------- torchrun (FSDP2, 2 gloo processes)
def _lora_ranks(rank: int, world: int, d: str) -> None:
    from r1lab.cli import main as cli_main

    d = Path(d)
    assert cli_main(lora_args(d / "c.jsonl", d / "fsdp", 4, **DIST)) == 0
    # 1 rank -> 2: the one-process checkpoint of step 2 continues sharded
    assert cli_main(lora_args(d / "c.jsonl", d / "resumed-on-2", 4, **DIST) + ["--resume"]) == 0
    lora_grpo_trainer(d / "grpo-fsdp").fit()
    lora_rm(d, "rm-fsdp")


def lora_rm(d, out):
    """A short `r1lab rm` run with adapters (its score head trained in full) on test_reward_model's pairs."""
    from test_reward_model import VOCAB as RM_VOCAB, Tok

    from r1lab.train.reward_model import load_rm_recipe, run

    r = load_rm_recipe(None, {
        "run.out": str(d / out), "run.device": "cpu", "data.train": str(d / "pairs.jsonl"), "data.seq_len": "40",
        "model.config": json.dumps({"vocab_size": RM_VOCAB, "max_position_embeddings": 64,
                                    "num_nextn_predict_layers": 0}),
        "optim.lr": "1e-3", "optim.warmup_steps": "1", "train.steps": "3", "train.batch_size": "8",
        "rm.eval_fraction": "0", "ckpt.every": "3", "log.every": "0", "log.tensorboard": "false",
        "lora.rank": "8", "lora.targets": "all"})
    return run(r, quiet=True, tokenizer=Tok())


def lora_grpo_trainer(out):
    """test_grpo's small GRPO run (lr 1e-3, as test_distributed_train's: AdamW amplifies the ranks' different
    rounding step by step, 3e-5 relative in the third step's gradient norm at lr 1e-2) with adapters on
    everything, the KL to the base, and a learning signal."""
    from test_grpo import small_trainer

    return small_trainer(out, **{"lora.rank": 8, "lora.targets": ["all"], "beta": 0.1,
                                 "rewards": ["test_lora:digits=1"], "train.steps": 3})


DIST = {"train.batch-size": "4", "ckpt.every": "2"}


def test_lora_under_fsdp_equals_one_process_and_resumes_on_one(tmp_path):
    """The frozen base and the adapters sharded by FSDP2 over 2 ranks: losses and gradient norms equal the one-
    process run's within test_distributed_train's tolerance (fp32, summation order: rtol 2e-5), the gathered
    adapters equal too, the 2-rank checkpoint of step 2 continues in one process as the one-process run, and the
    one-process checkpoint of step 2 continues on 2 ranks as it; GRPO and rm with adapters on 2 ranks equal one
    process."""
    from test_parallel import run_ranks

    from r1lab.cli import main as cli_main

    before = torch.get_num_threads()
    corpus(tmp_path / "c.jsonl")
    assert cli_main(lora_args(tmp_path / "c.jsonl", tmp_path / "one", 4, **DIST)) == 0
    lora_grpo_trainer(tmp_path / "grpo-one").fit()
    from test_reward_model import write_pairs

    write_pairs(tmp_path / "pairs.jsonl", 64, seed=1)
    lora_rm(tmp_path, "rm-one")
    seed_resume(tmp_path / "one", tmp_path / "resumed-on-2")
    run_ranks(_lora_ranks, 2, str(tmp_path))
    torch.set_num_threads(before)

    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(metric(tmp_path / "fsdp", key), metric(tmp_path / "one", key), rtol=2e-5, atol=0)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # after 4 AdamW steps of lr 1e-2; AdamW's normalisation amplifies the ulps of tiny gradients
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    # lora.merge under torchrun: gathered, merged and written by rank 0
    a, b = (load_pretrained(tmp_path / r / "final").state_dict() for r in ("fsdp", "one"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    # 1 rank -> 2 (above, in _lora_ranks): it continued from step 2, and steps 3 and 4 are the one-process run's
    resumed = [json.loads(x) for x in (tmp_path / "resumed-on-2" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("copied", False) for r in resumed] == [True, True, False, False]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(metric(tmp_path / "resumed-on-2", key), metric(tmp_path / "one", key), rtol=2e-5, atol=0)
    # 2 ranks -> 1: the sharded checkpoint of step 2 (base and adapters) continues in one process
    shutil.copytree(tmp_path / "fsdp" / CK, tmp_path / "resumed" / CK)
    shutil.copy(tmp_path / "fsdp" / "metrics.jsonl", tmp_path / "resumed")
    assert cli_main(lora_args(tmp_path / "c.jsonl", tmp_path / "resumed", 4, **DIST) + ["--resume"]) == 0
    torch.testing.assert_close(metric(tmp_path / "resumed", "loss"), metric(tmp_path / "one", "loss"), rtol=2e-5, atol=0)
    # GRPO: each rank samples its share on a full copy of policy + adapters; the KL to that copy's base. The
    # samples and rewards are the same; loss and KL within test_distributed_train's tolerance.
    one, two = tmp_path / "grpo-one" / "run", tmp_path / "grpo-fsdp" / "run"
    for key in ("reward", "response_len_mean"):
        assert metric(two, key).tolist() == metric(one, key).tolist(), key
    for key in ("loss", "grad_norm", "kl", "entropy"):
        torch.testing.assert_close(metric(two, key), metric(one, key), rtol=2e-5, atol=1e-7)
    assert metric(one, "kl")[1:].min() > 0
    # rm: losses, and the exported (merged) reward models, the one gathered from the 2 ranks' shards
    from r1lab.rewards import load_reward_model

    one, two = tmp_path / "rm-one", tmp_path / "rm-fsdp"
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(metric(two, key), metric(one, key), rtol=2e-5, atol=1e-7)
    (m1, _), (m2, _) = load_reward_model(one / "final"), load_reward_model(two / "final")
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        # (not the head's bias: Bradley-Terry's loss does not depend on it, so its gradient is 0 on one process and
        # rounding noise on two, which AdamW turns into lr-sized steps: 0 against 7e-4 after 3 steps, measured)
        if k != "score_head.bias":
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)  # 3 AdamW steps of rounding, as above


EP = {**DIST, "parallel.ep": "2"}


def _lora_ep_ranks(rank: int, world: int, d: str) -> None:
    from r1lab.cli import main as cli_main

    d = Path(d)
    # each rank keeps its experts' factors: rank r the rows r*E/2 ... of the full (E, ...) tensors
    full = base_model(V3)
    apply_lora(full, rank=4, alpha=8, targets=["experts"])
    model = base_model(V3)
    apply_lora(model, rank=4, alpha=8, targets=["experts"])
    parallel.parallelize(model, ep=2)
    for (path, mod), ref in zip(lora_modules(model).items(), lora_modules(full).values()):
        for n, p in mod.named_parameters():
            want = ref.get_parameter(n).chunk(2)[rank]
            assert p.full_tensor().equal(want) and p.requires_grad == n.endswith(("_A", "_B")), (path, n)
    assert cli_main(lora_args(d / "c.jsonl", d / "ep", 4, **EP)) == 0
    # 2 ranks -> 2: two steps, then resumed to four from the sharded checkpoint of step 2
    assert cli_main(lora_args(d / "c.jsonl", d / "ep-half", 2, **EP)) == 0
    assert cli_main(lora_args(d / "c.jsonl", d / "ep-half", 4, **EP) + ["--resume"]) == 0
    # 1 rank -> 2: the one-process checkpoint of step 2 (full expert factors) continues with each rank's experts
    assert cli_main(lora_args(d / "c.jsonl", d / "ep-resumed-on-2", 4, **EP) + ["--resume"]) == 0


def test_lora_on_routed_experts_under_expert_parallel_equals_one_process(tmp_path):
    """Adapters on everything, routed experts included, with the experts split over 2 EP ranks (each holds the
    factors of its 4 of the 8 experts; FSDP2 shards the rest): losses and gradient norms equal the one-process
    run's (fp32, summation order: rtol 2e-5 as above), the adapter written from the 2 ranks is the one-process
    adapter in PEFT's key names (the factors gathered over the EP group), the merged export too, and resume is
    exact 2 -> 2, 1 -> 2 and 2 -> 1."""
    from safetensors.torch import load_file
    from test_parallel import run_ranks

    from r1lab.cli import main as cli_main

    before = torch.get_num_threads()
    corpus(tmp_path / "c.jsonl")
    assert cli_main(lora_args(tmp_path / "c.jsonl", tmp_path / "one", 4, **DIST)) == 0
    seed_resume(tmp_path / "one", tmp_path / "ep-resumed-on-2")
    run_ranks(_lora_ep_ranks, 2, str(tmp_path))
    torch.set_num_threads(before)

    one = tmp_path / "one"
    for run in ("ep", "ep-half", "ep-resumed-on-2"):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(metric(tmp_path / run, key), metric(one, key), rtol=2e-5, atol=0, msg=run)
    resumed = [json.loads(x) for x in (tmp_path / "ep-resumed-on-2" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("copied", False) for r in resumed] == [True, True, False, False]  # it really resumed
    a = load_file(str(tmp_path / "ep" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(".mlp.experts." in k for k in a)
    for k in a:  # shapes: all 8 experts' factors; values after 4 AdamW steps of lr 1e-2 (see the FSDP test)
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
    assert json.loads((tmp_path / "ep" / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((one / "adapter" / "adapter_config.json").read_text())
    m1, m2 = (load_pretrained(tmp_path / r / "final").state_dict() for r in ("ep", "one"))
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-3, atol=1e-5, msg=k)
    # 2 ranks -> 1: the expert-parallel checkpoint of step 2 continues in one process
    shutil.copytree(tmp_path / "ep" / CK, tmp_path / "ep-resumed-on-1" / CK)
    shutil.copy(tmp_path / "ep" / "metrics.jsonl", tmp_path / "ep-resumed-on-1")
    assert cli_main(lora_args(tmp_path / "c.jsonl", tmp_path / "ep-resumed-on-1", 4, **DIST) + ["--resume"]) == 0
    torch.testing.assert_close(metric(tmp_path / "ep-resumed-on-1", "loss"), metric(one, "loss"), rtol=2e-5, atol=0)


BF16 = {**DIST, "run.dtype": "bfloat16", "optim.lr": "1e-3"}


def _lora_bf16_ranks(rank: int, world: int, d: str) -> None:
    import torch.distributed as dist

    from r1lab.cli import main as cli_main
    from r1lab.train.loop import Trainer, build_model
    from r1lab.train.recipe import load_recipe

    d = Path(d)
    for ep in (1, 2):  # the experts in the blocks' FSDP units, then in units of their own over the EP ranks
        r = load_recipe(None, "sft", {"model.config": json.dumps({"vocab_size": 64}), "lora.rank": "4",
                                      "lora.targets": "all", "parallel.ep": str(ep), "run.out": str(d / f"t{ep}")})
        model = build_model(r, torch.device("cpu"))
        t = Trainer(r, model, None, dtype=torch.bfloat16, quiet=True)
        trained = {n for n, _ in t.master.named}
        assert trained and not t.master.separate  # FSDP's fp32 shards of the adapters are the masters
        for n, p in model.named_parameters():  # the base sharded in bf16, no fp32 copy; the adapters in fp32
            assert p.dtype == (torch.float32 if n in trained else torch.bfloat16), n
            assert p.requires_grad == (n in trained), n
        assert {p.dtype for g in t.optimizer.param_groups for p in g["params"]} == {torch.float32}
        # the plan in the first log line is what the ranks hold: weights as stored, and per trained parameter
        # an fp32 gradient and AdamW's two fp32 moments
        held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        held += sum(p.to_local().numel() for p in t.master.master) * (4 + 8)
        held = torch.tensor(float(held), dtype=torch.float64)
        dist.all_reduce(held)
        assert t.memory_plan * 2**30 * world == pytest.approx(held.item(), rel=1e-12)
    assert cli_main(lora_args(d / "c.jsonl", d / "bf16-fsdp", 4, **BF16)) == 0
    assert cli_main(lora_args(d / "c.jsonl", d / "bf16-ep", 4, **BF16, **{"parallel.ep": "2"})) == 0


def test_lora_under_fsdp_keeps_the_base_in_bf16_and_equals_one_process(tmp_path):
    """run.dtype bfloat16 on 2 FSDP2 ranks (gloo, CPU): the frozen base is sharded in bf16 with no fp32 copy, the
    adapters in fp32 (FSDP2 wants one dtype among a unit's trained parameters only), all-gathered in bf16 for
    compute; the memory plan counts that; and the losses equal the one-process bf16 run's."""
    from test_parallel import run_ranks

    from r1lab.cli import main as cli_main

    before = torch.get_num_threads()
    corpus(tmp_path / "c.jsonl")
    assert cli_main(lora_args(tmp_path / "c.jsonl", tmp_path / "bf16-one", 4, **BF16)) == 0
    run_ranks(_lora_bf16_ranks, 2, str(tmp_path))
    torch.set_num_threads(before)

    # bf16 tolerances (lr 1e-3, as the GRPO test's: AdamW amplifies rounding differences step by step). The ranks
    # round other partial sums to bf16 than one process does (each its half batch's gradient, summed in fp32 by
    # the reduce-scatter, against one bf16 gradient of the whole batch): a gradient element may differ by up
    # to a bf16 ulp of its terms, so the gradient norm by 2^-7 (two ulps; measured 2.6e-3 at step 3). The
    # loss, a mean over ~190 tokens of fp32 log-probs from bf16 logits, averages those roundings: 2^-11
    # (measured 6.9e-5). Not a test of bf16 against fp32 compute: one process in fp32 differs from it in bf16
    # by about as much here (5.8e-5, 1.1e-3); the dtypes above test that.
    rtol = {"loss": 2**-11, "grad_norm": 2**-7}
    for run in ("bf16-fsdp", "bf16-ep"):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(metric(tmp_path / run, key), metric(tmp_path / "bf16-one", key), rtol=rtol[key],
                                       atol=0, msg=f"{run} {key}")


def test_lora_flops_count_the_work_done():
    """MFU with adapters: the frozen base's matmuls cost 4 x N per token (forward, backward to the inputs), the
    adapters 6 x theirs, routed experts' adapters for the num_experts_per_tok experts a token reaches."""
    from r1lab.lora import active_parameters
    from r1lab.train.loop import train_flops_per_token

    cfg = V3
    n = cfg.num_params(active=True, embeddings=False) + cfg.vocab_size * cfg.hidden_size
    full, frozen = train_flops_per_token(cfg, 64), train_flops_per_token(cfg, 64, adapters=0)
    assert full - frozen == 2 * n
    m = base_model(cfg)
    mods = apply_lora(m, rank=4, alpha=8, targets=["all"])
    per_expert = sum(p.numel() for x in mods.values() if isinstance(x, LoRAExperts) for p in x.parameters()
                     if p.requires_grad) // cfg.n_routed_experts
    linear = sum(p.numel() for x in mods.values() if isinstance(x, LoRALinear) for p in x.parameters()
                 if p.requires_grad)
    assert active_parameters(m) == linear + per_expert * cfg.num_experts_per_tok


def digits(prompts, completions, **_):
    """A reward an untrained model earns unevenly (test_distributed_train's): the digits in its completion."""
    return [float(sum(ch.isdigit() for ch in text)) for text in completions]


def test_lora_grpo_resume_continues_exactly(tmp_path):
    """GRPO with adapters and the KL to the base: 2 steps, a checkpoint, 2 more, equal to 4 uninterrupted."""
    from test_grpo import small_trainer

    lo = {"lora.rank": 8, "lora.targets": ["all"], "beta": 0.1, "optim.lr": 1e-2,
          "rewards": [f"{__name__}:digits=1"]}
    full = small_trainer(tmp_path / "full", **lo)
    full.fit()
    part = small_trainer(tmp_path / "part", **lo, **{"train.steps": 2})
    part.fit()
    small_trainer(tmp_path / "part", **lo).fit(resume=tmp_path / "part" / "run")
    keys = ("reward", "loss", "kl", "entropy", "response_len_mean")
    a, b = ([[json.loads(x)[k] for k in keys] for x in (p / "run" / "metrics.jsonl").read_text().splitlines()]
            for p in (tmp_path / "full", tmp_path / "part"))
    assert len(a) == 4 and a == b and all(r[2] > 0 for r in a[1:])  # bit for bit; the KL grows from 0


def test_transformers4_per_expert_adapters_load_exactly(tmp_path):
    """PEFT on transformers 4 writes one adapter per routed expert and projection (experts.E.gate_proj.lora_A);
    r1lab folds gate and up into one adapter of rank 2r on the fused projection. Checked against the base with
    every expert's W + s B A written in by hand."""
    from safetensors.torch import save_file

    cfg = V3
    m, ref = base_model(cfg), base_model(cfg)
    r, alpha, g = 2, 6.0, torch.Generator().manual_seed(5)
    tensors = {}
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            if not hasattr(layer.mlp, "experts"):
                continue
            ex = layer.mlp.experts
            for e in range(cfg.n_routed_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(ex, proj)[e]
                    a = torch.randn(r, w.shape[1], generator=g) * 0.3
                    b = torch.randn(w.shape[0], r, generator=g) * 0.3
                    key = f"base_model.model.model.layers.{i}.mlp.experts.{e}.{proj}"
                    tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
                    w += alpha / r * b @ a
    (tmp_path / "a").mkdir()
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["gate_proj", "up_proj",
                                                                              "down_proj"]}))
    mods = load_adapter(m, tmp_path / "a")
    assert all(isinstance(x, LoRAExperts) for x in mods.values())
    x = tokens(6)
    assert routing_margin(ref, x) > TIE_MARGIN
    with torch.no_grad():
        assert rel_err(m(x), ref(x)) < 1e-5  # fp32: W x + s B (A x) against (W + s B A) x


def test_lora_recipe_errors_are_named_before_the_model_is_built():
    from r1lab.cli import main as cli_main
    from r1lab.train.recipe import load_recipe

    with pytest.raises(ValueError, match="unknown target 'qkv'"):
        load_recipe(None, "sft", {"lora.rank": "8", "lora.targets": "attention,qkv"})
    with pytest.raises(ValueError, match="lora.dropout"):
        load_recipe(None, "sft", {"lora.rank": "8", "lora.dropout": "1.5"})
    assert cli_main(["sft", "--lora.rank", "8", "--lora.targets", "qkv", "--print-recipe"]) == 2
