"""The training loop on the CPU: the loss falls, exact resume after kill -9 and Ctrl-C, atomic checkpoints,
router-bias balancing, non-finite losses, and the fast paths (activation checkpointing, gradient accumulation,
bf16 master weights) against their plain twins."""

import json
import os
import signal
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from r1lab import Transformer, get_preset, load_pretrained
from r1lab.data import IGNORE, Sequences
from r1lab.parallel import apply_activation_checkpointing
from r1lab.train import state
from r1lab.cli import main as cli_main
from r1lab.train.loop import NonFiniteLoss, Trainer, build_model, train_flops_per_token
from r1lab.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
# One thread, here and in the subprocesses: the exact-resume tests compare runs bitwise, which needs the same
# thread count everywhere, and these tiny matmuls only lose to thread start-up (and to OpenMP spinning when
# the machine is busy: 20x slower on two shared cores).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def corpus(path: Path, n_docs=40, seed=0) -> Path:
    """Pre-tokenized documents with structure to learn: arithmetic runs t, t+d, t+2d, ... mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n, t, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((4, 30), (0, VOCAB), (1, 4)))
            f.write(json.dumps({"input_ids": [(t + i * d) % VOCAB for i in range(n)]}) + "\n")
    return path


def small_args(data: Path, out: Path, steps=24, **extra) -> list[str]:
    args = {"model.config": json.dumps({"vocab_size": VOCAB}), "data.train": str(data), "data.seq-len": "32",
            "train.batch-size": "3", "train.grad-accum": "2", "train.steps": str(steps), "ckpt.every": "3",
            "ckpt.keep": "3", "optim.lr": "1e-2", "optim.warmup-steps": "3", "moe.bias-gamma": "0.01",
            "moe.mtp-weight": "0.3", "moe.balance-alpha": "1e-3", "log.every": "0", "log.tensorboard": "false",
            "ckpt.export": "false", "run.out": str(out), **extra}
    return ["pretrain"] + [x for k, v in args.items() for x in (f"--{k}", v)]


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold each step once, in order"
    return {r["step"]: r["loss"] for r in recs}


def recipe(tmp_path, **over):
    base = {"model.config": json.dumps({"vocab_size": VOCAB}), "data.seq_len": "32", "train.batch_size": "4",
            "train.steps": "4", "optim.lr": "1e-2", "optim.warmup_steps": "1", "log.every": "0",
            "log.tensorboard": "false", "ckpt.export": "false", "moe.mtp_weight": "0", "run.out": str(tmp_path / "run")}
    base.update({k: str(v) for k, v in over.items()})
    return load_recipe(None, "pretrain", base)


def synthetic(n=16, S=32, seed=0) -> Sequences:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, S + 1), generator=g, dtype=torch.int32)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, S // 2] = True
    return Sequences(tokens, starts, torch.ones_like(starts))


def trainer(r, data=None, dtype=torch.float32) -> Trainer:
    torch.manual_seed(r.run.seed)
    return Trainer(r, build_model(r, torch.device("cpu")), data if data is not None else synthetic(), dtype=dtype,
                   quiet=True)


# ---------------------------------------------------------------------- the loss falls (real tokenizer, recipe)
def test_pretrain_recipe_loss_falls_and_exports(tmp_path):
    out = tmp_path / "pt"
    rc = cli_main(["pretrain", "--recipe", str(REPO / "recipes/pretrain-tiny.toml"), "--run.out", str(out),
                   "--train.steps", "12", "--data.seq-len", "32", "--moe.mtp-weight", "0", "--ckpt.every", "6",
                   "--log.every", "0", "--log.tensorboard", "false"])
    assert rc == 0
    ls = losses(out)
    assert len(ls) == 12
    # ln(129280) = 11.77 at the start; a tiny model picks up the corpus' token statistics within a few steps
    assert ls[1] > 11 and sum(ls[i] for i in (10, 11, 12)) / 3 < ls[1] - 1.0, ls  # step to step noise: ~0.1
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "moe_max_over_mean", "target_tokens"):
        assert key in rec
    assert [p.name for p in state.list_checkpoints(out)] == ["step-00000006", "step-00000012"]
    model = load_pretrained(out / "final")  # HF layout, tokenizer included
    assert (out / "final" / "tokenizer.json").is_file() and model.config.vocab_size == 129280
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    x = torch.tensor([[0, 100, 200, 300]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)  # fp32: observed ~1e-6


def test_sft_recipe_runs_from_a_pretrained_folder(tmp_path):
    init = tmp_path / "init"
    from r1lab import Transformer, get_preset, save_pretrained
    save_pretrained(Transformer(get_preset("tiny").replace(num_nextn_predict_layers=0)).init_weights(seed=1), init)
    out = tmp_path / "sft"
    rc = cli_main(["sft", "--recipe", str(REPO / "recipes/sft-tiny.toml"), "--model.init", str(init),
                   "--run.out", str(out), "--train.steps", "2", "--data.seq-len", "128", "--log.tensorboard", "false",
                   "--train.batch-size", "1"])
    assert rc == 0
    ls = losses(out)
    assert len(ls) == 2 and all(v == v for v in ls.values())
    assert load_pretrained(out / "final").config.num_nextn_predict_layers == 0


# ---------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    data = corpus(d / "corpus.jsonl")
    assert cli_main(small_args(data, d / "run")) == 0
    return data, losses(d / "run"), d / "run"


def run_until_checkpoint(args, out: Path, sig: int) -> subprocess.Popen:
    """Start training in a subprocess and send it `sig` once its first checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "-m", "r1lab.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    deadline = time.time() + 120
    while not state.list_checkpoints(out):
        assert proc.poll() is None, f"training ended before its first checkpoint: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted; the test proves nothing"
    proc.send_signal(sig)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=60)
    return proc


def test_kill9_then_resume_gives_identical_losses(reference, tmp_path):
    data, ref, ref_run = reference
    out = tmp_path / "run"
    proc = run_until_checkpoint(small_args(data, out), out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = losses(out)
    assert len(done) < len(ref)
    assert cli_main(small_args(data, out) + ["--resume"]) == 0
    got = losses(out)
    assert got == ref  # bitwise: the same float for every step
    a = state.load_checkpoint(state.find_checkpoint(out))["model"]
    b = state.load_checkpoint(state.find_checkpoint(ref_run))["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)  # weights and router biases too


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(reference, tmp_path):
    data, ref, _ = reference
    out = tmp_path / "run"
    proc = run_until_checkpoint(small_args(data, out), out, signal.SIGINT)
    assert proc.returncode == 130, proc.stderr_text
    assert "interrupted" in proc.stderr_text and "--resume" in proc.stderr_text
    last = max(losses(out))
    assert state.find_checkpoint(out).name == f"step-{last:08d}"  # saved at the step it stopped after
    assert cli_main(small_args(data, out) + ["--resume", str(out)]) == 0
    assert losses(out) == ref


CRASH_SCRIPT = """
import os, signal, sys, torch
from r1lab.cli import main
real_save = torch.save
def dying_save(obj, f, *a, **k):
    if "step-00000006" in str(f):  # the second checkpoint: write part of it, then die like kill -9
        f.write(b"partial")  # state.pt is written through an open file
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = dying_save
sys.exit(main(sys.argv[1:]))
"""


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    data, ref, _ = reference
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *small_args(data, out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = list((out / "checkpoints").glob(".step-00000006.tmp-*"))
    assert partial and (partial[0] / "state.pt").read_bytes() == b"partial"
    assert [p.name for p in state.list_checkpoints(out)] == ["step-00000003"]
    st = state.load_checkpoint(state.find_checkpoint(out))
    assert st["step"] == 3 and st["data_position"] == 6
    assert cli_main(small_args(data, out) + ["--resume"]) == 0  # continues from step 3
    assert losses(out) == ref
    assert not list((out / "checkpoints").glob(".step-*"))  # the partial write was cleaned up
    assert len(state.list_checkpoints(out)) == 3  # ckpt.keep


def test_resume_from_an_older_checkpoint_replaces_the_newer_ones(reference, tmp_path):
    import shutil
    data, ref, ref_run = reference
    out = tmp_path / "run"
    shutil.copytree(ref_run, out)
    names = [p.name for p in state.list_checkpoints(out)]
    assert names == ["step-00000018", "step-00000021", "step-00000024"]
    (out / "checkpoints" / names[2] / "stale").write_text("from the first trajectory")
    assert cli_main(["pretrain", "--resume", str(out / "checkpoints" / names[0])]) == 0
    assert losses(out) == ref and [p.name for p in state.list_checkpoints(out)] == names
    assert not (out / "checkpoints" / names[2] / "stale").exists()  # rewritten by the resumed run
    assert not (ref_run / "checkpoints" / names[2] / "stale").exists()  # and the run wrote into its own folder


def test_a_fresh_run_refuses_a_folder_with_checkpoints(reference, capsys):
    data, _, ref_run = reference
    assert cli_main(small_args(data, ref_run)) == 2
    assert "pass --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------- MoE balancing
def moe_ratio(rec):
    return max(x for x in rec["moe_max_over_mean"] if x is not None)


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_bias_update_moves_load_toward_balance(tmp_path, gamma):
    r = recipe(tmp_path, **{"optim.lr": 0, "optim.warmup_steps": 0, "moe.bias_gamma": gamma})
    t = trainer(r)
    with torch.no_grad():
        for m in t.model.moe_layers():
            m.gate.weight.mul_(10)  # scores spread like a trained router's (std ~0.3 rather than ~0.04)
            m.gate.e_score_correction_bias[:2] = 1.0  # skewed start: experts 0 and 1 win every token
    ratios, biases = [], []
    for _ in range(30):
        ratios.append(moe_ratio(t.train_step(t.next_batches())))
        biases.append(t.model.moe_layers()[0].gate.e_score_correction_bias.clone())
    assert ratios[0] == pytest.approx(4.0)  # top-2 of 8 experts all on the same two: max/mean = 8/2
    if gamma == 0:
        assert ratios[-1] == pytest.approx(4.0)
    else:
        # 128 tokens x top-2 per step: even uniform random routing shows max/mean ~1.4 from counting noise
        assert sum(ratios[-10:]) / 10 < 2.0, ratios
        # once per optimizer step: each bias moves by exactly gamma (or 0) per step
        step = (biases[1] - biases[0]).abs()
        assert torch.all(((step - gamma).abs() < 1e-6) | (step == 0))


def test_bias_update_happens_once_per_step_with_grad_accumulation(tmp_path):
    r = recipe(tmp_path, **{"train.grad_accum": 3, "moe.bias_gamma": 0.01, "optim.lr": 0, "optim.warmup_steps": 0})
    t = trainer(r)
    b0 = torch.stack([m.gate.e_score_correction_bias.clone() for m in t.model.moe_layers()])
    t.train_step(t.next_batches())
    delta = (torch.stack([m.gate.e_score_correction_bias for m in t.model.moe_layers()]) - b0).abs()
    assert delta.max() == pytest.approx(0.01) and delta.max() < 0.015
    assert t.micro == 3 and t.model.expert_load().sum() == 0  # counters restart after the update


# ---------------------------------------------------------------------- non-finite losses
def poison(t: Trainer, when):
    """Make the logits NaN whenever `when()` is true (through the final norm: the trainer applies the head to its
    output in chunks, not by calling lm_head)."""
    return t.model.model.norm.register_forward_hook(lambda module, args, out: out * float("nan") if when() else out)


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    r = recipe(tmp_path, **{"train.steps": 6, "ckpt.every": 2})
    t = trainer(r)
    poison(t, lambda: t.step + 1 == 3)  # fit counts t.step
    with pytest.raises(NonFiniteLoss, match=r"step 3: non-finite loss nan.*last good checkpoint is .*step-00000002"):
        t.fit()
    assert [p.name for p in state.list_checkpoints(r.run.out)] == ["step-00000002"]
    st = state.load_checkpoint(state.find_checkpoint(r.run.out))
    assert st["step"] == 2 and all(torch.isfinite(v).all() for v in st["model"].values())


def test_nan_step_is_skipped_when_configured(tmp_path):
    r = recipe(tmp_path, **{"train.steps": 4, "train.on_nonfinite": "skip", "moe.bias_gamma": 0.01})
    t = trainer(r)
    bad = [False]
    poison(t, lambda: bad[0])
    recs = [t.train_step(t.next_batches())]
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    bad[0] = True
    recs.append(t.train_step(t.next_batches()))
    bad[0] = False
    assert recs[1].get("skipped") and not recs[0].get("skipped")
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())  # no update, no bias change
    recs.append(t.train_step(t.next_batches()))
    assert recs[2]["loss"] == recs[2]["loss"] and not recs[2].get("skipped")


# ---------------------------------------------------------------------- fast paths vs plain twins
def run_steps(t: Trainer, n=3):
    return [t.train_step(t.next_batches())["loss"] for _ in range(n)]


def test_activation_checkpointing_equals_plain_backward(tmp_path):
    r = recipe(tmp_path, **{"moe.mtp_weight": 0.3, "moe.balance_alpha": 0.01})
    plain, ckpt = trainer(r), trainer(recipe(tmp_path, **{"moe.mtp_weight": 0.3, "moe.balance_alpha": 0.01,
                                                          "train.activation_checkpointing": "true"}))
    b = plain.next_batches()
    ckpt.next_batches()
    for t in (plain, ckpt):  # the backward's recomputation must not count routed tokens again
        t.model.train()
        t.model(b[0].input_ids, b[0].positions, attn_mask=b[0].attn_mask).sum().backward()
        assert t.model.expert_load()[:2].sum(1).tolist() == [b[0].input_ids.numel() * 2] * 2  # tokens x top-2
        t.model.update_router_bias(0)
        t.master.zero_grad()
    rp, rc = plain.train_step(b), ckpt.train_step(b)
    # recomputation reruns the same fp32 ops: observed bitwise equal; loads are counted once, not twice
    assert rp["moe_max_over_mean"] == rc["moe_max_over_mean"]
    assert rp["loss"] == pytest.approx(rc["loss"], abs=1e-6)
    assert rp["mtp_loss"] == pytest.approx(rc["mtp_loss"], abs=1e-6)
    assert rp["balance_loss"] == pytest.approx(rc["balance_loss"], rel=1e-6)
    for (n, p), q in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert rp["grad_norm"] == pytest.approx(rc["grad_norm"], rel=1e-5)


def test_a_deep_copy_of_a_checkpointed_model_runs_its_own_blocks():
    """Activation checkpointing replaces each block's forward; a deep copy of the model made after that (GRPO's
    reference, grpo.async's rollout copy) must run its own weights, with and without gradients, and leave the
    original alone."""
    model = Transformer(get_preset("tiny").replace(vocab_size=64)).init_weights(seed=0)
    apply_activation_checkpointing(model)
    copy = deepcopy(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = copy(ids)
        for p in model.parameters():
            p.add_(0.1)
        assert torch.equal(copy(ids), before)
    copy(ids).sum().backward()  # through the checkpoint: the gradients are the copy's
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in copy.model.layers.parameters() if p.requires_grad)


def test_compiled_training_equals_eager(tmp_path):
    """train.compile: the compiled model and compiled cross-entropy (main and MTP) give the eager losses and
    gradient norms, fp32 on CPU."""
    over = {"moe.mtp_weight": 0.3, "moe.balance_alpha": 0.01}
    eager, comp = trainer(recipe(tmp_path, **over)), trainer(recipe(tmp_path, **over, **{"train.compile": "true"}))
    for _ in range(2):
        b = eager.next_batches()
        comp.next_batches()
        re, rc = eager.train_step(b), comp.train_step(b)
        # the same fp32 math, fused: observed relative differences ~1e-7
        assert rc["loss"] == pytest.approx(re["loss"], rel=1e-5)
        assert rc["mtp_loss"] == pytest.approx(re["mtp_loss"], rel=1e-5)
        assert rc["grad_norm"] == pytest.approx(re["grad_norm"], rel=1e-4)
    # (weights are not compared: AdamW turns rounding-level differences of near-zero gradients into lr-sized
    # steps; the second step's loss above is taken after the first update and agrees)


def test_clip_and_step_equals_torch_clipping_and_adamw(tmp_path):
    """The clip factor and skip flag handed to the fused AdamW kernel give what torch's clip_grad_norm_ and a
    plain (single-tensor) AdamW give; a non-finite gradient leaves weights, moments and step counts alone."""
    t = trainer(recipe(tmp_path, **{"optim.grad_clip": 0.05}))
    assert not t.fused_clip  # the GPU path; torch's fused AdamW runs the same kernel interface on the CPU
    t.fused_clip = True
    g = torch.Generator().manual_seed(0)
    groups = t.optimizer.param_groups
    ref_groups = [{**{k: v for k, v in grp.items() if k != "params"},
                   "params": [p.detach().clone().requires_grad_(True) for p in grp["params"]]} for grp in groups]
    for k, v in (("fused", False), ("foreach", False)):
        for grp in ref_groups:
            grp[k] = v
    ref_opt = torch.optim.AdamW(ref_groups)
    for step in range(2):
        for grp, rgrp in zip(groups, ref_groups):
            for p, q in zip(grp["params"], rgrp["params"]):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
        norm, stepped = t._clip_and_step()
        ref_norm = torch.nn.utils.clip_grad_norm_([q for grp in ref_groups for q in grp["params"]], 0.05)
        ref_opt.step()
        assert stepped and norm.item() == pytest.approx(ref_norm.item(), rel=1e-6) and norm.item() > 1  # clipped
        for grp, rgrp in zip(groups, ref_groups):
            for p, q in zip(grp["params"], rgrp["params"]):
                assert torch.allclose(p, q, atol=1e-6)
    before = [p.detach().clone() for grp in groups for p in grp["params"]]
    moments = [t.optimizer.state[p]["exp_avg"].clone() for grp in groups for p in grp["params"]]
    groups[0]["params"][0].grad[0, 0] = float("nan")
    norm, _ = t._clip_and_step()
    assert not torch.isfinite(norm)
    params = [p for grp in groups for p in grp["params"]]
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(t.optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments))
    assert all(t.optimizer.state[p]["step"].item() == 2 for p in params)


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    big = trainer(recipe(tmp_path, **{"train.batch_size": 4, "moe.bias_gamma": 0}))
    acc = trainer(recipe(tmp_path, **{"train.batch_size": 2, "train.grad_accum": 2, "moe.bias_gamma": 0,
                                      "data.shuffle": "false"}))
    big.order.shuffle = False
    grads = []
    for t in (big, acc):  # the gradients AdamW receives (its normalisation would amplify rounding in ~0 entries)
        t.optimizer.register_step_pre_hook(lambda opt, a, k: grads.append(
            [p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
    rb, ra = big.train_step(big.next_batches()), acc.train_step(acc.next_batches())
    # fp32, the same sums in another order: observed ~1e-7 relative
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
    assert len(grads[0]) == len(grads[1]) > 10
    for g, h in zip(*grads):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-8)


def test_bf16_weights_with_fp32_master_weights(tmp_path):
    r = recipe(tmp_path, **{"run.dtype": "bfloat16", "optim.lr": 1e-5, "optim.warmup_steps": 0, "moe.bias_gamma": 0.01})
    t = trainer(r, dtype=torch.bfloat16)
    assert t.model.lm_head.weight.dtype == torch.bfloat16 and t.master.master[0].dtype == torch.float32
    assert t.model.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32  # stays fp32
    start = [m.clone() for m in t.master.master]
    run_steps(t, 2)
    moved = [(m - s).abs().max().item() for m, s in zip(t.master.master, start)]
    # AdamW moves each weight by ~lr = 1e-5 per step: below bf16's resolution near 0.02 (~1e-4), so only the
    # fp32 master copy can hold it, and the model's bf16 weights are that master rounded
    assert max(moved) > 1e-5
    for p, m in zip(t.master.params, t.master.master):
        assert torch.equal(p, m.to(torch.bfloat16))
    sd = t.state_dict()["model"]
    assert sd["lm_head.weight"].dtype == torch.float32 and torch.equal(sd["lm_head.weight"], t.master.master[
        [n for n, _ in t.master.named].index("lm_head.weight")])


def test_mtp_loss_is_the_depth1_cross_entropy(tmp_path):
    r = recipe(tmp_path, **{"moe.mtp_weight": 0.5})
    t = trainer(r)
    (b,) = t.next_batches()
    with torch.no_grad():
        t.model.train()
        logits, (mtp,) = t.model(b.input_ids, b.positions, attn_mask=b.attn_mask, return_mtp=True)
        lab = b.mtp_labels(1)[0]
        want = torch.nn.functional.cross_entropy(mtp.flatten(0, 1), lab.flatten(), ignore_index=IGNORE)
        for i in range(lab.shape[1] - 1):  # depth 1 at position i predicts token i+2 of the same document
            ok = b.labels[:, i] != IGNORE
            assert torch.equal(lab[:, i][ok], b.labels[:, i + 1][ok]) and (lab[:, i][~ok] == IGNORE).all()
        t.model.update_router_bias(0)
    rec = t.train_step([b])
    assert rec["mtp_loss"] == pytest.approx(want.item(), rel=1e-5)
    assert t.master.master[[n for n, _ in t.master.named].index("mtp.0.eh_proj.weight")].grad is None  # zeroed
    no_mtp = trainer(recipe(tmp_path))
    no_mtp.train_step(no_mtp.next_batches())
    assert "mtp_loss" not in no_mtp.train_step(no_mtp.next_batches())


def test_flops_formula_by_hand():
    from r1lab import get_preset
    cfg = get_preset("bench-moe-1b")
    D, V, L, H = 1024, 129280, 12, 16
    attn = (D * 384 + 384 + 384 * H * 96) + (D * (256 + 32) + 256) + 256 * H * (64 + 64) + H * 64 * D
    dense = attn + 2 * D + 3 * D * 2816
    moe = attn + 2 * D + 64 * D + 64 + (2 + 6) * 3 * D * 256  # router + 2 shared + 6 routed experts
    n = dense + 11 * moe + D + V * D  # + final norm + output head; the embedding lookup is not a matmul
    assert train_flops_per_token(cfg, 2048) == 6 * n + 3 * L * H * (96 + 64) * 2048
