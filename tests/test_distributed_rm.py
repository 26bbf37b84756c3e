"""The reward-model trainer (`r1lab rm`, r1lab.train.reward_model) under torchrun, on the CPU (gloo, 2 processes),
against one process.

One spawn of 2 ranks (test_parallel's harness: the environment torchrun sets) runs reward-model training
through `r1lab rm`'s own run() on each rank, once with FSDP alone and once with the experts split over the 2
ranks (parallel.ep = 2); the one-process twin runs here. Then the per-step logs and the exported reward models
are compared. (run() rather than the command line: the tests use a character-level tokenizer object.)

Tolerance (fp32 throughout, as in test_distributed_train): the sharded runs sum the same terms in another order
(each rank's matmuls see half of each micro-batch, FSDP reduce-scatters the ranks' partial gradients, the loss
sums are all-reduced, the gradient norm is summed over the ranks' shards), a few ulps (eps 1.2e-7) per sum, which
AdamW then turns into weight differences of up to ~1e-5 (for elements whose gradient is nearly 0). Observed over
the 4 steps: losses within 2.2e-6 relative (the worst is step 3's small loss, 0.033: for well-separated pairs
the loss is ~exp(-margin), so its relative error is the absolute error of margins of a few units), gradient norms
within 1.4e-6, held-out loss and margin within 3e-6. RTOL 2e-5 leaves 9x room or more, yet each mistake that
distribution invites moves the losses of steps 2-4 by 1e-3 to 6e-2 relative: clipping by the norm of the rank's
own gradient shards (grad_norm also off by 30-40%), dividing each rank's loss by the global pair count (grad_norm
halved), leaving out the all-reduce of the expert loads before the router-bias update, or padding each rank's
share to its own longest sequence (the MoE layers route the padding: it counts in the expert loads and the
balance loss). Accuracies and pair counts are counts: exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1lab.train import state
from r1lab.rewards import last_token_scores, load_reward_model, pad_right
from r1lab.train.reward_model import evaluate_pairs, load_rm_recipe, read_pairs, run
from test_parallel import run_ranks
from test_reward_model import VOCAB, Tok, write_pairs

WORLD = 2
STEPS = 4
RTOL = 2e-5  # module docstring
SEQ_LEN = 40


def recipe(d: Path, out: str, **extra):
    # batch 4 pairs = 2 per rank per micro-batch, 2 micro-batches per step; 9 held-out pairs in batches of 4, so
    # the ranks' shares (5 and 4) differ and rank 1 runs one forward pass with nothing of its own to score.
    # Clipping (norms 3-14, clipped to 1), the balance loss and the router-bias update all take part.
    return load_rm_recipe(None, {
        "run.out": str(d / out), "run.device": "cpu", "data.train": str(d / "pairs.jsonl"),
        "data.seq_len": str(SEQ_LEN),
        "model.config": json.dumps({"vocab_size": VOCAB, "max_position_embeddings": 64,
                                    "num_nextn_predict_layers": 0}),
        "optim.lr": "3e-3", "optim.warmup_steps": "2", "train.steps": str(STEPS), "train.batch_size": "4",
        "train.grad_accum": "2", "moe.bias_gamma": "0.01", "moe.balance_alpha": "1e-3", "rm.eval_fraction": "0.2",
        "rm.eval_every": "2", "rm.eval_batch_size": "4", "ckpt.every": "2", "log.every": "0",
        "log.tensorboard": "false", **extra})


def _torchrun_jobs(rank: int, world: int, d: str) -> None:
    """On each of the 2 ranks, one after the other, in one process group."""
    d = Path(d)
    run(recipe(d, "fsdp"), quiet=True, tokenizer=Tok())
    run(recipe(d, "fsdp-ep", **{"parallel.ep": "2"}), quiet=True, tokenizer=Tok())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add start-up cost (the ranks use one each too)
    d = tmp_path_factory.mktemp("dist-rm")
    write_pairs(d / "pairs.jsonl", 45, seed=1)  # 36 training pairs, 9 held out
    run(recipe(d, "one"), quiet=True, tokenizer=Tok())
    run_ranks(_torchrun_jobs, WORLD, str(d))
    torch.set_num_threads(before)
    return d


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def column(run_dir: Path, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in metrics(run_dir) if key in r], dtype=torch.float64)


@pytest.mark.parametrize("name", ["fsdp", "fsdp-ep"])
def test_reward_model_on_two_ranks_matches_one_process(runs, name):
    one, two = runs / "one", runs / name
    assert [r["step"] for r in metrics(two)] == list(range(1, STEPS + 1))  # rank 0 alone wrote the log
    for key in ("loss", "grad_norm", "eval_loss", "eval_margin"):  # eval_*: after steps 2 and 4
        torch.testing.assert_close(column(two, key), column(one, key), rtol=RTOL, atol=0.0,
                                   msg=lambda m, key=key: f"{key}: {m}")
    for key in ("pairs", "accuracy", "eval_accuracy"):
        assert column(two, key).tolist() == column(one, key).tolist(), key
    assert column(one, "pairs").tolist() == [8] * STEPS  # the global count: 2 micro-batches of 4 pairs
    assert len(column(one, "eval_loss")) == 2
    assert column(one, "loss")[-1] < column(one, "loss")[0]  # it trains
    ck = state.find_checkpoint(two)
    assert state.is_sharded(ck) and len(list((ck / state.SHARDED_DIR).glob("*.distcp"))) == WORLD


@pytest.mark.parametrize("name", ["fsdp", "fsdp-ep"])
def test_reward_model_exported_from_two_ranks_scores_like_one_process(runs, name):
    model, info = load_reward_model(runs / name / "final")
    ref, ref_info = load_reward_model(runs / "one" / "final")
    assert info == ref_info and info["max_len"] == SEQ_LEN
    # exactly the weights of the run's last (sharded) checkpoint, gathered: the head and the experts of both
    # EP ranks included (fp32, so the export's cast to the compute dtype changes nothing)
    saved = state.load_sharded_full(state.find_checkpoint(runs / name))["model"]
    sd = model.state_dict()
    assert sd.keys() == saved.keys()
    for k in sd:
        assert torch.equal(sd[k], saved[k]), k
    # It scores every pair like the one-process model, up to a constant: the head's bias adds to both scores of
    # a pair, so its Bradley-Terry gradient is 0 but for rounding, which AdamW normalises into steps of ~lr
    # whose sign no two runs share (observed: the biases differ by 1.2e-3 and 1.4e-3). Centred, the scores (-3.9
    # to 6.7) agree within the summation-order noise of 4 AdamW steps (observed: 8.6e-6 absolute).
    pairs = read_pairs([runs / "pairs.jsonl"], Tok(), SEQ_LEN)
    ids, lens = pad_right(pairs.chosen + pairs.rejected)
    with torch.no_grad():
        got, want = last_token_scores(model, ids, lens), last_token_scores(ref, ids, lens)
    torch.testing.assert_close(got - got.mean(), want - want.mean(), rtol=1e-4, atol=1e-4)
    assert evaluate_pairs(model, pairs)["eval_accuracy"] == evaluate_pairs(ref, pairs)["eval_accuracy"]
