"""The engine against its slow twins: full forward passes without cache, one-by-one generation,
transformers' greedy generate, and the sampling distribution it claims."""

import math
import re
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from r1lab import Engine, SamplingParams, Transformer, get_preset, load_tokenizer, save_pretrained
from r1lab.engine.sampling import sample, uniform_noise

VOCAB = 320


def tiny(vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    m = Transformer(get_preset("tiny").replace(vocab_size=vocab, eos_token_id=vocab - 1)).init_weights(seed=seed)
    with torch.no_grad():  # a peakier output distribution than N(0, 0.02) gives, so greedy paths are stable
        m.lm_head.weight.mul_(30)
    return m.eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]


def transformers_twin(model, folder):
    """transformers' implementation on the same weights (saved to folder, loaded in fp32): the independent reference;
    skips without transformers."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    save_pretrained(model, folder, tokenizer=False)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(model, prompt, n):
    """Step-by-step argmax of full forward passes, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_full_forward_argmax():
    m = tiny()
    eng = Engine(m, max_batch=4, max_seq_len=64)
    ps = prompts([5, 11, 3])
    outs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.token_ids == reference_greedy(m, p, 12)
        assert o.finish_reason == "length" and o.prompt_tokens == len(p)


def test_logprobs_equal_full_forward_recomputation():
    m = tiny()
    eng = Engine(m, max_batch=4, max_seq_len=64)
    ps = prompts([7, 4])
    outs = eng.generate(ps, SamplingParams(temperature=0.7, max_tokens=10, seed=3, logprobs=True, ignore_eos=True))
    for p, o in zip(ps, outs):
        with torch.no_grad():
            logits = m(torch.tensor([p + o.token_ids]))[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        # fp32; the cached path sums in another order: observed ~1e-6
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)


def test_ragged_batch_equals_one_by_one_and_seeds_reproduce():
    m = tiny()
    ps = prompts([9, 2, 14, 5, 6])
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=8, seed=11, ignore_eos=True)
    together = Engine(m, max_batch=8, max_seq_len=64).generate(ps, params)
    alone = [Engine(m, max_batch=1, max_seq_len=64).generate([p], params)[0] for p in ps]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    # a small prefill budget splits admission into several batched prefills: same result
    split = Engine(m, max_batch=8, max_seq_len=64, prefill_tokens=10).generate(ps, params)
    assert [o.token_ids for o in split] == [o.token_ids for o in alone]
    again = Engine(m, max_batch=8, max_seq_len=64).generate(ps, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in together]
    other = Engine(m, max_batch=8, max_seq_len=64).generate(ps, SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=8, seed=12, ignore_eos=True))
    assert [o.token_ids for o in other] != [o.token_ids for o in together]


def test_continuous_batching_with_fewer_slots_than_sequences():
    m = tiny()
    ps = prompts([3, 8, 4, 12, 6, 2, 9])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    big = Engine(m, max_batch=8, max_seq_len=64).generate(ps, params)
    small_engine = Engine(m, max_batch=2, max_seq_len=64)
    small = small_engine.generate(ps, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in small] == [o.token_ids for o in big]
    assert not small_engine.has_work() and small_engine.slots == [None, None]


def test_n_samples_share_prefill_and_match_separate_requests():
    m = tiny()
    (p,) = prompts([10])
    params = SamplingParams(temperature=1.0, max_tokens=7, n=4, seed=100, ignore_eos=True)
    outs = Engine(m, max_batch=4, max_seq_len=64).generate([p], params)
    assert [o.sample_index for o in outs] == [0, 1, 2, 3]
    for o in outs:
        single = Engine(m, max_batch=1, max_seq_len=64).generate([p], SamplingParams(
            temperature=1.0, max_tokens=7, seed=100 + o.sample_index, ignore_eos=True))[0]
        assert o.token_ids == single.token_ids
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_stop_token_and_max_tokens():
    m = tiny()
    (p,) = prompts([6])
    free = Engine(m, max_batch=1, max_seq_len=64).generate([p], SamplingParams(temperature=0, max_tokens=10,
                                                                              ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    o = Engine(m, max_batch=1, max_seq_len=64).generate([p], SamplingParams(
        temperature=0, max_tokens=10, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert o.token_ids == free.token_ids[: first + 1] and o.finish_reason == "stop"
    assert len(free.token_ids) == 10 and free.finish_reason == "length"


def test_stop_strings_with_the_real_tokenizer():
    tok = load_tokenizer()
    m = tiny(vocab=tok.vocab_size)
    eng = Engine(m, tok, max_batch=2, max_seq_len=64)
    free = eng.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert free.text == tok.decode(free.token_ids)
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 2]
    assert stop
    o = eng.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12, stop=stop, ignore_eos=True))[0]
    assert o.finish_reason == "stop"
    assert o.text == free.text[: free.text.find(stop)]
    assert stop in tok.decode(o.token_ids) and stop not in tok.decode(o.token_ids[:-1])


def test_bad_requests_are_clear_errors():
    eng = Engine(tiny(), max_batch=1, max_seq_len=16)
    with pytest.raises(ValueError, match="exceed the engine's max_seq_len 16"):
        eng.generate([[1] * 10], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[VOCAB + 5]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.generate(["text"], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_greedy_equals_transformers_generate(tmp_path):
    m = tiny()
    hf = transformers_twin(m, tmp_path / "ck")
    ps = prompts([8, 8])
    ours = Engine(m, max_batch=2, max_seq_len=64).generate(ps, SamplingParams(temperature=0, max_tokens=10,
                                                                             ignore_eos=True))
    ref = hf.generate(torch.tensor(ps), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert [o.token_ids for o in ours] == ref[:, 8:].tolist()


def test_sampler_frequencies_match_the_distribution():
    """Exponential-race sampling over 20k independent (seed, position) draws vs the softmax, 6 tokens."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    toks, lps = sample(logits.expand(n, -1), torch.ones(n), torch.ones(n), torch.zeros(n, dtype=torch.long),
                       torch.arange(n), torch.full((n,), 5))
    p = torch.softmax(logits, -1)
    freq = torch.bincount(toks, minlength=6).float() / n
    assert (freq - p).abs().max() < 4 * math.sqrt(p.max() * (1 - p.max()) / n)  # 4 sigma
    assert torch.allclose(lps, torch.log(p)[toks], atol=1e-6)
    # top-k 2 and top-p 0.8 restrict the support
    toks_k, _ = sample(logits.expand(n, -1), torch.ones(n), torch.ones(n), torch.full((n,), 2), torch.arange(n),
                       torch.zeros(n, dtype=torch.long))
    assert set(toks_k.tolist()) == {0, 1}
    keep = int((torch.cumsum(p, 0) - p < 0.8).sum())  # tokens whose preceding mass is below 0.8
    toks_p, _ = sample(logits.expand(n, -1), torch.ones(n), torch.full((n,), 0.8), torch.zeros(n, dtype=torch.long),
                       torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert set(toks_p.tolist()) == set(range(keep))


def test_noise_is_the_documented_32_bit_hash():
    """The sampler's uniforms against a plain-Python uint32 version of the hash (no tensor arithmetic)."""
    M = 0xFFFFFFFF

    def mix(x):
        x &= M
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & M
        x = ((x ^ (x >> 15)) * 0x846CA68B) & M
        return x ^ (x >> 16)

    seeds, positions = [0, 1, 12345, 2**31 - 1], [0, 7, 4095, 100000]
    u = uniform_noise(torch.tensor(seeds), torch.tensor(positions), 129280)
    for b, (seed, pos) in enumerate(zip(seeds, positions)):
        for tok in (0, 1, 2, 65535, 129279):
            h = mix(mix(seed * 0x9E3779B1 + pos) ^ ((tok * 0x85EBCA6B) & M))
            assert u[b, tok].item() == torch.tensor(((h >> 9) + 0.5) / 2**23, dtype=torch.float32).item()
    assert 0 < u.min() and u.max() < 1
    # The largest hash value must stay below 1 in fp32 (-log(-log(1)) = inf would pick its token whatever its
    # probability): seed 3, position 132 holds such a hash at one of the 129,280 tokens.
    u = uniform_noise(torch.tensor([3]), torch.tensor([132]), 129280)
    assert 0 < u.min() and u.max() < 1


def test_greedy_only_sampler_equals_the_general_path():
    """The greedy-only shortcut (no noise) returns what the general sampler returns for temperature-0 rows."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=g) * 3
    n = logits.shape[0]
    args = (torch.zeros(n), torch.full((n,), 0.9), torch.full((n,), 5), torch.arange(n), torch.arange(n) + 7)
    t_ref, lp_ref = sample(logits, *args)
    t_fast, lp_fast = sample(logits, *args, filter_top=False, greedy_only=True)
    assert torch.equal(t_ref, t_fast) and torch.equal(t_ref, logits.argmax(-1))
    assert torch.allclose(lp_ref, lp_fast, atol=1e-6)


def test_mixed_greedy_and_sampled_requests_match_separate_runs():
    """A batch mixing temperature-0 and sampled requests (the general graph) equals each kind run alone
    (the greedy-only graph for the greedy ones)."""
    m = tiny()
    ps = prompts([4, 6, 5])
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)
    hot = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=9, logprobs=True)
    eng = Engine(m, max_batch=4, max_seq_len=32)
    seqs = eng.add_request(ps[0], greedy) + eng.add_request(ps[1], hot) + eng.add_request(ps[2], greedy)
    while eng.has_work():
        eng.step()
    mixed = [eng.completion(s) for s in seqs]
    alone = [Engine(m, max_batch=1, max_seq_len=32).generate([p], sp)[0]
             for p, sp in zip(ps, (greedy, hot, greedy))]
    for a, b in zip(mixed, alone):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("mode", [dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=5),
                                  dict(temperature=0.8), dict(temperature=0.0)])
def test_compiled_decode_step_equals_eager(mode, device):
    """torch.compile of the whole decode step (forward + sampler, each sampler mode) gives the same samples and
    log-probs as eager (on a GPU also captured in a CUDA graph; fp32 weights there too)."""
    m = tiny().to(device)
    ps = prompts([6, 3, 9])
    sp = SamplingParams(max_tokens=8, seed=5, logprobs=True, ignore_eos=True, **mode)
    ref = Engine(m, max_batch=4, max_seq_len=512, compile=False, cuda_graph=False).generate(ps, sp)
    torch._dynamo.reset()
    eng = Engine(m, max_batch=4, max_seq_len=512, compile=True)
    out = eng.generate(ps, sp)
    assert eng._compile_mode == "step"  # no fallback happened
    for a, b in zip(ref, out):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_compiled_decode_step_compiles_once_for_every_width(device):
    """The decode step reads the block table as wide as the longest sequence's pages (rounded up to a power of
    two): 2, 4 and 8 pages here as it grows past 128 and 256 positions. Compiled, all widths share one graph
    (a GPU still captures a CUDA graph per width), and greedy decoding gives the eager engine's tokens and
    log-probs (fp32). The step writes its new latents into the page pool in place: no generated loop runs over
    a whole layer's pool (torch 2.11 copied the pool and back when the write went through a view of it, twice
    the pool's bytes per layer per step: a 131K-token pool made a step 1.6x slower on an H100)."""
    m = tiny().to(device)
    ps = prompts([60, 3, 20])
    sp = SamplingParams(temperature=0, max_tokens=200, logprobs=True, ignore_eos=True)
    ref = Engine(m, max_batch=4, max_seq_len=512, compile=False, cuda_graph=False).generate(ps, sp)
    torch._dynamo.reset()
    counters.clear()
    eng = Engine(m, max_batch=4, max_seq_len=512, compile=True)
    widths, decode = set(), eng._decode
    eng._decode = lambda mode, pages: widths.add(pages) or decode(mode, pages)
    out, code = run_and_get_code(eng.generate, ps, sp)
    assert eng._compile_mode == "step"  # no fallback happened
    assert counters["stats"]["unique_graphs"] == 1 and widths == {2, 4, 8}, (counters["stats"], widths)
    pool = re.compile(rf"\b{eng.cache[0].numel()}L?\b")  # a loop (C++) or xnumel (Triton) over a whole pool
    assert code and not any(pool.search(c) for c in code), "the compiled step copies the page pool"
    if eng.cuda_graph:
        assert set(eng._graphs) == {("greedy", w) for w in widths}
    for a, b in zip(ref, out):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphs_captured_again_after_reset_graphs():
    """reset_graphs drops every captured step and its memory pool: the next steps capture again (into a fresh
    pool; the old handle, with no graph left alive, is an internal assert in torch's allocator) and generate
    what they generated before."""
    m = tiny().to("cuda")
    ps = prompts([6, 3, 9])
    sp = SamplingParams(max_tokens=8, seed=5, logprobs=True, ignore_eos=True)
    eng = Engine(m, max_batch=4, max_seq_len=32, compile=False)
    first = eng.generate(ps, sp)
    assert eng._graphs
    eng.reset_graphs()
    assert not eng._graphs
    again = eng.generate(ps, sp)
    assert eng._graphs
    for a, b in zip(first, again):
        assert a.token_ids == b.token_ids


def test_abort_frees_slots_and_queue():
    m = tiny()
    eng = Engine(m, max_batch=2, max_seq_len=64)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    a = eng.add_request(prompts([4])[0], params)
    b = eng.add_request(prompts([5])[0], params)
    c = eng.add_request(prompts([6])[0], params)  # waits: both slots are taken
    eng.step()
    assert eng.slots.count(None) == 0 and len(eng.waiting) == 1
    eng.abort(a + c)
    assert eng.slots.count(None) == 1 and not eng.waiting
    while eng.has_work():
        eng.step()
    assert a[0].finish_reason == "abort" and c[0].finish_reason == "abort" and not c[0].tokens
    assert len(b[0].tokens) == 20 and b[0].finish_reason == "length"


def test_overlapped_steps_equal_synchronous_ones():
    """overlap=True (the GPU default: step N+1 queued before step N's tokens are read) against overlap=False:
    the same completions, finish reasons and streamed tokens, log-probs within fp32 rounding (an eager step runs
    the running rows only, and freed slots refilled one step later make other batches of rows), with fewer slots
    than sequences, stop tokens, n samples, mixed lengths, and an abort mid-run."""
    m = tiny()
    ps = prompts([3, 8, 4, 12, 6, 2, 9, 5])
    free = Engine(m, max_batch=1, max_seq_len=64).generate(ps[:1], SamplingParams(temperature=0, max_tokens=8))[0]
    runs = []
    for overlap in (False, True):
        eng = Engine(m, max_batch=3, max_seq_len=64, overlap=overlap)
        assert eng.overlap is overlap
        streamed, seqs = [], []
        for i, p in enumerate(ps):
            params = SamplingParams(temperature=1.0 if i % 2 else 0.0, max_tokens=4 + i % 5, n=1 + (i == 3),
                                    seed=i, logprobs=True, stop_token_ids=[free.token_ids[2]] if i == 0 else None)
            seqs += eng.add_request(p, params, prompt_index=i)
        steps = 0
        while eng.has_work():
            streamed += [(s.prompt_index, s.sample_index, t) for s, t in eng.step()]
            steps += 1
            if steps == 3:
                eng.abort([seqs[5]])
        assert eng.slots == [None] * 3 and eng._inflight is None
        outs = [eng.completion(s) for s in seqs]
        runs.append((outs, streamed))
    (sync, s_stream), (over, o_stream) = runs
    assert [(o.token_ids, o.finish_reason) for o in over] == [(o.token_ids, o.finish_reason) for o in sync]
    for o, s in zip(over, sync):
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(s.logprobs), rtol=0, atol=1e-5)
    assert sync[0].finish_reason == "stop" and sync[5].finish_reason == "abort"
    for key in {(p, s) for p, s, _ in s_stream}:  # each sequence's tokens stream in order in both runs
        assert [t for p, s, t in o_stream if (p, s) == key] == [t for p, s, t in s_stream if (p, s) == key]


def test_cache_bytes_match_r1lab_info():
    """The paged pool holds exactly cache_tokens positions at `r1lab info`'s latent bytes per token (bf16),
    whatever max_batch and max_seq_len are; one sequence's block table spans max_seq_len rounded up to pages
    of 64 positions."""
    from r1lab.cli import model_summary

    m = tiny().to(torch.bfloat16)
    per_token = model_summary(m.config)["kv_cache_bytes_per_token_mla_bf16"]
    for max_seq_len, rows, cache_tokens in ((40, 64, 128), (64, 64, 640), (65, 128, 4096)):
        eng = Engine(m, max_batch=3, max_seq_len=max_seq_len, cache_tokens=cache_tokens)
        assert eng.cache_len == rows and eng.max_seq_len == max_seq_len and eng.cache_tokens == cache_tokens
        allocated = sum(c.numel() * c.element_size() for c in eng.cache)
        assert allocated == cache_tokens * per_token


def test_experts_that_read_counts_back_turn_cuda_graphs_off_with_the_reason():
    """host_sync names the layer whose routed experts run one matmul per expert (a count read back to the host,
    which a CUDA graph cannot capture): impl "loop", or weights the grouped GEMM does not take (bf16 on a CPU,
    fp32 on a GPU); an engine asked for CUDA graphs over such a model refuses with that reason."""
    from r1lab.model.moe import MoE, host_sync

    m = tiny()
    moes = [name for name, mod in m.named_modules() if isinstance(mod, MoE)]
    assert moes and host_sync(m) is None  # fp32 on a CPU: the grouped GEMM
    m.get_submodule(moes[-1]).impl = "loop"
    assert host_sync(m) == f"{moes[-1]} runs its experts one by one (impl 'loop')"
    with pytest.raises(ValueError, match=f"cuda_graph=True: a decode step cannot be captured, since {moes[-1]}"):
        Engine(m, max_batch=2, max_seq_len=64, compile=False, cuda_graph=True)
    m.get_submodule(moes[-1]).impl = "auto"
    why = host_sync(m.to(torch.bfloat16))
    assert why.startswith(f"{moes[0]}'s experts in bfloat16 on cpu run one matmul per expert")
