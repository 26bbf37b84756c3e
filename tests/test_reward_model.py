"""The reward model (r1lab.train.reward_model) on the CPU: the Bradley-Terry loss and its gradient by hand, a
tiny model learning a synthetic preference (shorter responses) to high held-out pairwise accuracy through
`r1lab rm`'s own run(), scope=answer ignoring the reasoning, the save/load round trip, mixed-reward routing
in a GRPO rollout, and file:line errors for bad rows."""

import json
import math
import random

import pytest
import torch

from r1lab.model.config import get_preset
from r1lab.model.transformer import Transformer
from r1lab.rewards import (RewardModelReward, WeightedReward, accuracy_reward, check_row_rewards, combine,
                           last_token_scores, load_reward_model, load_rewards, pad_right, parse_rm_reward,
                           route_rewards, save_reward_model)
from r1lab.train.loop import NonFiniteLoss
from r1lab.train.reward_model import (RewardTrainer, add_score_head, bradley_terry_loss, evaluate_pairs,
                                      load_rm_recipe, read_pairs, run)

VOCAB = 64


class Tok:
    """Character-level test tokenizer: id 1 = EOS, every other character -> 2 + ord % 62. A toy chat template:
    the user turns' text then ':' (the assistant marker)."""

    eos_id, vocab_size = 1, VOCAB

    def encode(self, text):
        return [2 + ord(c) % (VOCAB - 2) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=False):
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a string 'content'")
        return "".join(m["content"] for m in messages) + (":" if add_generation_prompt else "")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    cfg = get_preset("tiny").replace(vocab_size=VOCAB, max_position_embeddings=64, rope_scaling=None,
                                     num_nextn_predict_layers=0)
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device="cpu").init_weights(seed=seed)
    add_score_head(m, seed)
    return m


# ---------------------------------------------------------------------- the loss
def test_bradley_terry_loss_and_gradient_by_hand():
    rc = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rr = torch.tensor([1.0, 0.0, 3.0], requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, 0, -4
    want = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(4))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)  # fp32: ~1e-7 relative rounding
    loss.backward()
    # d/d rc of -log sigmoid(rc - rr) = -(1 - sigmoid(d)) = -sigmoid(-d); / 3 for the mean
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    g = [-sig(-1) / 3, -sig(0) / 3, -sig(4) / 3]
    assert rc.grad.tolist() == pytest.approx(g, rel=1e-6)
    assert rr.grad.tolist() == pytest.approx([-x for x in g], rel=1e-6)
    # stable for a large negative margin (log(sigmoid) would give inf)
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0])).item() == pytest.approx(100.0)


def test_scores_come_from_the_last_real_token():
    m = tiny().eval()
    ids, lens = pad_right([[5, 6, 7, 1], [5, 6, 1]], pad_id=9)
    with torch.no_grad():
        s = last_token_scores(m, ids, lens)
        alone = last_token_scores(m, *pad_right([[5, 6, 1]]))
        h = m(ids, return_hidden=True)
    assert s[1].item() == pytest.approx(alone[0].item(), abs=1e-5)  # padding after it changes nothing (fp32)
    assert s[0].item() == pytest.approx(m.score_head(h[0, 3]).item(), abs=1e-6)


# ---------------------------------------------------------------------- learning a preference
def write_pairs(path, n, seed):
    rng = random.Random(seed)
    letters = "abcdefghijklmnop"
    word = lambda k: "".join(rng.choice(letters) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            short = rng.randint(1, 6)
            long = short + rng.randint(4, 10)
            f.write(json.dumps({"prompt": "say " + word(rng.randint(1, 4)), "chosen": word(short),
                                "rejected": word(long)}) + "\n")
    return path


def test_tiny_reward_model_learns_to_prefer_shorter_responses(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 400, seed=1)
    r = load_rm_recipe(None, {
        "run.out": str(tmp_path / "run"), "run.device": "cpu", "data.train": str(data), "data.seq_len": "40",
        "model.config": json.dumps({"vocab_size": VOCAB, "max_position_embeddings": 64,
                                    "num_nextn_predict_layers": 0}),
        "optim.lr": "2e-3", "optim.warmup_steps": "5", "train.steps": "60", "train.batch_size": "16",
        "rm.eval_fraction": "0.2", "rm.eval_every": "30", "ckpt.every": "30", "log.every": "0",
        "log.tensorboard": "false"})
    last = run(r, quiet=True, tokenizer=Tok())
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == list(range(1, 61))
    assert "eval_accuracy" in recs[29] and "eval_accuracy" in recs[59]
    print("held-out pairwise accuracy", last["eval_accuracy"], "loss", last["eval_loss"])
    assert last["eval_accuracy"] >= 0.9  # 80 held-out pairs; chance is 0.5
    assert last["eval_loss"] < math.log(2)  # better than the untrained model's ~log 2
    # the exported folder loads back and scores the held-out pairs as the trained model did
    model, info = load_reward_model(tmp_path / "run" / "final")
    assert info["scope"] == "full" and info["max_len"] == 40
    pairs = read_pairs([data], Tok(), 40)
    got = evaluate_pairs(model, pairs)
    assert got["eval_accuracy"] >= 0.9
    # resume: one more step from the last checkpoint continues the run (step 61)
    r2 = load_rm_recipe(tmp_path / "run" / "checkpoints" / "step-00000060" / "recipe.toml",
                        {"train.steps": "61", "ckpt.export": "false"})
    r2.run.out = str(tmp_path / "run")
    run(r2, resume=tmp_path / "run", quiet=True, tokenizer=Tok())
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 61 and len(recs) == 61


# ---------------------------------------------------------------------- scope=answer
def test_scope_answer_ignores_the_reasoning():
    m = tiny()
    answer = RewardModelReward((m, {"scope": "answer", "max_len": 64}), tokenizer=Tok())
    full = RewardModelReward((m, {"scope": "full", "max_len": 64}), tokenizer=Tok())
    prompts = ["q1:<think>"] * 3 + ["q1:"] * 2
    comps = ["abc</think>hi", "zzzzzz</think>hi", "abc</think>bye", "<think>abc</think>hi", "<think>zz</think>hi"]
    a = answer(prompts, comps)
    # The reasoning differs, the answer does not: the same ids, scored in other rows of the batch, where CPU
    # kernels may round differently (seen with MKL's AVX2 kernels: 1.5e-7 relative). fp32: within 1e-5; a
    # reward model that saw the reasoning moves the score by 0.1 or more (the full-scope scores below).
    assert a[1] == pytest.approx(a[0], rel=1e-5) and a[3] == pytest.approx(a[0], rel=1e-5)
    assert a[4] == pytest.approx(a[0], rel=1e-5)
    assert abs(a[2] - a[0]) > 1e-3  # the answer differs
    f = full(prompts, comps)
    assert abs(f[0] - f[1]) > 1e-3 and abs(f[3] - f[4]) > 1e-3  # the full-scope model does see the reasoning
    # the answer model scores exactly prompt-without-<think> + answer + EOS
    with torch.no_grad():
        want = last_token_scores(m, *pad_right([Tok().encode("q1:hi") + [1]])).item()
    assert a[0] == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip_gives_identical_scores(tmp_path):
    m = tiny(seed=3)
    with torch.no_grad():
        m.score_head.bias.fill_(0.25)
    out = save_reward_model(m, tmp_path / "rm", tokenizer=Tok(), scope="answer", max_len=48)
    m2, info = load_reward_model(out)
    assert info["scope"] == "answer" and info["max_len"] == 48
    ids, lens = pad_right([[3, 4, 5, 1], [7, 1]])
    with torch.no_grad():
        assert torch.equal(last_token_scores(m.eval(), ids, lens), last_token_scores(m2, ids, lens))
    # the transformer part is a plain HF folder r1lab loads without the head
    from r1lab import load_pretrained
    load_pretrained(out)
    # rm:PATH spec: weight, scope, name; the model's scope is the default
    w = parse_rm_reward(f"rm:{out}=0.5,name=helpful")
    assert (w.name, w.weight, w.fn._scope) == ("helpful", 0.5, None)
    w.fn.tokenizer = Tok()
    s = w.fn(["q:"], ["abc"])
    assert w.fn.scope == "answer" and len(s) == 1
    w2 = parse_rm_reward(f"rm:{out},scope=full")
    assert (w2.name, w2.weight, w2.fn.scope) == (f"rm:{out}", 1.0, "full")
    with pytest.raises(ValueError, match="not a reward model folder"):
        parse_rm_reward(f"rm:{tmp_path}=1")
    with pytest.raises(ValueError, match="unknown option"):
        parse_rm_reward(f"rm:{out}=1,temperature=2")


# ---------------------------------------------------------------------- mixed prompt sets
def test_mixed_rewards_apply_only_to_their_rows():
    calls = []

    def fake_rm(prompts, completions, **_):
        calls.append(list(completions))
        return [float(len(c)) for c in completions]

    rewards = route_rewards([WeightedReward("accuracy", accuracy_reward, 1.0), WeightedReward("rm:h", fake_rm, 0.5,
                                                                                        reward_model=True)])
    prompts = ["1+1=", "write a poem", "2+2=", "x"]
    comps = ["<answer>2</answer>", "roses", "<answer>5</answer>", "yy"]
    fields = {"answer": ["2", None, "4", "3"], "reward_names": [None, None, None, ["rm:h", "accuracy"]]}
    total, per = combine(rewards, prompts, comps, **fields)
    assert per["accuracy"] == [1.0, None, 0.0, 0.0]
    assert per["rm:h"] == [None, 5.0, None, 2.0]
    assert calls == [["roses", "yy"]]  # the reward model scored only its rows
    assert total == [1.0, 2.5, 0.0, 1.0]
    # rows' reward lists are checked against the run's rewards, naming the row
    with pytest.raises(ValueError, match=r"p.jsonl:3: 'reward_names' names nope"):
        check_row_rewards([{"reward_names": ["nope"], "where": "p.jsonl:3"}], rewards)
    # without reward models, nothing changes: every reward applies where it did
    plain = route_rewards([WeightedReward("accuracy", accuracy_reward, 1.0)])
    assert combine(plain, prompts[:2], comps[:2], answer=["2", None])[1]["accuracy"] == [1.0, None]


def test_mixed_grpo_rollout_routes_rewards(tmp_path):
    """A GRPO rollout on a mixed prompt set: rule-based rows get only accuracy, open-ended rows only the RM."""
    from test_grpo_learning import CharTokenizer, tiny_model
    from r1lab.train.grpo import GRPORecipe, GRPOTrainer

    rm_model = tiny(seed=5)
    enc = CharTokenizer()
    rm_reward = RewardModelReward((rm_model, {"scope": "full", "max_len": 64}), tokenizer=Tok())
    rewards = route_rewards([WeightedReward("accuracy", accuracy_reward, 1.0),
                             WeightedReward("rm", rm_reward, 1.0, reward_model=True)])
    r = GRPORecipe.defaults()
    r.run.out, r.run.device = str(tmp_path / "run"), "cpu"
    r.grpo.prompt_style, r.grpo.max_tokens = "raw", 3
    r.grpo.prompts_per_step, r.grpo.group_size, r.data.shuffle = 4, 2, False
    r.ckpt.export, r.log.every = False, 0
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "3+3="}, {"prompt": "2+2=", "answer": "4"},
            {"prompt": "9=", "answer": "9", "reward_names": ["rm"]}]
    check_row_rewards(rows, rewards)
    torch.manual_seed(0)
    t = GRPOTrainer(r, tiny_model(), enc, rows, quiet=True, rewards=rewards)
    ro = t.rollout(0)
    # rule-based: an answer and no explicit list; the last row names the RM explicitly despite its answer
    rule = [row.get("answer") is not None and "reward_names" not in row for row in ro.rows]
    assert any(rule) and not all(rule) and any("reward_names" in row for row in ro.rows)
    for i, a in enumerate(rule):
        assert (ro.per_reward["accuracy"][i] is None) != a
        assert (ro.per_reward["rm"][i] is None) == a
        assert isinstance(ro.per_reward["rm"][i] if not a else ro.per_reward["accuracy"][i], float)


# ---------------------------------------------------------------------- bad rows
@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "a", "chosen": "b"}', "missing 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "'chosen' must be a string"),
    ('{"chosen": "b", "rejected": "c"}', "expected 'prompt' or 'messages'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], "chosen": "b", '
     '"rejected": "c"}', "must end before the assistant reply"),
    ('not json', "not valid JSON"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, msg):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "cc"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"pairs.jsonl:3: .*{msg}"):
        read_pairs([p], Tok(), 64)


def test_too_long_pairs_are_skipped_or_an_error(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b", "rejected": "'
                 + "x" * 50 + '"}\n')
    assert read_pairs([p], Tok(), 20).stats == {"pairs": 1, "skipped_too_long": 1}
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: .*longer than data.seq_len = 20"):
        read_pairs([p], Tok(), 20, too_long="error")


def test_a_user_reward_named_rmse_is_a_rule(tmp_path, monkeypatch):
    """Reward models are the `rm:` specs, never names that start with "rm": a user's `rmse` reward scores the
    rows with an answer, like every rule, beside a reward model that scores the open-ended ones."""
    (tmp_path / "my_scores.py").write_text(
        "def rmse(prompts, completions, answer=None, **_):\n"
        "    return [None if a is None else -abs(len(c) - int(a)) for c, a in zip(completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = save_reward_model(tiny(seed=3), tmp_path / "rm", tokenizer=Tok(), scope="full", max_len=48)
    loaded = load_rewards(["accuracy", "my_scores:rmse=0.5", f"rm:{out}=2,name=helpful"])
    assert [(r.name, r.reward_model, r.user) for r in loaded] == [("accuracy", False, False), ("rmse", False, True),
                                                                  ("helpful", True, False)]
    loaded[2].fn.tokenizer = Tok()
    prompts, comps = ["1+1=", "write a poem"], ["<answer>2</answer>", "roses"]
    total, per = combine(route_rewards(loaded), prompts, comps, answer=["2", None])
    assert per["accuracy"] == [1.0, None] and per["rmse"] == [-16.0, None]  # len("<answer>2</answer>") = 18
    assert per["helpful"][0] is None and isinstance(per["helpful"][1], float)
    assert total[0] == pytest.approx(1.0 - 0.5 * 16)


# ---------------------------------------------------------------------- non-finite losses
def nan_trainer(tmp_path, policy):
    data = write_pairs(tmp_path / "pairs.jsonl", 64, seed=2)
    r = load_rm_recipe(None, {"run.out": str(tmp_path / "run"), "run.device": "cpu", "data.train": str(data),
                              "data.seq_len": "40", "train.steps": "4", "train.batch_size": "8", "ckpt.every": "1",
                              "ckpt.export": "false", "log.every": "0", "log.tensorboard": "false",
                              "rm.eval_fraction": "0", "moe.bias_gamma": "0.01", "train.on_nonfinite": policy})
    t = RewardTrainer(r, tiny(), read_pairs([data], Tok(), 40), None, tokenizer=Tok(), quiet=True)
    t.model.score_head.register_forward_hook(lambda m, a, out: out * float("nan") if t.step + 1 == 3 else out)
    return t


def test_nan_stops_the_reward_model_run_with_the_step(tmp_path):
    t = nan_trainer(tmp_path, "stop")
    with pytest.raises(NonFiniteLoss, match=r"step 3: non-finite loss nan.*last good checkpoint is .*step-00000002"):
        t.fit()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3] and "nonfinite" in recs[2]


def test_nan_step_of_the_reward_model_is_skipped_when_configured(tmp_path):
    t = nan_trainer(tmp_path, "skip")
    seen = []
    t.save = lambda: seen.append({k: v.clone() for k, v in t.model.state_dict().items()})  # weights per step
    t.fit()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped", 0) for x in recs] == [0, 0, 1, 0]
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # step 3 changed nothing, bias included
    assert not all(torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # step 4 trained again
