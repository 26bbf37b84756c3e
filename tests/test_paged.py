"""The paged latent cache against independent references: greedy decoding by full forward passes without
a cache, the same requests on an unconstrained engine (preemption, prefix cache, chunked prefill), transformers'
logits at YaRN positions beyond 4K, and plain softmax attention (the paged decode kernel)."""

import os

import pytest
import torch
from torch._dynamo.utils import counters

from r1lab import Engine, SamplingParams, Transformer, get_preset
from r1lab.engine.pages import PAGE, PagePool, page_hashes
from r1lab.model import kernels

from test_engine import VOCAB, prompts, reference_greedy, tiny, transformers_twin

GREEDY = dict(temperature=0, ignore_eos=True)


def run(engine, requests):
    """[(prompt, params)] through add_request/step, all queued at once -> completions in request order."""
    seqs = [s for i, (p, sp) in enumerate(requests) for s in engine.add_request(p, sp, prompt_index=i)]
    while engine.has_work():
        engine.step()
    assert engine.slots == [None] * engine.max_batch
    return [engine.completion(s) for s in seqs]


def test_paged_greedy_equals_full_forward_across_pages():
    """Ragged prompts that start, end and cross 64-position pages, generations that cross page boundaries,
    n > 1 (the samples share the prompt's full pages and copy its partial one) and fewer slots than
    sequences: every greedy output equals step-by-step argmax of full forward passes (no cache)."""
    m = tiny()
    ps = prompts([70, 5, 130, 64, 63, 1], seed=3)
    eng = Engine(m, max_batch=3, max_seq_len=256, cache_tokens=64 * 16)
    outs = run(eng, [(p, SamplingParams(max_tokens=20, n=2 if i in (0, 3) else 1, **GREEDY))
                     for i, p in enumerate(ps)])
    for o in outs:
        assert o.token_ids == reference_greedy(m, ps[o.prompt_index], 20), (o.prompt_index, o.sample_index)
    assert len(outs) == 8
    st = eng.stats
    assert st["pages_used"] == 0 and st["preemptions"] == 0  # every page back in the pool (or its cache)


def test_n_samples_share_pages_and_match_separate_requests():
    """Sampled (not greedy) n = 4 of a 100-token prompt: each sample equals the same seed run alone, so no
    sample wrote into a page another reads; while they run, the prompt's full page is held once."""
    m = tiny()
    (p,) = prompts([100], seed=5)
    eng = Engine(m, max_batch=4, max_seq_len=160, cache_tokens=64 * 12, prefix_cache=False)
    seqs = eng.add_request(p, SamplingParams(temperature=1.0, max_tokens=30, n=4, seed=7, ignore_eos=True))
    eng.step()
    # one shared full page + four own copies of the partial second page
    assert eng.stats["pages_used"] == 5 and len({s.pages[0] for s in seqs}) == 1
    while eng.has_work():
        eng.step()
    for s in seqs:
        alone = Engine(m, max_batch=1, max_seq_len=160).generate([p], SamplingParams(
            temperature=1.0, max_tokens=30, seed=7 + s.sample_index, ignore_eos=True))[0]
        assert s.tokens == alone.token_ids
    assert len({tuple(s.tokens) for s in seqs}) > 1


def test_full_context_and_64_slots_allocate_only_cache_tokens():
    """max_seq_len at the model's full context (V3's 163,840 positions, YaRN) and 64 slots: the engine's
    tensors add up to its cache_tokens of latents plus small per-slot state (block tables included), not to
    64 x 163,840 positions (2.5 GB here); it generates; and a pool short of one full-length sequence is refused."""
    from r1lab.cli import model_summary

    cfg = get_preset("tiny").replace(vocab_size=VOCAB, eos_token_id=VOCAB - 1, max_position_embeddings=163840)
    torch.manual_seed(0)
    m = Transformer(cfg).init_weights(seed=0).to(torch.bfloat16).eval()
    cache_tokens = 163840 + 4096  # the pool must hold one full-length sequence (and the reserved page)
    eng = Engine(m, max_batch=64, cache_tokens=cache_tokens)
    assert eng.max_seq_len == 163840 and eng.cache_tokens == cache_tokens
    per_token = model_summary(cfg)["kv_cache_bytes_per_token_mla_bf16"]
    tensors = [t for v in vars(eng).values() for t in (v if isinstance(v, list) else [v])
               if isinstance(t, torch.Tensor)]
    cache = sum(c.numel() * c.element_size() for c in eng.cache)
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert cache == cache_tokens * per_token
    per_slot = eng.pages_per_seq * 8 + 1024  # a block-table row (int64) and the decode step's scalars
    assert total <= cache + 64 * per_slot, (total, cache)
    assert 64 * 163840 * per_token > 60 * total  # max_batch x max_seq_len positions: 2.5 GB here
    outs = eng.generate(prompts([30, 90, 7]), SamplingParams(max_tokens=5, **GREEDY))
    assert [len(o.token_ids) for o in outs] == [5, 5, 5]
    with pytest.raises(ValueError, match="smaller than one max_seq_len sequence"):
        Engine(m, max_batch=64, cache_tokens=163840)  # 2,559 usable pages < the 2,560 one sequence may need
    with pytest.raises(ValueError, match="exceed the engine's max_seq_len 100"):
        Engine(m, max_batch=2, max_seq_len=100).generate([[1] * 101], SamplingParams(max_tokens=1))


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_completes_every_request_as_an_unconstrained_run(overlap):
    """A pool of 6 pages for 6 sequences that grow to 3 pages each: the youngest are preempted (pages released,
    recomputed later, from the prefix cache where their pages survived) and every request completes with the
    tokens, finish reasons and log-probs of a run with room for all."""
    m = tiny()
    ps = prompts([40, 90, 10, 64, 120, 33], seed=8)
    requests = [(p, SamplingParams(temperature=1.0 if i % 2 else 0.0, max_tokens=60, seed=i, logprobs=True,
                                   ignore_eos=True)) for i, p in enumerate(ps)]
    free = run(Engine(m, max_batch=6, max_seq_len=192, cache_tokens=64 * 19, overlap=overlap), requests)
    tight = Engine(m, max_batch=6, max_seq_len=192, cache_tokens=64 * 7, overlap=overlap)
    outs = run(tight, requests)
    assert tight.stats["preemptions"] > 0, tight.stats
    for a, b in zip(outs, free):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        # fp32; recomputed positions come from a prefill instead of decode steps: observed ~1e-6
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_preemption_with_speculation_keeps_greedy_output():
    """Speculative decoding (MTP caches paged by the same block tables) under a pool that forces preemption:
    greedy output as plain decoding with room for all."""
    m = tiny()
    ps = prompts([10, 20, 15, 30], seed=9)  # admitted with a page each, then all grow past 64 positions
    params = SamplingParams(max_tokens=100, **GREEDY)
    free = Engine(m, max_batch=4, max_seq_len=200).generate(ps, params)
    eng = Engine(m, max_batch=4, max_seq_len=200, cache_tokens=64 * 7, speculate=2)
    outs = eng.generate(ps, params)
    assert eng.stats["preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in free]


def test_prefix_cache_prefills_only_the_new_tokens():
    """A second request sharing a 200-token prefix with the first prefills only what follows the prefix's
    full pages (counted in stats and the completion) and gives what a fresh engine gives; a third, the
    first's prompt and answer plus a new turn, finds the answer's pages too."""
    m = tiny()
    system, q1, q2 = prompts([200, 9, 17], seed=11)
    params = SamplingParams(max_tokens=40, **GREEDY)
    eng = Engine(m, max_batch=2, max_seq_len=512)
    first = eng.generate([system + q1], SamplingParams(max_tokens=60, **GREEDY))[0]  # 268 positions cached
    assert first.cached_tokens == 0 and eng.stats["prefilled_tokens"] == 209
    before = eng.stats["prefilled_tokens"]
    second = eng.generate([system + q2], params)[0]
    assert second.cached_tokens == 192  # three full pages of the shared 200 tokens
    assert eng.stats["prefilled_tokens"] - before == 217 - 192 and eng.stats["cached_tokens"] == 192
    assert second.token_ids == reference_greedy(m, system + q2, 40)
    fresh = Engine(m, max_batch=2, max_seq_len=512).generate([system + q2], params)[0]
    assert second.token_ids == fresh.token_ids
    turn = system + q1 + first.token_ids + q2  # 286 tokens: 4 full pages cached from the first request
    third = eng.generate([turn], params)[0]
    assert third.cached_tokens == 4 * PAGE
    assert third.token_ids == reference_greedy(m, turn, 40)


def test_chunked_prefill_interleaves_with_decoding():
    """A 300-token prompt prefilled 64 tokens a step while another sequence keeps decoding (it gets a token in
    every step of the prefill); both outputs equal full forward passes."""
    m = tiny()
    short, long = prompts([6, 300], seed=12)
    eng = Engine(m, max_batch=2, max_seq_len=512, prefill_tokens=64)
    a = eng.add_request(short, SamplingParams(max_tokens=30, **GREEDY))[0]
    eng.step()
    b = eng.add_request(long, SamplingParams(max_tokens=10, **GREEDY))[0]
    steps = 0
    while not b.tokens:
        got = eng.step()
        steps += 1
        assert [s for s, _ in got] == [a] or b.tokens  # the short one decodes during every chunk
    assert steps == 5  # ceil(300 / 64) chunks, the last one samples b's first token
    while eng.has_work():
        eng.step()
    assert a.tokens == reference_greedy(m, short, 30)
    assert b.tokens == reference_greedy(m, long, 10)


def test_page_pool_prefix_cache_and_lru():
    """Named pages outlive their holders, are found by their chain of names (a prefix, never a middle), and
    are evicted least recently released first, after the free pages."""
    pool = PagePool(5)  # pages 1..4 usable
    a, c = pool.take(2), pool.take(1)
    names, other = page_hashes(list(range(200)), 2), page_hashes(list(range(1, 201)), 1)
    assert names[0] != other[0]
    pool.register(a, names)
    pool.register(c, other)
    pool.release(a)
    pool.release(c)
    assert pool.available() == 4 and pool.lookup(names) == a and pool.lookup(other) == c
    assert pool.lookup(page_hashes(list(range(64, 200)), 1)) == []  # the second page's tokens without the first
    pool.hold(c)  # a hit: held again, no longer evictable
    assert pool.available() == 3
    pool.release(c)  # c is now the most recently released
    assert pool.take(3) == [4, a[0], a[1]]
    assert pool.lookup(names) == [] and pool.lookup(other) == c and pool.available() == 1
    with pytest.raises(RuntimeError, match="asked for 2 pages"):
        pool.take(2)


def yarn_config():
    """V3's YaRN (factor 40 over 4,096 original positions, 163,840 in all) on a tiny dense model (no routing:
    no near-ties for the comparison to trip on)."""
    return get_preset("tiny").replace(
        vocab_size=VOCAB, first_k_dense_replace=3, num_nextn_predict_layers=0, max_position_embeddings=163840,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0))


def test_yarn_beyond_4k_matches_transformers_through_the_paged_cache(tmp_path):
    """Logits of a 10,001-token input: transformers' DeepseekV3 against ours three ways: the full path, a chunked
    prefill over the paged cache (4,096 tokens a chunk, each over the pages before it, pages out of order) and
    one absorbed decode step at position 10,000 over those pages; and the engine's first token after the
    10,000-token prompt."""
    cfg = yarn_config()
    torch.manual_seed(0)
    m = Transformer(cfg).init_weights(seed=0).eval()
    hf = transformers_twin(m, tmp_path / "ck")
    N = 10000
    x = torch.randint(0, VOCAB, (1, N + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits[0]
        full = m(x)[0]
        n_pages = -(-(N + 1) // PAGE)
        table = (torch.randperm(n_pages, generator=torch.Generator().manual_seed(2)) + 1)[None]
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        cache = [torch.zeros(n_pages + 1, PAGE, width) for _ in range(cfg.num_hidden_layers)]
        chunks = []
        for start in range(0, N, 4096):
            end = min(start + 4096, N)
            pos = torch.arange(start, end)[None]
            chunks.append(m(x[:, start:end], pos, cache=cache, block_table=table, prefill=True, prefix=start)[0])
        pos = torch.tensor([[N]])
        T = n_pages * PAGE
        step = m(x[:, N:], pos, cache=cache, block_table=table, attn_mask=m.cache_mask(pos, T))[0]

    def rel_err(a, b):
        return ((a - b).norm() / b.norm()).item()

    # fp32; the codebases sum in different orders (observed ~1e-6 at this length); a wrong YaRN frequency or
    # attention scale gives > 1e-2
    assert rel_err(full, ref) < 1e-4
    assert rel_err(torch.cat(chunks), ref[:N]) < 1e-4
    assert rel_err(step, ref[N:]) < 1e-4
    # the engine end to end (chunks of 4,096, then sampling): its first token is transformers' argmax, which
    # leads the runner-up by far more than the logits' error
    top = ref[N - 1].topk(2).values
    assert top[0] - top[1] > 1e-3 * ref[N - 1].abs().max()
    eng = Engine(m, max_batch=1, max_seq_len=16384, prefill_tokens=4096)
    out = eng.generate([x[0, :N].tolist()], SamplingParams(max_tokens=1, **GREEDY))[0]
    assert out.token_ids == [int(ref[N - 1].argmax())] and eng.stats["prefilled_tokens"] == N


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
@pytest.mark.parametrize("B,H,C,R,lens", [(3, 4, 32, 8, [100, 1, 64]), (2, 16, 64, 32, [300, 129]),
                                          (1, 16, 256, 32, [40])])
def test_paged_kernel_equals_softmax_attention(B, H, C, R, lens, monkeypatch):
    """The paged decode kernel against masked softmax attention over each sequence's gathered pages (fp32 on
    Triton's interpreter: 1e-5; bf16 on a GPU: 2e-2 relative), pages scattered through the pool, block tables
    wider than the longest sequence, a sequence of one position."""
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off")
    monkeypatch.setattr(kernels, "CPU_INTERPRET", not cuda)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    P = -(-max(lens) // PAGE) + 1
    pool = torch.randn(B * P + 1, PAGE, C + R, device=device).to(dtype)
    table = (torch.randperm(B * P, device=device) + 1).view(B, P)
    q = torch.randn(B, H, C + R, device=device).to(dtype)
    n = torch.tensor(lens, device=device)
    kv = pool[table].flatten(1, 2).float()  # (B, P*PAGE, C+R)
    scale = (C + R) ** -0.5
    mask = torch.arange(P * PAGE, device=device)[None] < n[:, None]
    ref = ((q.float() @ kv.transpose(1, 2)) * scale).masked_fill(~mask[:, None], float("-inf"))
    ref = ref.softmax(-1) @ kv[..., :C]
    with torch.no_grad():
        out = kernels.paged_latent_attention(q, pool, table, n, scale, C)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out - ref).norm() / ref.norm()) < tol


def interpreted_kernels(monkeypatch):
    """(device, dtype) for the Triton kernels: a GPU natively, else Triton's interpreter on the CPU."""
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off")
    monkeypatch.setattr(kernels, "CPU_INTERPRET", not cuda)
    return ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)


def test_paged_kernel_under_torch_compile(monkeypatch):
    """The paged op inside a whole-graph torch.compile (as in the engine's compiled decode step), with a block
    table that is a column slice of a wider one, its width symbolic (the engine's one graph for every width):
    the numbers it gives eagerly, at widths 3 and 4 from one graph, though the splits per sequence stop
    following the width between them."""
    device, dtype = interpreted_kernels(monkeypatch)
    monkeypatch.setitem(kernels.PAGED_ATTN, "programs", 6)  # at most 3 splits per sequence at B = 2
    torch.manual_seed(0)
    B, H, C, R = 2, 16, 64, 32
    pool = torch.randn(9, PAGE, C + R, device=device).to(dtype)
    wide = torch.tensor([[3, 1, 7, 0, 0], [2, 8, 0, 0, 0]], device=device)
    q = torch.randn(B, H, C + R, device=device).to(dtype)
    n = torch.tensor([150, 70], device=device)
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda q, t, n: kernels.paged_latent_attention(q * 1, pool, t, n, 0.1, C) + 0,
                       fullgraph=True)
    for width in (3, 4):
        table = wide[:, :width]
        torch._dynamo.mark_dynamic(table, 1)
        with torch.no_grad():
            eager = kernels.paged_latent_attention(q, pool, table, n, 0.1, C)
            compiled = fn(q, table, n)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_engine_with_the_paged_kernel_equals_the_torch_path(monkeypatch):
    """The engine's decode steps with R1LAB_ATTN_KERNEL=1 (the paged kernel reads each sequence's own pages)
    against the torch path (pages gathered to the block-table width): same greedy tokens across page
    boundaries, log-probs within fp32 rounding (interpreter; bf16 on a GPU: tokens only)."""
    device, dtype = interpreted_kernels(monkeypatch)
    m = tiny().to(device=device, dtype=dtype)
    ps = prompts([60, 3, 130], seed=14)
    sp = SamplingParams(max_tokens=8, logprobs=True, **GREEDY)
    calls, paged = [], kernels.paged_latent_attention
    monkeypatch.setattr(kernels, "paged_latent_attention", lambda *a: calls.append(1) or paged(*a))  # counts
    outs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("R1LAB_ATTN_KERNEL", on)
        outs[on] = Engine(m, max_batch=3, max_seq_len=256, compile=False).generate(ps, sp)
        assert bool(calls) == (on == "1")  # the kernel ran, and only when switched on
    for a, b in zip(outs["0"], outs["1"]):
        assert a.token_ids == b.token_ids
        if dtype == torch.float32:  # the kernel's online softmax sums in another order: observed ~1e-7
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_decode_reads_the_running_sequences_pages_not_the_capacity():
    """An eager decode step (a CPU's) runs the running sequences' rows only, over exactly the pages the longest
    of them holds; a step that must keep its shapes (compiled, graphed, or speculative) runs every slot over the
    longest's pages rounded up to a power of two (at least 2). Neither reads the 16 pages max_seq_len allows, and
    both shrink when the long sequence finishes."""
    m = tiny()
    short, long = prompts([10, 200], seed=15)
    for k in (0, 1):  # speculate=1: the fixed-shape step (tiny() has an MTP module)
        eng = Engine(m, max_batch=2, max_seq_len=1024, speculate=k)
        assert eng.pages_per_seq == 16 + k and eng._rows_only() == (k == 0)  # speculation: 2k positions more
        seen, decode, rows = [], eng._decode, eng._decode_rows
        eng._decode = lambda mode, pages: seen.append((pages, None)) or decode(mode, pages)
        eng._decode_rows = lambda mode, pages, r: seen.append((pages, sorted(r))) or rows(mode, pages, r)
        a = eng.add_request(short, SamplingParams(max_tokens=30, **GREEDY))[0]
        eng.step()
        assert seen[-1] == ((1, [a.slot]) if k == 0 else (2, None))  # 11 positions: 1 page
        b = eng.add_request(long, SamplingParams(max_tokens=3, **GREEDY))[0]
        eng.step()
        assert seen[-1] == ((4, sorted([a.slot, b.slot])) if k == 0 else (4, None))  # 200 positions: 4 pages
        while b.finish_reason is None:
            eng.step()
        eng.step()
        assert seen[-1] == ((1, [a.slot]) if k == 0 else (2, None)) and a.finish_reason is None


def test_reset_prefix_cache_after_a_weight_change():
    """The prefix cache holds latents of the weights that computed them: after the weights change (an RL step
    updates the engine's model in place) a hit would attend to stale latents and answer differently from a
    fresh engine; after reset_prefix_cache() the prompt is prefilled again and the answer is the fresh one."""
    m = tiny()
    (p,) = prompts([150], seed=16)
    params = SamplingParams(max_tokens=12, logprobs=True, **GREEDY)
    eng = Engine(m, max_batch=1, max_seq_len=256)
    eng.generate([p], params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # other latents for the same tokens
        for layer in m.model.layers:
            w = layer.self_attn.kv_a_proj_with_mqa.weight
            w.add_(torch.randn(w.shape, generator=g) * w.std())
    fresh = Engine(m, max_batch=1, max_seq_len=256).generate([p], params)[0]
    stale = eng.generate([p], params)[0]
    # what the reset prevents: log-probs off by far more than fp32 rounding (observed 1.0)
    assert stale.cached_tokens == 128
    assert not torch.allclose(torch.tensor(stale.logprobs), torch.tensor(fresh.logprobs), atol=1e-3)
    eng.reset_prefix_cache()
    again = eng.generate([p], params)[0]
    assert again.cached_tokens == 0 and again.token_ids == fresh.token_ids
    assert torch.allclose(torch.tensor(again.logprobs), torch.tensor(fresh.logprobs), atol=1e-5)
    assert eng.stats["pages_cached"] == 2  # this run's full pages, under the new weights
