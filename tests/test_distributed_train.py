"""The trainers under torchrun, on the CPU (gloo, 2 processes), against one process.

One spawn of 2 ranks (test_parallel's harness: the environment torchrun sets, RANK / WORLD_SIZE / MASTER_*)
runs every distributed job through the real entry points (`r1lab pretrain` via the command line, GRPO via
its trainer); the one-process twins run here. The tests then compare what the runs wrote: per-step losses and
gradient norms, checkpoints resumed on the other number of ranks (2 -> 1 and 1 -> 2), the exported model.

Tolerance (fp32 throughout): the sharded runs sum the same terms in another order (each rank's matmuls see
half the batch, FSDP reduce-scatters the ranks' partial gradients, the losses are all-reduced), a few ulps
(eps 1.2e-7) per sum. Observed after 4 AdamW steps: losses within 1.4e-7 relative, gradient norms within
1.3e-6. rtol 2e-5 leaves 15-100x room, yet either of two plausible mistakes moves the losses of steps 2-4 by
1e-3 to 2e-3 relative: dividing each rank's loss by its own target count (the mean of the ranks' means), or
clipping by the norm of the rank's own gradient shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from r1lab import load_pretrained
from r1lab.cli import main as cli_main
from r1lab.train import state
from test_grpo import small_trainer
from test_parallel import run_ranks

WORLD = 2
VOCAB = 64
STEPS = 4
RTOL = 2e-5  # module docstring


def corpus(path: Path, n_docs: int = 40) -> Path:
    """Pre-tokenized documents of different lengths (arithmetic runs), packed with document masks."""
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n, t, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((4, 30), (0, VOCAB), (1, 4)))
            f.write(json.dumps({"input_ids": [(t + i * d) % VOCAB for i in range(n)]}) + "\n")
    return path


def pretrain_args(d: Path, out: str, **extra) -> list[str]:
    # Grad accumulation, the balance loss, the bias update and clipping (the norms are ~1.5-4) all take part;
    # batch 4 = 2 rows per rank per micro-batch. The model has an MTP module but no MTP loss unless asked (as in
    # SFT): its weights never get a gradient nor AdamW state, which resuming must cope with.
    args = {"model.config": json.dumps({"vocab_size": VOCAB}), "data.train": str(d / "corpus.jsonl"),
            "data.seq-len": "32", "train.batch-size": "4", "train.grad-accum": "2", "train.steps": str(STEPS),
            "ckpt.every": "2", "optim.lr": "1e-2", "optim.warmup-steps": "2", "moe.bias-gamma": "0.01",
            "moe.mtp-weight": "0", "moe.balance-alpha": "1e-3", "log.every": "0", "log.tensorboard": "false",
            "ckpt.export": "false", "run.out": str(d / out), **extra}
    return ["pretrain"] + [x for k, v in args.items() for x in (f"--{k}", v)]


MTP = {"moe.mtp-weight": "0.3"}


def digits(prompts, completions, **_):
    """A GRPO reward an untrained model earns unevenly (TRL's signature): the digits in its completion. Without
    a learning signal the updates would be AdamW normalising rounding noise, which no two runs share."""
    return [float(sum(ch.isdigit() for ch in text)) for text in completions]


# GRPO: 4 prompts x G=4 per step, two mini-batches of 8 sequences, two passes, a reference refreshed every step
GRPO = {"beta": 0.1, "mini_batch_size": 8, "mu": 2, "ref_sync_every": 1, "rewards": [f"{__name__}:digits=1"],
        "train.steps": 3, "ckpt.every": 3}


def grpo(d: Path, out: str, **over):
    return small_trainer(d / out, **{**GRPO, **over}).fit()


def _torchrun_jobs(rank: int, world: int, d: str) -> None:
    """On each of the 2 ranks, one after the other, in one process group."""
    d = Path(d)
    assert cli_main(pretrain_args(d, "fsdp", **MTP)) == 0
    assert cli_main(pretrain_args(d, "fsdp-ep", **{"parallel.ep": "2", "ckpt.export": "true"})) == 0
    assert cli_main(pretrain_args(d, "resume-1to2", **{"parallel.ep": "2"}) + ["--resume"]) == 0
    if rank == 0:
        interrupted(d / "fsdp-ep", d / "resume-2to2")
    torch.distributed.barrier()
    # sharded -> sharded: DCP reads the shards through r1lab's SafeReader (no pickle of the file's choosing)
    assert cli_main(pretrain_args(d, "resume-2to2", **{"parallel.ep": "2"}) + ["--resume"]) == 0
    grpo(d, "grpo")
    # Dynamic sampling with rank 0's groups all informative and rank 1's all flat (equal rewards): rank 1 keeps
    # none and asks for another round, which both ranks then sample; rank 0 trains, and rank 1, with no rows,
    # must still take part in every forward/backward pass (and all-to-all: experts split over the 2 ranks).
    t = small_trainer(d / "grpo-uneven", **{**GRPO, "dynamic_sampling": True, "max_resample": 1, "train.steps": 1,
                                            "parallel.ep": 2})
    sample = t.rollout

    def uneven(position):
        ro = sample(position)
        ro.rewards = torch.rand(len(ro.rewards)) if rank == 0 else torch.zeros(len(ro.rewards))
        return ro
    t.rollout = uneven
    t.fit()


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def column(run: Path, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in metrics(run)], dtype=torch.float64)


def assert_logs_close(run: Path, reference: Path, keys: tuple[str, ...], atol: float = 0.0) -> None:
    """Per-step values of `keys` in two runs' metrics.jsonl agree within RTOL (module docstring)."""
    for key in keys:
        torch.testing.assert_close(column(run, key), column(reference, key), rtol=RTOL, atol=atol,
                                   msg=lambda m, key=key: f"{key}: {m}")


def interrupted(run: Path, to: Path) -> None:
    """A run folder as if `run` had stopped after step 2: its step-2 checkpoint and its log."""
    ck = "checkpoints/step-00000002"
    shutil.copytree(run / ck, to / ck)
    shutil.copy(run / "metrics.jsonl", to)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add start-up cost (the ranks use one each too)
    d = tmp_path_factory.mktemp("dist")
    corpus(d / "corpus.jsonl")
    assert cli_main(pretrain_args(d, "one", **{"ckpt.export": "true"})) == 0
    assert cli_main(pretrain_args(d, "one-mtp", **MTP)) == 0
    grpo(d, "grpo-one")
    interrupted(d / "one", d / "resume-1to2")  # continued by the 2 ranks
    run_ranks(_torchrun_jobs, WORLD, str(d))
    interrupted(d / "fsdp-ep", d / "resume-2to1")  # continued here
    assert cli_main(pretrain_args(d, "resume-2to1") + ["--resume"]) == 0
    torch.set_num_threads(before)
    return d


@pytest.mark.parametrize("run,reference,extra", [("fsdp", "one-mtp", ("mtp_loss",)), ("fsdp-ep", "one", ())],
                         ids=["fsdp+mtp", "fsdp+ep"])
def test_pretraining_on_two_ranks_matches_one_process(runs, run, reference, extra):
    one, two = runs / reference, runs / run
    assert [r["step"] for r in metrics(two)] == list(range(1, STEPS + 1))  # rank 0 alone wrote the log
    assert_logs_close(two, one, ("loss", "grad_norm", "balance_loss") + extra)
    assert column(one, "loss")[-1] < column(one, "loss")[0]  # it trains
    # the same target tokens and, routed alike, the same integer expert loads (all-reduced over the ranks)
    for key in ("target_tokens", "moe_max_over_mean"):
        assert [r[key] for r in metrics(two)] == [r[key] for r in metrics(one)], key
    ck = state.find_checkpoint(two)
    assert state.is_sharded(ck) and len(list((ck / state.SHARDED_DIR).glob("*.distcp"))) == WORLD


def test_checkpoint_of_two_ranks_resumes_on_one_process(runs):
    resumed, uninterrupted = runs / "resume-2to1", runs / "fsdp-ep"
    assert [r["step"] for r in metrics(resumed)] == list(range(1, STEPS + 1))
    assert not state.is_sharded(state.find_checkpoint(resumed))  # one process writes state.pt again
    # what resuming must carry: weights, AdamW moments and step count, router biases, schedule, data position
    assert_logs_close(resumed, uninterrupted, ("loss", "grad_norm", "balance_loss"))


def test_sharded_checkpoint_resumes_on_two_ranks(runs):
    resumed, uninterrupted = runs / "resume-2to2", runs / "fsdp-ep"
    assert [r["step"] for r in metrics(resumed)] == list(range(1, STEPS + 1))
    ck = state.find_checkpoint(resumed)
    assert state.is_sharded(ck) and (ck / state.MANIFEST_FILE).is_file()
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(
        json.loads((ck / state.MANIFEST_FILE).read_text())["files"])
    assert_logs_close(resumed, uninterrupted, ("loss", "grad_norm", "balance_loss"))


def test_checkpoint_of_one_process_resumes_on_two_ranks(runs):
    resumed, uninterrupted = runs / "resume-1to2", runs / "one"
    assert [r["step"] for r in metrics(resumed)] == list(range(1, STEPS + 1))
    assert state.is_sharded(state.find_checkpoint(resumed))
    assert_logs_close(resumed, uninterrupted, ("loss", "grad_norm", "balance_loss"))


def test_export_from_two_ranks_is_the_full_model(runs):
    exported = load_pretrained(runs / "fsdp-ep" / "final")
    assert exported.config.vocab_size == VOCAB
    # exactly the weights of the run's last (sharded) checkpoint, gathered: experts from both EP ranks included
    saved = state.load_sharded_full(state.find_checkpoint(runs / "fsdp-ep"))["model"]
    sd = exported.state_dict()
    assert sd.keys() == saved.keys()
    for k in sd:
        assert torch.equal(sd[k], saved[k]), k
    # and, within the loss tolerance's summation-order noise, the one-process model (fp32, 4 AdamW steps of
    # lr 1e-2: weight differences observed ~1e-6 absolute)
    one = load_pretrained(runs / "one" / "final").state_dict()
    for k in sd:
        torch.testing.assert_close(sd[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_grpo_on_two_ranks_matches_one_process(runs):
    one, two = runs / "grpo-one" / "run", runs / "grpo" / "run"
    assert [r["step"] for r in metrics(two)] == [1, 2, 3]
    # each rank sampled its share of the prompts with the seeds one process uses: the same samples and rewards
    for key in ("reward", "response_len_mean", "groups_trained", "updates"):
        assert [r[key] for r in metrics(two)] == [r[key] for r in metrics(one)], key
    # The GRPO loss and KL are sums of per-token terms of size ~0.01-1 that nearly cancel (to ~1e-3): their
    # rounding is relative to the terms, ~1e-8 absolute (observed: loss 2.8e-8, KL 2.8e-9), hence atol 1e-7.
    assert_logs_close(two, one, ("loss", "grad_norm", "kl", "entropy", "clip_frac"), atol=1e-7)
    assert len((two / "samples.jsonl").read_text().splitlines()) == 3 * 2  # grpo.log_samples per step, once
    assert state.is_sharded(state.find_checkpoint(two))


def test_grpo_ranks_with_unequal_batches_stay_in_step(runs):
    (rec,) = metrics(runs / "grpo-uneven" / "run")
    # two rounds of 4 prompts; rank 0's first 2 groups trained (its share), in 2 mini-batches x mu = 2 passes
    assert rec["groups_sampled"] == 8 and rec["groups_trained"] == 2 and rec["updates"] == 4
    assert rec["zero_var_groups"] == 0.5 and rec["loss"] == rec["loss"] and rec["grad_norm"] > 0
