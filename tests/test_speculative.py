"""Speculative decoding with the MTP module against its slow twin, the plain engine (itself checked against full
forward passes in test_engine.py): greedy output identical, sampled tokens distributed as the target model's
(chi-square), log-probs of the target model; and the draft's acceptance on a model really trained with MTP."""

import json
import math

import pytest
import torch

from r1lab import Engine, SamplingParams, Transformer, get_preset, load_tokenizer
from r1lab.data import Sequences
from r1lab.engine.sampling import speculative_sample
from r1lab.train.loop import Trainer, build_model
from r1lab.train.recipe import load_recipe

V = 64  # the trained model's vocabulary: arithmetic runs over tokens 0..61; 63 is its end-of-sequence token
S = 32


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- a model trained with the MTP loss
def arithmetic_runs(n, seed, length=(8, 30)):
    """Documents t, t+d, t+2d, ... mod 62 with d in 1..4: after two tokens the rest is determined."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        L, t, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in (length, (0, V - 2), (1, 5)))
        docs.append([(t + i * d) % (V - 2) for i in range(L)])
    return docs


def pack(docs, targets=None) -> Sequences:
    """Documents concatenated and cut into rows of S+1 tokens; `targets` per document (default: all tokens)."""
    toks, starts, tgt = [], [], []
    for i, d in enumerate(docs):
        toks += d
        starts += [True] + [False] * (len(d) - 1)
        tgt += targets[i] if targets is not None else [True] * len(d)
    n = len(toks) // (S + 1)
    cut = [torch.tensor(x[: n * (S + 1)]).view(n, S + 1) for x in (toks, starts, tgt)]
    cut[1][:, 0] = True
    return Sequences(cut[0].to(torch.int32), cut[1], cut[2])


def train(data: Sequences, steps: int, mtp_weight: float, kind="pretrain", model=None, lr=3e-3, seed=0, mtp_depth=1):
    r = load_recipe(None, kind, {
        "model.config": json.dumps({"vocab_size": V, "eos_token_id": V - 1, "num_nextn_predict_layers": mtp_depth}),
        "data.seq_len": str(S),
        "train.batch_size": "16", "train.steps": str(steps), "optim.lr": str(lr), "optim.warmup_steps": "10",
        "log.every": "0", "log.tensorboard": "false", "ckpt.export": "false", "moe.mtp_weight": str(mtp_weight),
        "run.out": "unused"})
    torch.manual_seed(seed)
    t = Trainer(r, model if model is not None else build_model(r, torch.device("cpu")), data, kind=kind,
                quiet=True)
    for _ in range(steps):
        rec = t.train_step(t.next_batches())
    return t.model.eval(), rec


@pytest.fixture(scope="module")
def trained():
    """~10 s on one core: 120 steps of pretraining with moe.mtp_weight 0.3 (final loss ~0.2, MTP loss ~0.1;
    the floor is the unpredictable first two tokens of each document)."""
    model, rec = train(pack(arithmetic_runs(2000, seed=0)), steps=120, mtp_weight=0.3)
    assert rec["mtp_loss"] < 0.5, rec
    return model


def random_tiny(vocab=V, seed=0, scale=30.0):
    torch.manual_seed(seed)
    m = Transformer(get_preset("tiny").replace(vocab_size=vocab, eos_token_id=vocab - 1)).init_weights(seed=seed)
    with torch.no_grad():  # a peakier output distribution than N(0, 0.02) gives, so greedy paths are stable
        m.lm_head.weight.mul_(scale)
    return m.eval()


def mixed_prompts(n, seed):
    """Half arithmetic runs (the draft is right), half random tokens (it often is not); ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    runs = arithmetic_runs(n, seed + 1, length=(2, 9))
    return [r if i % 2 == 0 else torch.randint(0, V - 2, (len(r),), generator=g).tolist() for i, r in enumerate(runs)]


def run(engine, requests, abort_at=None):
    """Requests [(prompt, params)] through add_request/step; the completions and each sequence's streamed tokens."""
    seqs = [s for i, (p, sp) in enumerate(requests) for s in engine.add_request(p, sp, prompt_index=i)]
    streamed, steps = {id(s): [] for s in seqs}, 0
    while engine.has_work():
        for s, t in engine.step():
            streamed[id(s)].append(t)
        steps += 1
        if abort_at is not None and steps == abort_at[0]:
            engine.abort([seqs[abort_at[1]]])
    assert engine.slots == [None] * engine.max_batch
    return [engine.completion(s) for s in seqs], [streamed[id(s)] for s in seqs]


# ---------------------------------------------------------------------- greedy: identical to speculate=0
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_identical_to_plain_decoding(trained, k, overlap):
    """Ragged prompts, fewer slots than sequences (continuous batching with per-slot accepted lengths), a stop
    token met inside an accepted run, max_tokens not a multiple of k+1, n samples: the same tokens, finish
    reasons and streamed tokens as the plain engine, log-probs within fp32 rounding; a sequence aborted mid-run
    keeps a prefix of its tokens."""
    ps = mixed_prompts(10, seed=3)
    free = Engine(trained, max_batch=1, max_seq_len=64).generate(
        ps[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    requests = [(p, SamplingParams(temperature=0, max_tokens=5 + i % 7, n=1 + (i == 4), logprobs=True,
                                   stop_token_ids=[free[3]] if i == 0 else None, ignore_eos=i % 3 != 0))
                for i, p in enumerate(ps)]
    plain, plain_stream = run(Engine(trained, max_batch=3, max_seq_len=64, overlap=overlap), requests)
    eng = Engine(trained, max_batch=3, max_seq_len=64, overlap=overlap, speculate=k)
    spec, spec_stream = run(eng, requests, abort_at=(2, 1))  # sequence 1 is running by then
    assert spec[1].finish_reason == "abort" and spec[1].token_ids == plain[1].token_ids[: len(spec[1].token_ids)]
    assert spec_stream[1] == spec[1].token_ids
    for i, (a, b) in enumerate(zip(spec, plain)):
        assert len(a.token_ids) <= requests[a.prompt_index][1].max_tokens
        if i == 1:
            continue
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        assert spec_stream[i] == plain_stream[i]
        # fp32; the verify forward (k+1 tokens a row) sums in another order than one token a row: observed ~2e-6
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert plain[0].finish_reason == "stop" and plain[0].token_ids[-1] == free[3]
    st = eng.stats
    # both outcomes of verification happened: accepted drafts (several tokens in one step) and rejected ones
    assert 0 < st["accepted"] < st["drafted"] == k * st["sequence_steps"], st
    assert 1 < st["tokens_per_step"] <= k + 1


def oracle_draft(engine, wrong_every=3):
    """A draft for tests: the target's own greedy continuation (full forward passes over each running sequence,
    read from the host), with every `wrong_every`-th position made wrong, so acceptance is high but partial."""
    V_, k = engine.model.config.vocab_size, engine.speculate

    def draft(mode, table):
        out = torch.zeros(engine.max_batch, k, dtype=torch.long)
        for slot, s in enumerate(engine.slots):
            if s is None:
                continue
            ids = list(s.prompt) + s.tokens
            for j in range(k):
                with torch.no_grad():
                    t = int(engine.model(torch.tensor([ids]))[0, -1].argmax())
                if (len(ids) + 1) % wrong_every == 0:
                    t = (t + 1) % V_
                ids.append(t)
                out[slot, j] = t
        return out, None

    return draft


@pytest.mark.parametrize("k", [2, 3])
def test_stop_strings_and_max_tokens_inside_accepted_runs(k):
    """With the real tokenizer and a mostly-right draft, a stop string or max_tokens falls inside a step's
    accepted run: the text is cut as without speculation and no token past the stop is kept."""
    tok = load_tokenizer()
    m = random_tiny(vocab=tok.vocab_size, seed=1)
    plain = Engine(m, tok, max_batch=2, max_seq_len=64)
    free = plain.generate(["Hello", "The sky"], SamplingParams(temperature=0, max_tokens=13, ignore_eos=True))
    for f in free:
        stop = f.text[len(f.text) // 2: len(f.text) // 2 + 2]
        assert stop
        params = SamplingParams(temperature=0, max_tokens=13, stop=stop, ignore_eos=True)
        prompt = ["Hello", "The sky"][f.prompt_index]
        ref = plain.generate([prompt], params)[0]
        eng = Engine(m, tok, max_batch=2, max_seq_len=64, speculate=k)
        eng._draft = oracle_draft(eng)
        got = eng.generate([prompt], params)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, "stop")
        assert eng.stats["accepted"] > 0
        eng = Engine(m, tok, max_batch=2, max_seq_len=64, speculate=k)
        eng._draft = oracle_draft(eng, wrong_every=1000)  # always right: k+1 tokens a step
        got = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=13, ignore_eos=True))[0]
        assert got.token_ids == f.token_ids and got.finish_reason == "length"
        assert eng.stats["tokens_per_step"] == pytest.approx((13 - 1) / math.ceil((13 - 1) / (k + 1)))


# ---------------------------------------------------------------------- sampling: the target distribution
def exact_joint(model, prompt, temperature, top_k, n_tokens):
    """The target model's probability of every continuation of `n_tokens` tokens (V**n_tokens, by full
    forward passes), sampled at `temperature` with the top_k filter."""
    seqs = torch.tensor([prompt])
    logp = torch.zeros(1)
    for _ in range(n_tokens):
        with torch.no_grad():
            logits = model(seqs)[:, -1].float() / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        lp = torch.log_softmax(logits, -1)  # (N, V)
        logp = (logp[:, None] + lp).flatten()
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(len(seqs))[:, None]], 1)
    return logp.exp()


def chi_square_pvalue_ok(counts, probs, alpha=1e-3):
    """Pearson's chi-square of observed counts against probabilities, cells with expected < 5 pooled; True if
    the p-value is above alpha (Wilson-Hilferty's normal approximation of the chi-square quantile)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp > 0
    assert (obs[~keep] == 0).all(), "a continuation of probability 0 was sampled"
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    df = int(keep.sum()) - 1
    z = 3.0902  # upper 1e-3 quantile of N(0, 1)
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < limit, stat, limit, df


@pytest.mark.parametrize("draft,k,temperature,top_k", [
    ("trained", 1, 1.5, 0), ("trained", 2, 1.0, 3), ("bad", 1, 1.5, 0), ("bad", 2, 1.5, 0)])
def test_samples_follow_the_target_distribution(trained, draft, k, temperature, top_k):
    """8,192 sampled continuations of 3 tokens (the 2nd and 3rd decided by verification: accepted draft,
    residual after a rejection or bonus token) against the exact joint probabilities of the target model.
    "bad": the MTP head's norm negated, so the draft favours what the target finds unlikely (most drafts are
    rejected and tokens come from the residual max(0, p - q))."""
    model = trained
    if draft == "bad":
        model = Transformer(trained.config)
        model.load_state_dict(trained.state_dict())
        model.init_buffers().eval()
        with torch.no_grad():
            model.mtp[0].norm.weight.mul_(-1)
    prompt = [5, 7]  # step 2 (or 1, 3, 4) each similarly likely: several continuations with real mass
    n_draws, per = 8192, 1024
    eng = Engine(model, max_batch=per, max_seq_len=16, speculate=k)
    counts = torch.zeros(V ** 3)
    for r in range(n_draws // per):
        outs = eng.generate([prompt], SamplingParams(temperature=temperature, top_k=top_k, max_tokens=3, n=per,
                                                     seed=r * per, ignore_eos=True))
        for o in outs:
            a, b, c = o.token_ids
            counts[(a * V + b) * V + c] += 1
    ok, stat, limit, df = chi_square_pvalue_ok(counts, exact_joint(model, prompt, temperature, top_k, 3))
    st = eng.stats
    assert ok, f"chi-square {stat:.1f} > {limit:.1f} ({df} degrees of freedom); {st}"
    if draft == "bad":
        assert st["acceptance_rate"] < 0.3, st
    else:
        assert st["acceptance_rate"] > 0.5, st


def test_verify_rejection_sampling_by_hand():
    """speculative_sample on one position of a 4-token vocabulary, over 40k seeds: accepted with probability
    sum(min(p, q)), and the kept token distributed as p (draft drawn from q with a different seed stream)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.1, 0.4, 0.4])
    n = 40000
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q, n, replacement=True, generator=g)[:, None]
    logits = torch.log(p).expand(n, 2, 4)
    ones = torch.ones(n)
    tokens, lps, acc = speculative_sample(logits, drafts, torch.log(q).expand(n, 1, 4), ones, ones,
                                          torch.zeros(n, dtype=torch.long), torch.arange(n),
                                          torch.full((n,), 9), filter_top=False)
    first = tokens[:, 0]
    freq = torch.bincount(first, minlength=4).float() / n
    sigma = math.sqrt(0.25 / n)
    assert (freq - p).abs().max() < 4 * sigma
    assert abs(acc.float().mean() - torch.minimum(p, q).sum()) < 4 * sigma
    assert torch.equal(first[acc == 1], drafts[acc == 1, 0])  # accepted: the draft itself
    assert torch.allclose(lps[:, 0], torch.log(p)[first], atol=1e-6)
    # the bonus token (both positions' p here) is p-distributed too
    bonus = tokens[acc == 1, 1]
    fb = torch.bincount(bonus, minlength=4).float() / len(bonus)
    assert (fb - p).abs().max() < 4 * math.sqrt(0.25 / len(bonus))


# ---------------------------------------------------------------------- log-probs, seeds, batching
def test_sampled_logprobs_are_the_target_models(trained):
    """Sampled with speculation, top-p and top-k: each returned log-prob equals the full forward pass's
    temperature-scaled log-softmax at that token (before truncation, as without speculation)."""
    ps = mixed_prompts(4, seed=5)
    eng = Engine(trained, max_batch=4, max_seq_len=64, speculate=2)
    outs = eng.generate(ps, SamplingParams(temperature=0.8, top_p=0.95, top_k=20, max_tokens=12, seed=3,
                                           logprobs=True, ignore_eos=True))
    for p, o in zip(ps, outs):
        with torch.no_grad():
            logits = trained(torch.tensor([p + o.token_ids]))[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        # fp32; the cached path sums in another order: observed ~1e-6
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)
    assert 0 < eng.stats["accepted"] < eng.stats["drafted"]


def test_sampled_seeds_reproduce_and_are_batch_independent(trained):
    """A sequence's samples depend on its seed only: together in a ragged batch, alone, with fewer slots
    (continuous batching), admitted in several prefills, as the n samples of one prompt; another seed gives other
    samples."""
    ps = mixed_prompts(5, seed=7)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=11, ignore_eos=True)
    together = Engine(trained, max_batch=8, max_seq_len=64, speculate=2).generate(ps, params)
    alone = [Engine(trained, max_batch=1, max_seq_len=64, speculate=2).generate([p], params)[0] for p in ps]
    few = Engine(trained, max_batch=2, max_seq_len=64, speculate=2).generate(ps, params)
    split = Engine(trained, max_batch=8, max_seq_len=64, speculate=2, prefill_tokens=5).generate(ps, params)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone] == [o.token_ids for o in few] == \
        [o.token_ids for o in split]  # split: admission in several prefills, each filling the MTP cache too
    assert all(len(o.token_ids) == 10 for o in together)  # max_tokens, never more
    other = Engine(trained, max_batch=8, max_seq_len=64, speculate=2).generate(ps, SamplingParams(
        temperature=1.0, top_p=0.9, max_tokens=10, seed=12, ignore_eos=True))
    assert [o.token_ids for o in other] != [o.token_ids for o in together]
    n4 = Engine(trained, max_batch=4, max_seq_len=64, speculate=2).generate(ps[:1], SamplingParams(
        temperature=1.0, max_tokens=10, n=4, seed=100, ignore_eos=True))
    for o in n4:
        single = Engine(trained, max_batch=1, max_seq_len=64, speculate=2).generate(ps[:1], SamplingParams(
            temperature=1.0, max_tokens=10, seed=100 + o.sample_index, ignore_eos=True))[0]
        assert o.token_ids == single.token_ids


@pytest.mark.parametrize("k", [1, 2])
def test_chunked_prefill_fills_the_mtp_caches(trained, k):
    """Prompts longer than prefill_tokens are prefilled in chunks under speculation too, each chunk writing the MTP
    caches at its positions (attending to the module's cache before it): greedy output equals plain decoding, and
    the draft is accepted exactly as often as after whole prefills (a chunk that left the MTP caches empty drafts
    from junk: fewer accepted)."""
    ps = [r for r in arithmetic_runs(6, seed=5, length=(20, 40))]  # runs the draft knows: high acceptance
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = Engine(trained, max_batch=4, max_seq_len=64).generate(ps, params)
    whole = Engine(trained, max_batch=4, max_seq_len=64, speculate=k)
    chunked = Engine(trained, max_batch=4, max_seq_len=64, speculate=k, prefill_tokens=7)
    outs = {"whole": whole.generate(ps, params), "chunked": chunked.generate(ps, params)}
    assert chunked.stats["prefilled_tokens"] == sum(len(p) for p in ps) and chunked._chunks == []
    for o in outs.values():
        assert [x.token_ids for x in o] == [x.token_ids for x in plain]
    assert chunked.stats["drafted"] == whole.stats["drafted"]
    assert chunked.stats["accepted"] == whole.stats["accepted"] > 0.7 * whole.stats["drafted"]


def test_mixed_greedy_and_sampled_rows(trained):
    """A batch mixing temperature-0 and sampled requests (the general verifier, greedy rows one-hot): the greedy
    rows equal plain greedy decoding, the sampled ones their own run alone."""
    ps = mixed_prompts(3, seed=9)
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    hot = SamplingParams(temperature=1.0, max_tokens=9, seed=4, ignore_eos=True)
    eng = Engine(trained, max_batch=4, max_seq_len=64, speculate=2)
    mixed, _ = run(eng, [(ps[0], greedy), (ps[1], hot), (ps[2], greedy)])
    plain = Engine(trained, max_batch=4, max_seq_len=64).generate([ps[0], ps[2]], greedy)
    hot_alone = Engine(trained, max_batch=1, max_seq_len=64, speculate=2).generate([ps[1]], hot)[0]
    assert [mixed[0].token_ids, mixed[2].token_ids] == [o.token_ids for o in plain]
    assert mixed[1].token_ids == hot_alone.token_ids


def test_two_mtp_modules_draft_two_deep():
    """A model trained with two MTP depths: drafts 1 and 2 come from modules 1 and 2 (both caught up over the
    last verify's positions), draft 3 from module 2 again. Greedy equals plain decoding, and second drafts are
    accepted too (more than one accepted token per step)."""
    model, rec = train(pack(arithmetic_runs(2000, seed=0)), steps=100, mtp_weight=0.3, mtp_depth=2)
    assert len(model.mtp) == 2
    held_out = [r[:4] for r in arithmetic_runs(16, seed=99, length=(8, 9))]
    ps = held_out[:8] + mixed_prompts(8, seed=4)
    plain = Engine(model, max_batch=6, max_seq_len=64).generate(ps, SamplingParams(temperature=0, max_tokens=11))
    for k in (1, 2, 3):
        eng = Engine(model, max_batch=6, max_seq_len=64, speculate=k)
        assert len(eng.mtp_cache) == min(k, 2)
        spec = eng.generate(ps, SamplingParams(temperature=0, max_tokens=11))
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
        if k > 1:
            assert eng.stats["accepted_per_step"] > 1, eng.stats


def test_bad_arguments():
    m = random_tiny()
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        Engine(Transformer(get_preset("tiny").replace(vocab_size=V, num_nextn_predict_layers=0)), speculate=1)
    with pytest.raises(ValueError, match="must be >= 0"):
        Engine(m, speculate=-1)
    eng = Engine(m, max_batch=2, max_seq_len=40, speculate=3)
    assert eng.cache_len == 64 and eng.stats["acceptance_rate"] is None
    plain = Engine(m, max_batch=2, max_seq_len=40)
    for _ in range(3):
        plain.add_request([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    plain.step()
    st = plain.stats  # 3 prompts: 2 in slots (prefilled, one decode step), 1 waiting for a slot
    assert (st["slots_busy"], st["waiting"], st["drafted"], st["tokens_per_step"]) == (2, 1, 0, 1.0)


# ---------------------------------------------------------------------- acceptance of a trained draft, and SFT
def chat_rows(n, seed):
    """SFT data unlike pretraining: prompt [60, t, t+d, 61] (user turn, assistant marker), response counting
    *down* from t by 1; loss on the response only. The pretrained draft extrapolates runs upwards by d."""
    g = torch.Generator().manual_seed(seed)
    prompts, docs, targets = [], [], []
    for _ in range(n):
        t, d = int(torch.randint(0, 60, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        p = [60, t, (t + d) % 60, 61]
        r = [(t - i) % 60 for i in range(1, 11)]
        prompts.append(p)
        docs.append(p + r)
        targets.append([False] * len(p) + [True] * len(r))
    return prompts, docs, targets


def acceptance(model, prompts, k, temperature, max_tokens=16):
    eng = Engine(model, max_batch=len(prompts), max_seq_len=64, speculate=k)
    eng.generate(prompts, SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0, ignore_eos=True))
    return eng.stats


def test_sft_trains_the_mtp_module_only_when_asked(trained):
    """The one training loop covers SFT: moe.mtp_weight > 0 (SFT's default is 0) adds the MTP loss over the
    response tokens (the MTP labels follow the loss mask) and moves the MTP weights; 0 leaves them as they were."""
    import copy

    _, docs, targets = chat_rows(200, seed=1)
    data = pack(docs, targets)
    before = trained.mtp[0].eh_proj.weight.clone()
    off, rec_off = train(data, 3, 0.0, kind="sft", model=copy.deepcopy(trained))
    on, rec_on = train(data, 3, 0.3, kind="sft", model=copy.deepcopy(trained))
    assert "mtp_loss" not in rec_off and rec_on["mtp_loss"] > 0
    assert torch.equal(off.mtp[0].eh_proj.weight, before)
    assert not torch.equal(on.mtp[0].eh_proj.weight, before)
    b = data.batch([0, 1])
    (mtp_labels,) = b.mtp_labels(1)
    assert ((mtp_labels != -100) <= (b.labels != -100)).all()  # never a prompt token


def test_acceptance_of_the_trained_draft_and_after_sft(trained):
    """Acceptance of the MTP draft on held-out prompts, for the model pretrained with the MTP loss, and after a
    short SFT on a differently shaped task with and without the MTP loss (numbers in benchmarks/LOG.md; run
    with -s to print them). Greedy and sampled (temperature 1)."""
    import copy

    held_out = [r[:4] for r in arithmetic_runs(32, seed=99, length=(8, 9))]  # seeds unlike training's
    res = {}
    for k in (1, 2, 3):
        for temp in (0.0, 1.0):
            res[f"pretrained k={k} T={temp}"] = acceptance(trained, held_out, k, temp)["acceptance_rate"]
    sft_prompts, docs, targets = chat_rows(400, seed=2)
    data = pack(docs, targets)
    test_prompts = chat_rows(32, seed=77)[0]
    models = {w: train(data, 60, w, kind="sft", model=copy.deepcopy(trained), lr=3e-3)[0] for w in (0.0, 0.3)}
    for w, m in models.items():
        # the SFT learnt its task: greedy answers count down
        o = Engine(m, max_batch=4, max_seq_len=64).generate(test_prompts[:4], SamplingParams(
            temperature=0, max_tokens=4, ignore_eos=True))
        want = [[(p[1] - i) % 60 for i in (1, 2, 3)] for p in test_prompts[:4]]
        assert sum(x.token_ids[:3] == w for x, w in zip(o, want)) >= 3, ([x.token_ids for x in o], want)
        for k in (1, 2):
            for temp in (0.0, 1.0):
                res[f"sft mtp_weight={w} k={k} T={temp}"] = acceptance(m, test_prompts, k, temp)["acceptance_rate"]
    print("\nacceptance rates (accepted / drafted):")
    for name, rate in res.items():
        print(f"  {name}: {rate:.3f}")
    assert res["pretrained k=1 T=0.0"] > 0.9 and res["pretrained k=2 T=0.0"] > 0.8
    for k in (1, 2):
        assert res[f"sft mtp_weight=0.3 k={k} T=0.0"] > res[f"sft mtp_weight=0.0 k={k} T=0.0"] + 0.2


def test_cli_generate_and_chat_take_speculate(tmp_path, capsys, monkeypatch):
    """`r1lab generate --speculate K` prints what --speculate 0 prints (greedy), plus the draft's counts;
    `r1lab chat --speculate 1` answers; a model without an MTP module is a one-line error."""
    import io

    from r1lab import save_pretrained
    from r1lab.cli import main as cli_main

    tok = load_tokenizer()
    save_pretrained(random_tiny(vocab=tok.vocab_size, seed=2), tmp_path / "ck")
    base = ["generate", "--model", str(tmp_path / "ck"), "--prompt", "Hello", "--max-tokens", "10",
            "--temperature", "0", "--device", "cpu"]
    assert cli_main(base) == 0
    plain = capsys.readouterr().out
    assert cli_main(base + ["--speculate", "2"]) == 0
    spec = capsys.readouterr().out
    assert spec.startswith(plain) and "drafted tokens accepted" in spec[len(plain):]
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert cli_main(["chat", "--model", str(tmp_path / "ck"), "--max-tokens", "4", "--device", "cpu",
                     "--speculate", "1"]) == 0
    assert capsys.readouterr().out.count("> ") == 2
    save_pretrained(Transformer(get_preset("tiny").replace(num_nextn_predict_layers=0)).init_weights(seed=1),
                    tmp_path / "no_mtp")
    assert cli_main(["generate", "--model", str(tmp_path / "no_mtp"), "--prompt", "Hi", "--speculate", "1",
                     "--device", "cpu"]) == 2
    assert "needs a model with an MTP module" in capsys.readouterr().err


def test_grpo_rollouts_with_speculation_keep_the_policys_logprobs(tmp_path):
    """grpo.speculate = 2: rollouts come from the speculative engine, and their old log-probs are the policy's
    (recomputed by the trainer's own full forward, fp32: observed ~1e-6)."""
    from r1lab.train.grpo import GRPORecipe, GRPOTrainer, completion_logprobs
    from test_grpo_learning import CharTokenizer

    r = GRPORecipe.defaults()
    r.run.out, r.run.device = str(tmp_path / "run"), "cpu"
    r.grpo.prompt_style, r.grpo.rewards, r.grpo.max_tokens = "raw", ["accuracy=1"], 6
    r.grpo.prompts_per_step, r.grpo.group_size, r.grpo.speculate = 2, 4, 2
    r.ckpt.export, r.log.every = False, 0
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    cfg = get_preset("tiny").replace(vocab_size=16, max_position_embeddings=64, rope_scaling=None)
    torch.manual_seed(0)
    t = GRPOTrainer(r, Transformer(cfg).init_weights(seed=0), CharTokenizer(), rows, quiet=True)
    assert t.engine.speculate == 2
    ro = t.rollout(0)
    assert t.engine.stats["drafted"] > 0
    with torch.no_grad():
        lp, mask, _ = completion_logprobs(t.model, ro.prompt_ids, ro.completion_ids, r.grpo.temperature)
    for i, old in enumerate(ro.old_logp):
        assert torch.allclose(torch.tensor(old), lp[i, : len(old)], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_of_the_speculative_step(trained, compile):
    """On a GPU (bf16: the grouped expert GEMMs that a graph can hold need it) the speculative step is captured
    as a CUDA graph, after torch.compile with compile=True. Graphed = eager speculative step (the same kernels;
    compiled: the same tokens, log-probs within bf16 rounding), and greedy = the plain engine's greedy on
    prompts whose continuation is clear (bf16 near-ties elsewhere could part them: other shapes round otherwise)."""
    m = copy_to(trained, "cuda").to(torch.bfloat16)
    ps = [r[:4] for r in arithmetic_runs(6, seed=99, length=(8, 9))]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
    hot = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=5, ignore_eos=True, logprobs=True)
    plain = Engine(m, max_batch=4, max_seq_len=64, compile=False).generate(ps, greedy)
    ref = Engine(m, max_batch=4, max_seq_len=64, speculate=2, compile=False, cuda_graph=False)
    torch._dynamo.reset()
    eng = Engine(m, max_batch=4, max_seq_len=64, speculate=2, compile=compile)
    assert eng.cuda_graph
    tol = 0.05 if compile else 0.0  # bf16 log-probs of a fused kernel vs eager: a few ulps of ~-0.1..-3
    for params in (greedy, hot):
        for a, b in zip(eng.generate(ps, params), ref.generate(ps, params)):
            assert a.token_ids == b.token_ids
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=tol)
    assert [o.token_ids for o in eng.generate(ps, greedy)] == [o.token_ids for o in plain]
    assert eng._compile_mode == ("step" if compile else "off")  # no fallback happened
    assert 0 < eng.stats["accepted"] < eng.stats["drafted"]


def copy_to(model, device):
    m = Transformer(model.config)
    m.load_state_dict(model.state_dict())
    return m.to(device).init_buffers().eval()


def test_compiled_speculative_step_equals_eager(trained):
    """torch.compile of the whole speculative step (draft, verify forward, rejection sampling, the eager top-k
    filter inside) on the CPU gives the eager step's tokens, and log-probs within fp32 rounding of fused kernels.
    One sampler mode only (~100 s to compile on 2 shared cores); greedy compiled is checked on a GPU."""
    ps = mixed_prompts(3, seed=6)
    sp = SamplingParams(max_tokens=8, seed=5, logprobs=True, ignore_eos=True, temperature=0.8, top_k=5)
    ref = Engine(trained, max_batch=4, max_seq_len=32, speculate=2, compile=False).generate(ps, sp)
    torch._dynamo.reset()
    eng = Engine(trained, max_batch=4, max_seq_len=32, speculate=2, compile=True)
    out = eng.generate(ps, sp)
    assert eng._compile_mode == "step"  # no fallback happened
    for a, b in zip(ref, out):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_serve_takes_speculate_and_health_reports_the_draft():
    """`r1lab serve --speculate K` builds a speculative engine; /health then carries the draft's counts."""
    pytest.importorskip("fastapi")
    testclient = pytest.importorskip("starlette.testclient")
    from r1lab.cli import build_parser
    from r1lab.serve.app import create_app

    assert build_parser().parse_args(["serve", "--model", "m", "--speculate", "2"]).speculate == 2
    tok = load_tokenizer()
    eng = Engine(random_tiny(vocab=tok.vocab_size, seed=1), tok, max_batch=2, max_seq_len=64, speculate=2)
    eng._draft = oracle_draft(eng)  # mostly right, so some drafts are accepted
    with testclient.TestClient(create_app(eng, tok, "tiny", allowed_hosts=["testserver"])) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 9,
                                                  "temperature": 0})
        assert r.status_code == 200, r.text
        health = client.get("/health").json()
    assert health["speculate"] == 2
    spec = health["speculative"]
    assert spec["drafted"] > 0 and 0 < spec["accepted"] <= spec["drafted"] and spec["tokens_per_step"] > 1
