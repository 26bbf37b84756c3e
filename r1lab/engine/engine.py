"""Batched generation over a paged MLA latent cache, with continuous batching.

The cache is one pool of pages of 64 positions per layer (pages.py), each position holding (latent, roped key):
576 numbers per token per layer for DeepSeek-V3, never expanded K/V. `cache_tokens` sizes the pool;
`max_seq_len` only bounds one sequence. A sequence holds a block table of pages (PagedAttention applied to MLA,
as FlashMLA does). Requests are admitted while slots (`max_batch`) and free pages last; when a decode step needs
a page the pool lacks, the youngest sequences are preempted: their pages released, and they are recomputed
later (vLLM's recompute preemption). The `n` samples of a prompt share its full pages and copy the last,
partial one; full pages released by finished sequences stay in a prefix cache (by hash of their tokens, least
recently used evicted first), so a shared system prompt or the next turn of a chat is not prefilled again.
Fresh prompts are prefilled together on the full attention path; long ones, and those with a cached prefix,
in chunks of `prefill_tokens` between decode steps, each chunk attending to the pages before it.

Every decode step runs all slots at once with static shapes (one token each, the absorbed attention path),
so it can be captured as a CUDA graph; idle slots point at a reserved page. It reads the first P columns of the
block tables, P the longest sequence's pages rounded up to a power of two, at least 2 (one CUDA graph per P;
compiled, one compilation for all P), so its cost follows the running sequences, not the capacity; with the
Triton decode kernel (R1LAB_ATTN_KERNEL=1) each sequence's attention reads only its own length.

Per step the host reads back one token (and log-prob) per slot: that copy is the loop's only synchronisation.
On a GPU it is also off the critical path (`overlap`): step N+1 is queued before the host waits for step N's
tokens, so the host's bookkeeping (appending tokens, stop checks, admitting prompts) runs while the GPU decodes.
A sequence that finished at step N then got one more token at step N+1, which is dropped.

Speculative decoding (`speculate=k`, V3 paper section 5.4.3): each step drafts k tokens per slot with the
model's multi-token-prediction (MTP) modules, then verifies them in one forward of k+1 tokens per slot over
the latent cache and keeps the accepted prefix plus one token from the target (sampling.speculative_sample:
greedy output as without speculation, sampled output distributed exactly as the target model's). Drafting
starts each step: MTP module 1 runs over the previous verify's k+1 positions (the main model's hidden states
there, and the tokens now known one ahead of them), which fills its own latent cache and gives the first draft
at the last accepted position; deeper drafts come from modules 2.. in the same way, then from the last module
again, one position at a time, fed its own output (as SGLang's NextN does when k exceeds the modules). Every
shape is static (k+1 tokens per slot, acceptance applied by gathers and masks), so the step can be graphed as
the plain one is. Rejected positions leave junk in both caches, overwritten before any query sees it. The MTP
caches are pools paged by the same block tables, and a prefill (whole or chunked) fills them at the prompt's
positions. With speculation the prefix cache is off: a cached page's MTP latent at its last position depends on
the token after the page, which its hash does not cover.
"""

from __future__ import annotations

import random
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.moe import host_sync
from .pages import PAGE, PagePool, page_hashes
from .sampling import draft_sample, sample, speculative_sample


@dataclass
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: list[str] | str | None = None  # stop strings: the text is cut before the first one
    stop_token_ids: list[int] | None = None  # in addition to the end-of-sequence token
    ignore_eos: bool = False
    n: int = 1  # samples per prompt (they share one prefill)
    seed: int | None = None  # None: a fresh random seed; sample i of a prompt uses seed + i
    logprobs: bool = False  # return the fp32 log-prob of each sampled token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [("temperature", self.temperature >= 0, "must be >= 0"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
                  ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
                  ("n", self.n >= 1, "must be >= 1")]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {why} (got {getattr(self, name)!r})")


@dataclass
class Completion:
    """One generated sample. token_ids include the stop token that ended it, if any; text does not."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (stop token or string), "length" (max_tokens) or "abort" (Engine.abort)
    logprobs: list[float] | None
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not prefilled again)


@dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    prompt_index: int
    sample_index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1
    finish_reason: str | None = None
    stop_text_at: int | None = None
    pages: list[int] = field(default_factory=list)  # its block table: page i holds positions 64i..64i+63
    order: int = 0  # admission counter (preemption takes the largest)
    cached_tokens: int | None = None  # prefix-cache hits at its first admission (None: not admitted yet)


@dataclass
class _Chunk:
    """A group whose context is being prefilled in chunks: its slots are reserved, its pages taken."""

    group: list[_Seq]
    slots: list[int]
    ctx: list[int]
    pages: list[int]
    done: int  # context positions in the cache so far


class Engine:
    """Generation for one model: `Engine(model, tokenizer).generate(prompts, SamplingParams(...))`.

    max_batch: sequences decoded together (slots); max_seq_len: positions one sequence may use, prompt +
    generated (default: the model's full context); cache_tokens: positions the paged latent pool holds, all
    sequences together, one page of 64 reserved (default: on a GPU, the smaller of half the free memory and
    max_batch full-length sequences; on a CPU, the smaller of 262,144 and max_batch full-length sequences);
    prefix_cache: keep released full pages for later prompts with the same prefix (default: on, except with
    speculation); cuda_graph: capture the decode step (default: on for CUDA models, except where the routed
    experts read their counts back to the host, `moe.host_sync`, e.g. fp32 experts on a GPU); compile:
    torch.compile the model's decode forward first (fuses its small kernels; ~30 s per engine and sampler mode;
    default: on for CUDA models, and a failed compilation falls back to eager with a warning); prefill_tokens:
    prompt tokens prefilled per step (fresh prompts are batched; longer ones, and those with a prefix-cache hit,
    are prefilled in chunks of this size between decode steps); overlap: queue the next decode step before reading
    this one's tokens (default: on for CUDA models; `step()` then returns each decode token one call later);
    speculate: draft this many tokens per step with the MTP module(s) and verify them in one forward (0 = off; the
    model needs an MTP module). `stats` counts steps, drafted and accepted tokens, pool use, prefix-cache hits and
    preemptions. After changing the model's weights, call `reset_prefix_cache()`.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 32, max_seq_len: int | None = None,
                 cache_tokens: int | None = None, cuda_graph: bool | None = None, compile: bool | None = None,
                 prefill_tokens: int = 16384, overlap: bool | None = None, speculate: int = 0,
                 prefix_cache: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        if self.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
        self.device = model.device
        self.eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        why = host_sync(model) if self.cuda_graph else None
        if why and cuda_graph:
            raise ValueError(f"cuda_graph=True: a decode step cannot be captured, since {why}")
        if why:  # e.g. a small fp32 model on a GPU: decode eagerly rather than fail at the first capture
            warnings.warn(f"decode steps run without CUDA graphs: {why}")
            self.cuda_graph = False
        B, dev = max_batch, self.device
        if speculate < 0 or (speculate and not len(model.mtp)):
            raise ValueError(f"speculate={speculate}: must be >= 0, and > 0 needs a model with an MTP module "
                             f"(this one has num_nextn_predict_layers={cfg.num_nextn_predict_layers})")
        self.speculate = k = speculate
        # Pages one sequence's block table holds. Speculation writes up to k positions past a sequence's last,
        # and with `overlap` one more step of k+1 after it finished: 2k more positions.
        self.pages_per_seq = -(-(self.max_seq_len + 2 * k) // PAGE)
        self.cache_len = self.pages_per_seq * PAGE  # positions one block table addresses
        n_mtp = min(k, len(model.mtp))
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        per_token = (cfg.num_hidden_layers + n_mtp) * width * model.dtype.itemsize
        if cache_tokens is None:  # never more than max_batch full-length sequences need
            cache_tokens = max(262144, self.cache_len + PAGE)
            if dev.type == "cuda":  # half of what is free after the weights: room for activations and graphs
                cache_tokens = torch.cuda.mem_get_info(dev)[0] // 2 // per_token
            cache_tokens = min(cache_tokens, max_batch * self.cache_len + PAGE)
        num_pages = cache_tokens // PAGE
        if num_pages - 1 < self.pages_per_seq:
            raise ValueError(f"cache_tokens {cache_tokens} is smaller than one max_seq_len sequence: the pool holds "
                             f"{max(num_pages - 1, 0) * PAGE} positions (besides one reserved page of {PAGE}) and one "
                             f"sequence of max_seq_len {self.max_seq_len} may need {self.cache_len}; raise "
                             f"cache_tokens to at least {self.cache_len + PAGE} or lower max_seq_len")
        self.cache_tokens = num_pages * PAGE
        self.cache = [torch.zeros(num_pages, PAGE, width, dtype=model.dtype, device=dev)
                      for _ in range(cfg.num_hidden_layers)]
        self.pool = PagePool(num_pages, prefix_cache=not k if prefix_cache is None else prefix_cache)
        if k and self.pool.prefix_cache:
            raise ValueError("prefix_cache needs speculate=0: the MTP caches of a cached prefix are not kept")
        # Each slot's pages, as the decode step reads them; unused entries point at the reserved page 0. One spare
        # column, never used: no decode step's view of the first columns (_table) then spans whole rows, so the
        # views of all widths are laid out alike (none contiguous) and one compiled step serves them all.
        self.block_table = torch.zeros(B, self.pages_per_seq + 1, dtype=torch.long, device=dev)
        # Static per-slot state read by the decode step.
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(B, device=dev)
        self.top_p = torch.ones(B, device=dev)
        self.top_k = torch.zeros(B, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(B, dtype=torch.long, device=dev)
        self._state = [self.tok, self.pos]  # what a decode step advances (restored after graph warm-up)
        if k:
            # Per slot, what drafting needs from the last verify (or prefill): the main model's hidden states at
            # its k+1 positions `prev_pos` + 0..k, the token one ahead of each (valid up to the accepted index
            # `acc`), and one latent pool per MTP module used, paged by the same block tables.
            self.mtp_cache = [torch.zeros(num_pages, PAGE, width, dtype=model.dtype, device=dev)
                              for _ in range(n_mtp)]
            self.hid = torch.zeros(B, k + 1, cfg.hidden_size, dtype=model.dtype, device=dev)
            self.ahead = torch.zeros(B, k + 1, dtype=torch.long, device=dev)
            self.prev_pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.acc = torch.zeros(B, dtype=torch.long, device=dev)
            self.offsets = torch.arange(k + 1, device=dev)
            self._state += [self.hid, self.ahead, self.prev_pos, self.acc]
        self._counts = {"decode_steps": 0, "sequence_steps": 0, "drafted": 0, "accepted": 0, "prompt_tokens": 0,
                        "cached_tokens": 0, "prefilled_tokens": 0, "preemptions": 0}
        self.slots: list[_Seq | None] = [None] * B
        self.waiting: deque[list[_Seq]] = deque()  # groups of n samples of one prompt
        self._chunks: list[_Chunk] = []  # groups being prefilled in chunks (their slots are reserved)
        self._admitted = 0  # admission counter: preemption takes the youngest sequence
        self._graphs: dict[tuple, tuple] = {}
        self._graph_pool = None  # one memory pool for all captured steps (they never run concurrently)
        self.prefill_tokens = prefill_tokens
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._inflight: tuple | None = None  # a decode step queued but not yet read: (sequences, outputs, event)
        if self.device.type == "cuda":  # two pinned buffers, alternately, for the tokens and log-probs read back
            shape = (B, k + 1) if k else (B,)  # (and with speculation, the accepted counts)
            self._host = [(torch.empty(shape, dtype=torch.long, pin_memory=True),
                           torch.empty(shape, dtype=torch.float32, pin_memory=True))
                          + ((torch.empty(B, dtype=torch.long, pin_memory=True),) if k else ()) for _ in range(2)]
        # torch.compile of the whole decode step (model + sampler: the sampler's noise over the vocabulary is
        # ~20 elementwise passes over (B, vocab) when eager), or, should that fail, of the model's forward only.
        compile = self.device.type == "cuda" if compile is None else compile
        self._set_compile("step" if compile else "off")

    def _set_compile(self, mode: str) -> None:
        """mode "step": compile forward + sampling; "forward": the model's forward only; "off": eager.

        One compiled variant per sampler mode serves every block-table width: the width is marked dynamic
        (_table). Every other size stays static, the kernels specialised to the batch and the model: automatic
        dynamic shapes are off, so an engine of another batch size compiles a variant of its own rather than
        turn the batch dimension symbolic in the first one's."""
        self._compile_mode = mode
        forward = self._verify_forward if self.speculate else self._forward
        step = self._speculative_eager if self.speculate else self._decode_eager

        def compiled(fn):
            return torch._dynamo.config.patch(automatic_dynamic_shapes=False)(torch.compile(fn))

        self._forward_fn = compiled(forward) if mode == "forward" else forward
        self._step_fn = compiled(step) if mode == "step" else step

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, params: SamplingParams | None = None, on_token=None) -> list[Completion]:
        """Generate for each prompt (token-id lists, or strings when the engine has a tokenizer).

        Returns one Completion per prompt and sample, ordered by prompt then sample.
        on_token(prompt_index, sample_index, token_id) is called as tokens are produced (for streaming).
        """
        params = params or SamplingParams()
        seqs = [s for i, p in enumerate(prompts) for s in self.add_request(p, params, prompt_index=i)]
        while self.has_work():
            for s, t in self.step():
                if on_token is not None:
                    on_token(s.prompt_index, s.sample_index, t)
        return [self.completion(s) for s in seqs]

    def add_request(self, prompt, params: SamplingParams, prompt_index: int = 0) -> list[_Seq]:
        """Queue one prompt's n samples; they are admitted when slots and pages are free."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an Engine with a tokenizer; pass token ids instead")
            prompt = self.tokenizer.encode(prompt)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"prompt {prompt_index} is empty")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt {prompt_index} has token ids outside [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt {prompt_index}: {len(prompt)} prompt tokens + max_tokens {params.max_tokens} "
                             f"exceed the engine's max_seq_len {self.max_seq_len}")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} samples exceed the engine's max_batch {self.max_batch}")
        if self._admission_pages(len(prompt), params.n, 0) > self.pool.num_pages - 1:
            raise ValueError(f"prompt {prompt_index}: {params.n} samples of {len(prompt)} tokens need more pages "
                             f"than the pool's {self.pool.num_pages - 1}; raise cache_tokens or lower n")
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        group = [_Seq(prompt, params, prompt_index, i, (seed + i) & 0x7FFFFFFF) for i in range(params.n)]
        self.waiting.append(group)
        return group

    def abort(self, seqs: list[_Seq]) -> None:
        """Stop sequences (e.g. their client disconnected): free their slots and pages or drop them from the
        queue."""
        for s in seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
            if s.slot >= 0 and self.slots[s.slot] is s:
                self._free(s.slot)
        self.waiting = deque(kept for g in self.waiting if (kept := [s for s in g if s.finish_reason is None]))
        for c in [c for c in self._chunks if all(s.finish_reason is not None for s in c.group)]:
            self._chunks.remove(c)
            self.pool.release(c.pages)

    @property
    def stats(self) -> dict:
        """Counters since the engine was built: decode steps, sequence-steps (one sequence in one step),
        drafted and accepted tokens; acceptance_rate = accepted / drafted; tokens_per_step = tokens a sequence
        gets from one decode step on average (1 without speculation, up to k+1); slots busy and sequences queued;
        the pool: cache_tokens, pages total / used / cached (held by nobody, kept for the prefix cache) / free;
        prompt_tokens admitted, cached_tokens of them found in the prefix cache, prefilled_tokens computed
        (recomputation after a preemption included), preemptions.
        Safe to read from another thread (a server's health check) while the engine's thread steps."""
        c, slots, waiting = dict(self._counts), list(self.slots), list(self.waiting)  # copies: C-level, atomic
        steps = max(c["sequence_steps"], 1)
        free, idle = len(self.pool.free), len(self.pool.idle)
        total = self.pool.num_pages - 1
        return {"speculate": self.speculate, **c,
                "acceptance_rate": c["accepted"] / c["drafted"] if c["drafted"] else None,
                "accepted_per_step": c["accepted"] / steps,
                "tokens_per_step": (c["accepted"] + c["sequence_steps"]) / steps if c["sequence_steps"] else None,
                "slots_busy": sum(s is not None for s in slots), "max_batch": self.max_batch,
                "waiting": sum(len(g) for g in waiting), "cache_tokens": self.cache_tokens, "page_size": PAGE,
                "pages_total": total, "pages_used": total - free - idle, "pages_cached": idle, "pages_free": free,
                "cache_use": (total - free - idle) / total}

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix. Call it after changing the model's weights (an RL step): cached pages hold
        latents of the old weights, which a later prompt with the same prefix would otherwise attend to."""
        self.pool.forget()

    def has_work(self) -> bool:
        return (bool(self.waiting) or bool(self._chunks) or any(s is not None for s in self.slots)
                or self._inflight is not None)

    @torch.no_grad()
    def step(self) -> list[tuple[_Seq, int]]:
        """Admit waiting prompts into free slots (prefill, or the next chunk of a long one), then one decode
        step for every running sequence. Returns the (sequence, token) pairs produced: with `overlap`, the decode
        tokens of the previous call's step (this call's is then in flight)."""
        produced = self._admit()
        running = [s for s in self.slots if s is not None]
        pages = self._make_room(running) if running else 0
        running = [s for s in self.slots if s is not None]  # less any preempted
        launched = self._launch(running, pages) if running else None
        if self._inflight is not None:
            produced += self._collect(*self._inflight)
        self._inflight = launched
        if launched is not None and not self.overlap:
            produced += self._collect(*launched)
            self._inflight = None
        return produced

    def _launch(self, running: list[_Seq], pages: int) -> tuple:
        """Queue one decode step for every slot; its outputs are copied to host memory without waiting."""
        # which sampler the step needs (each a graph of its own): greedy only, plain sampling, or top-p/k
        if all(s.params.temperature == 0 for s in running):
            mode = "greedy"
        else:
            mode = "filter" if any(s.params.top_p < 1 or s.params.top_k > 0 for s in running) else "sample"
        # tokens, log-probs (and with speculation, accepted counts)
        outs = (self._decode_rows(mode, pages, [s.slot for s in running]) if self._rows_only()
                else self._decode(mode, pages))
        running = [(s, s.slot) for s in running]  # the slot the step ran it in (kept if it is preempted)
        if self.device.type != "cuda":
            return running, tuple(o.clone() for o in outs), None
        self._host.reverse()
        out = self._host[0]
        for host, o in zip(out, outs):
            host.copy_(o, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return running, out, done

    def _collect(self, running: list[_Seq], out: tuple, done) -> list[tuple[_Seq, int]]:
        """Read a launched step's tokens (the one host sync per step) and hand them to their sequences. A
        sequence preempted after the step was launched still gets its token: the step read its pages before
        any later work could reuse them (one stream), and its recomputation then includes that token."""
        if done is not None:
            done.synchronize()
        nxt, lp = out[0].tolist(), out[1].tolist()
        acc = out[2].tolist() if self.speculate else None
        produced, c = [], self._counts
        c["decode_steps"] += 1
        for s, slot in running:
            if s.finish_reason is not None:  # finished (or aborted) since the step was launched
                continue
            c["sequence_steps"] += 1
            if not self.speculate:
                produced.append((s, nxt[slot]))
                self._append(s, nxt[slot], lp[slot])
                continue
            a = acc[slot]
            c["drafted"] += self.speculate
            c["accepted"] += a
            for t, logprob in zip(nxt[slot][: a + 1], lp[slot][: a + 1]):
                produced.append((s, t))
                self._append(s, t, logprob)
                if s.finish_reason is not None:  # stop token or string, or max_tokens: drop the rest
                    break
        return produced

    # ------------------------------------------------------------------ pages
    def _admission_pages(self, length: int, n: int, hit: int) -> int:
        """New pages to admit n samples of a `length`-token context whose first `hit` pages are cached: the
        context's pages once, plus for each further sample its own copy of the pages its decoding writes to
        (the last, partial one; with speculation the MTP caches write from position length-1 on)."""
        pages = -(-length // PAGE)
        shared = (length - (1 if self.speculate else 0)) // PAGE
        return pages - hit + (n - 1) * (pages - shared)

    def _need(self, s: _Seq, inflight: set[int]) -> int:
        """Pages sequence s must hold before the next decode step: every position that step may write. Its
        last token sits at len(prompt) + len(tokens) - 1; a step still in flight advances it by up to k+1, and
        this step writes k positions further (speculation)."""
        k = self.speculate
        end = len(s.prompt) + len(s.tokens) + k + ((k + 1) if id(s) in inflight else 0)
        return min(-(-end // PAGE), self.pages_per_seq)

    def _make_room(self, running: list[_Seq]) -> int:
        """Give running sequences the pages the next step writes to, preempting the youngest sequences while
        the pool is short (vLLM's recompute preemption: their pages are released, into the prefix cache where
        full, and they wait at the head of the queue). Returns the block-table width the step reads: the
        longest sequence's pages, rounded up to a power of two (one CUDA graph per width), at least 2."""
        inflight = {id(s) for s, _ in self._inflight[0]} if self._inflight is not None else set()
        while True:
            want = sum(max(0, self._need(s, inflight) - len(s.pages)) for s in running)
            if want <= self.pool.available():
                break
            victim = max(running, key=lambda s: s.order)
            running.remove(victim)
            self._free(victim.slot)
            self.waiting.appendleft([victim])
            self._counts["preemptions"] += 1
        rows, cols, ids = [], [], []
        for s in running:
            grow = self._need(s, inflight) - len(s.pages)
            if grow > 0:
                new = self.pool.take(grow)
                rows += [s.slot] * grow
                cols += range(len(s.pages), len(s.pages) + grow)
                ids += new
                s.pages += new
        if ids:  # one small copy: [rows; cols; pages]
            at = torch.tensor([rows, cols, ids])
            if self.device.type == "cuda":  # pinned and asynchronous: a pageable copy would wait for the GPU
                at = at.pin_memory().to(self.device, non_blocking=True)
            self.block_table[at[0], at[1]] = at[2]
        longest = max(len(s.pages) for s in running) if running else 1
        if self._rows_only():  # eager: no graph to reuse, so read exactly the pages the longest sequence holds
            return longest
        # not 1: torch.compile takes a size of 1 for a constant, and would compile that width a graph of its own
        return min(max(2, 1 << (longest - 1).bit_length()), self.pages_per_seq)

    def _release(self, s: _Seq) -> None:
        """Let go of s's pages, naming its full ones for the prefix cache first. The cache holds positions
        0..len(prompt)+len(tokens)-2: the last token is written by the step that would have come next."""
        if s.pages and self.pool.prefix_cache:
            ctx = s.prompt + s.tokens
            full = min((len(ctx) - 1) // PAGE, len(s.pages))
            self.pool.register(s.pages[:full], page_hashes(ctx, full))
        self.pool.release(s.pages)
        s.pages = []

    # ------------------------------------------------------------------ admission and prefill
    def _free_slots(self, batch: list) -> list[int]:
        """Slots neither running, nor reserved by a chunked prefill or by the batch being admitted."""
        reserved = {i for c in self._chunks for i in c.slots} | {i for _, slots, _, _ in batch for i in slots}
        return [i for i, s in enumerate(self.slots) if s is None and i not in reserved]

    def _admit(self) -> list[tuple[_Seq, int]]:
        """Prefill: first the next chunks of prompts being prefilled in pieces, then waiting prompts in order
        while slots, pages and the step's prefill budget last (a prompt that does not fit waits, and so does
        everything behind it). Fresh prompts that fit the budget are prefilled together in one batched forward;
        longer ones and those with a prefix-cache hit become chunked prefills (one sequence per forward)."""
        produced, budget = [], self.prefill_tokens
        for c in list(self._chunks):
            if budget <= 0:
                break
            budget -= self._prefill_chunk(c, budget, produced)
        batch = []
        while self.waiting:
            group = [s for s in self.waiting[0] if s.finish_reason is None]
            if not group:
                self.waiting.popleft()
                continue
            free = self._free_slots(batch)
            if len(group) > len(free):
                break
            ctx = group[0].prompt + group[0].tokens  # a preempted sequence recomputes its tokens too
            hit = self.pool.lookup(page_hashes(ctx, (len(ctx) - 1) // PAGE)) if not self.speculate else []
            idle_hits = sum(self.pool.ref[p] == 0 for p in hit)
            if self._admission_pages(len(ctx), len(group), len(hit)) > self.pool.available() - idle_hits:
                break
            chunked = bool(hit) or len(ctx) > self.prefill_tokens
            if not chunked and batch and len(ctx) > budget:
                break
            self.waiting.popleft()
            self.pool.hold(hit)
            pages = hit + self.pool.take(-(-len(ctx) // PAGE) - len(hit))
            slots = free[: len(group)]
            for s in group:
                s.order, self._admitted = self._admitted, self._admitted + 1
            if group[0].cached_tokens is None:  # first admission: count the prompt and its cache hits
                group[0].cached_tokens = len(hit) * PAGE
                self._counts["prompt_tokens"] += len(ctx)
                self._counts["cached_tokens"] += len(hit) * PAGE
            if chunked:
                c = _Chunk(group, slots, ctx, pages, done=len(hit) * PAGE)
                self._chunks.append(c)
                if budget > 0:
                    budget -= self._prefill_chunk(c, budget, produced)
            else:
                batch.append((group, slots, ctx, pages))
                budget -= len(ctx)
        if batch:
            produced += self._prefill_batch(batch)
        return produced

    def _prefill_chunk(self, c: "_Chunk", budget: int, produced: list) -> int:
        """The next chunk (up to `budget` tokens) of a chunked prefill, attending to the positions already
        cached; after the last chunk the group starts decoding. Returns the tokens computed."""
        n = min(budget, len(c.ctx) - c.done)
        dev = self.device
        ids = torch.tensor([c.ctx[c.done: c.done + n]], device=dev)
        pos = torch.arange(c.done, c.done + n, device=dev)[None]
        table = torch.tensor([c.pages], device=dev)
        h = self.model(ids, pos, cache=self.cache, block_table=table, prefill=True, prefix=c.done,
                       return_hidden=True)
        if self.speculate:  # the MTP caches at this chunk's positions, up to the context's second-to-last
            m = min(n, len(c.ctx) - 1 - c.done)  # (the last one is the first draft's, as after a whole prefill)
            if m > 0:
                self._fill_mtp(h[:, :m], torch.tensor([c.ctx], device=dev), pos[:, :m], table, prefix=c.done)
        c.done += n
        self._counts["prefilled_tokens"] += n
        if c.done == len(c.ctx):
            self._chunks.remove(c)
            group = [s for s in c.group if s.finish_reason is None]
            if not group:
                self.pool.release(c.pages)
            else:
                produced += self._start([(group, c.slots, c.ctx, c.pages)], self.model.lm_head(h[:, -1]),
                                        h[:, -1] if self.speculate else None)
        return n

    def _fill_mtp(self, h: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, table: torch.Tensor,
                  prefix: int = 0) -> None:
        """Write the MTP caches at positions pos (B, S) of a prefill: module d reads the main model's hidden
        states h (B, S, D) (module 0) or module d-1's outputs, and the token d+1 ahead of each position, taken
        from ids (B, P), the whole contexts from position 0 (0 past their end: junk that decoding overwrites
        before any query reads it)."""
        P = ids.shape[1]
        prev = h
        for d, c in enumerate(self.mtp_cache):
            at = (pos + d + 1).clamp(max=P - 1)
            ahead = torch.where(pos + d + 1 < P, ids.gather(1, at), 0)
            prev = self.model.mtp_forward(d, prev, ahead, pos, cache=c, block_table=table, prefill=True,
                                          prefix=prefix)

    def _prefill_batch(self, batch: list) -> list[tuple[_Seq, int]]:
        """One right-padded prefill of several fresh prompts on the full attention path, writing each prompt's
        latents into its pages."""
        dev = self.device
        lens = [len(ctx) for _, _, ctx, _ in batch]
        P = max(lens)
        ids = torch.zeros(len(batch), P, dtype=torch.long)
        table = torch.zeros(len(batch), -(-P // PAGE), dtype=torch.long)
        for i, (_, _, ctx, pages) in enumerate(batch):
            ids[i, : lens[i]] = torch.tensor(ctx)
            table[i, : len(pages)] = torch.tensor(pages)
        ids, table = ids.to(dev), table.to(dev)
        pos = torch.arange(P, device=dev).expand(len(batch), P)
        # Pad positions write junk past a prompt's end: into its last page (decoding overwrites position p before
        # any query sees it) or the reserved page 0.
        h = self.model(ids, pos, cache=self.cache, block_table=table, prefill=True, return_hidden=True)
        self._counts["prefilled_tokens"] += sum(lens)
        if self.speculate and P > 1:  # fill the MTP caches at positions 0..P-2 (decoding's first draft does P-1)
            self._fill_mtp(h[:, :-1], ids, pos[:, :-1], table)
        last = torch.tensor(lens, device=dev) - 1
        rows = torch.arange(len(batch), device=dev)
        return self._start(batch, self.model.lm_head(h[rows, last]), h[rows, last] if self.speculate else None)

    def _start(self, batch: list, logits: torch.Tensor, h_last: torch.Tensor | None) -> list[tuple[_Seq, int]]:
        """Groups whose context is prefilled (batch: (group, slots, context, pages); logits (G, V) at each
        context's last position) start decoding: the first sample takes the pages, the others share the full
        ones and get a copy of the rest; one sampling call for all; slots and block tables set."""
        dev = self.device
        seqs, copies = [], []  # (row, sequence, slot, context length); (destination page, source page)
        for gi, (group, slots, ctx, pages) in enumerate(batch):
            shared = (len(ctx) - (1 if self.speculate else 0)) // PAGE
            for j, (s, slot) in enumerate(zip(group, slots)):
                if j == 0:
                    s.pages = list(pages)
                else:
                    self.pool.hold(pages[:shared])
                    own = self.pool.take(len(pages) - shared)
                    copies += zip(own, pages[shared:])
                    s.pages = pages[:shared] + own
                seqs.append((gi, s, slot, len(ctx)))
        if copies:  # one copy per pool for all of them
            dst, src = (torch.tensor(x, device=dev) for x in zip(*copies))
            for c in self.cache + (self.mtp_cache if self.speculate else []):
                c[dst] = c[src]
        params = [s.params for _, s, _, _ in seqs]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
        seeds = torch.tensor([s.seed for _, s, _, _ in seqs], dtype=torch.long, device=dev)
        position = torch.tensor([n for _, _, _, n in seqs], dtype=torch.long, device=dev)
        gi = torch.tensor([gi for gi, _, _, _ in seqs], device=dev)
        # One sampling call for all of them, in one sampler mode as a decode step is: a row without top-p/k in
        # the filter mode loses only tokens behind fp32-rounded mass of 1, i.e. of probability below ~1e-7.
        tokens, lps = sample(logits[gi], temperature, top_p, top_k, seeds, position,
                             filter_top=any(p.top_p < 1 or p.top_k > 0 for p in params),
                             greedy_only=all(p.temperature == 0 for p in params))
        slots = torch.tensor([slot for _, _, slot, _ in seqs], device=dev)
        table = torch.zeros(len(seqs), self.block_table.shape[1], dtype=torch.long)
        for i, (_, s, _, _) in enumerate(seqs):
            table[i, : len(s.pages)] = torch.tensor(s.pages)
        self.block_table[slots] = table.to(dev)
        self.tok[slots, 0] = tokens
        self.pos[slots, 0] = position
        self.active[slots, 0] = 1
        self.temperature[slots], self.top_p[slots], self.top_k[slots], self.seeds[slots] = (
            temperature, top_p, top_k, seeds)
        if self.speculate:  # drafting starts from the last prompt position, with the first token one ahead
            self.hid[slots, 0] = h_last[gi]
            self.ahead[slots, 0] = tokens
            self.prev_pos[slots, 0] = position - 1
            self.acc[slots] = 0
        produced = []
        for (_, s, slot, _), t, lp in zip(seqs, tokens.tolist(), lps.tolist()):
            s.slot = slot
            self.slots[slot] = s
            produced.append((s, t))
            self._append(s, t, lp)
        return produced

    def _append(self, s: _Seq, token: int, logprob: float) -> None:
        s.tokens.append(token)
        s.logprobs.append(logprob)
        p = s.params
        if (token == self.eos_id and not p.ignore_eos) or (p.stop_token_ids and token in p.stop_token_ids):
            s.finish_reason = "stop"
        elif p.stop and self.tokenizer is not None and self._hits_stop_string(s):
            s.finish_reason = "stop"
        elif len(s.tokens) >= p.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason is not None and s.slot >= 0 and self.slots[s.slot] is s:
            self._free(s.slot)

    def _free(self, slot: int) -> None:
        """Empty a slot: its sequence's pages are released, and the slot decodes harmlessly at position 0 of
        the reserved page until it is filled again."""
        self._release(self.slots[slot])
        self.slots[slot] = None
        self.active[slot, 0] = 0
        self.pos[slot, 0] = 0
        self.block_table[slot] = 0
        if self.speculate:
            self.prev_pos[slot, 0] = 0
            self.acc[slot] = 0

    def _hits_stop_string(self, s: _Seq) -> bool:
        longest = max(len(x) for x in s.params.stop)
        tail = self.tokenizer.decode(s.tokens[-(longest + 4):])
        return any(x in tail for x in s.params.stop)

    def _forward(self, tok: torch.Tensor, pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.model(tok, pos, cache=self.cache, block_table=table,
                          attn_mask=self.model.cache_mask(pos, table.shape[1] * PAGE))[:, -1]

    def _decode_eager(self, mode: str, table: torch.Tensor):
        """One decode step of every slot over `table`, the first columns of the block table (_table)."""
        logits = self._forward_fn(self.tok, self.pos, table)
        nxt, lp = sample(logits, self.temperature, self.top_p, self.top_k, self.seeds, self.pos[:, 0] + 1,
                         filter_top=mode == "filter", greedy_only=mode == "greedy")
        # advance running slots on the device, so the next step needs no host-built inputs
        self.tok.copy_(nxt[:, None])
        self.pos.add_(self.active)
        return nxt, lp

    def _rows_only(self) -> bool:
        """Whether decode steps run only the running sequences' rows (`_decode_rows`): eager steps without
        speculation. A graph or compiled step keeps every slot, so that its shapes stay fixed."""
        return not self.cuda_graph and self._compile_mode == "off" and not self.speculate

    def _decode_rows(self, mode: str, pages: int, rows: list[int]):
        """`_decode_eager` for the slots `rows` only, over their first `pages` block-table columns: an eager step
        (a CPU's) then costs what the running sequences need, not max_batch full rows. In a GRPO rollout the
        batch empties as completions end, and the pages gathered for attention were the longest's for every
        slot (measured on the speedrun's reasoning RL, one AMD EPYC thread: LOG, twentieth session). Each row's
        sampling noise depends only on its seed and position, so a row samples what it would in the full batch
        from the same logits. Returns tokens and log-probs over all slots (0 where not run), as the full step."""
        idx = torch.tensor(rows, device=self.device)
        tok, pos = self.tok.index_select(0, idx), self.pos.index_select(0, idx)
        logits = self._forward_fn(tok, pos, self.block_table.index_select(0, idx)[:, :pages])
        nxt, lp = sample(logits, self.temperature[idx], self.top_p[idx], self.top_k[idx], self.seeds[idx],
                         pos[:, 0] + 1, filter_top=mode == "filter", greedy_only=mode == "greedy")
        self.tok.index_copy_(0, idx, nxt[:, None])
        self.pos.index_add_(0, idx, self.active.index_select(0, idx))
        out_tok = torch.zeros(self.max_batch, dtype=nxt.dtype, device=self.device)
        out_lp = torch.zeros(self.max_batch, dtype=lp.dtype, device=self.device)
        return out_tok.index_copy_(0, idx, nxt), out_lp.index_copy_(0, idx, lp)

    def _verify_forward(self, tok: torch.Tensor, pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, k+1) tokens at positions (B, k+1) -> the main model's final hidden states (B, k+1, D)."""
        return self.model(tok, pos, cache=self.cache, block_table=table,
                          attn_mask=self.model.cache_mask(pos, table.shape[1] * PAGE), return_hidden=True)

    def _draft(self, mode: str, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k draft tokens per slot (B, k) and their log draft distributions (B, k, V) (None when greedy), over
        the step's block-table columns `table`."""
        k, n_mtp, model, width = self.speculate, len(self.mtp_cache), self.model, table.shape[1] * PAGE
        rows = torch.arange(self.max_batch, device=self.device)
        opts = dict(filter_top=mode == "filter", greedy_only=mode == "greedy")
        at = self.prev_pos + self.offsets  # (B, k+1): the last verify's positions
        mask = model.cache_mask(at, width)
        prev, ahead = self.hid, self.ahead
        drafts, logqs = [], []
        for d in range(k):
            if d < n_mtp:  # module d over the last verify's positions; its draft is at the last accepted one
                prev = model.mtp_forward(d, prev, ahead, at, attn_mask=mask, cache=self.mtp_cache[d],
                                         block_table=table)  # (B, k+1, D)
                last = prev[rows, self.acc]  # (B, D)
            else:  # the last module again, one position further, fed its own output and the previous draft
                p1 = self.prev_pos + self.acc[:, None] + 1 + d - n_mtp  # (B, 1)
                last = model.mtp_forward(n_mtp - 1, last[:, None], drafts[-1][:, None], p1,
                                         attn_mask=model.cache_mask(p1, width),
                                         cache=self.mtp_cache[-1], block_table=table)[:, 0]
            # draft d is the token at pos + 1 + d (pos: the last committed token's position)
            tok, logq = draft_sample(model.mtp_logits(min(d, n_mtp - 1), last), self.temperature, self.top_p,
                                     self.top_k, self.seeds, self.pos[:, 0] + 1 + d, **opts)
            drafts.append(tok)
            logqs.append(logq)
            if d + 1 < n_mtp:  # the next module reads one token further ahead: shift, this draft at the end
                ahead = torch.cat([ahead[:, 1:], ahead[:, :1]], dim=1).scatter(1, self.acc[:, None], tok[:, None])
        return torch.stack(drafts, 1), None if mode == "greedy" else torch.stack(logqs, 1)

    def _speculative_eager(self, mode: str, table: torch.Tensor):
        """One speculative step for every slot: draft k, verify k+1, advance each slot by what it accepted."""
        drafts, logq = self._draft(mode, table)
        ids = torch.cat([self.tok, drafts], dim=1)  # (B, k+1): the last committed token, then the drafts
        at = self.pos + self.offsets  # (B, k+1)
        h = self._forward_fn(ids, at, table)
        tokens, lps, acc = speculative_sample(
            self.model.lm_head(h), drafts, logq, self.temperature, self.top_p, self.top_k, self.seeds,
            self.pos[:, 0] + 1, filter_top=mode == "filter", greedy_only=mode == "greedy")
        # advance on the device (the next step needs no host-built inputs): the next draft starts from here
        self.hid.copy_(h)
        self.ahead.copy_(tokens)  # index i holds the token after position at[:, i], valid up to acc
        self.prev_pos.copy_(self.pos)
        self.acc.copy_(acc)
        self.tok.copy_(tokens.gather(1, acc[:, None]))
        self.pos.add_(self.active * (acc[:, None] + 1))
        return tokens, lps, acc

    def _decode(self, mode: str, pages: int):
        if not self.cuda_graph:
            return self._step_fn(mode, self._table(pages))
        while (mode, pages) not in self._graphs:
            try:
                self._graphs[mode, pages] = self._capture(mode, pages)
            except Exception as e:  # noqa: BLE001 - any compiler failure: keep generating, with less compiled
                if self._compile_mode == "off":
                    raise
                fallback = "forward" if self._compile_mode == "step" else "off"
                warnings.warn(f"torch.compile of the decode {'step' if fallback == 'forward' else 'forward'} failed "
                              f"({type(e).__name__}: {str(e)[:200]}); falling back to compile={fallback!r}")
                self._set_compile(fallback)
                self.reset_graphs()
        graph, out = self._graphs[mode, pages]
        graph.replay()
        return out

    def _table(self, pages: int) -> torch.Tensor:
        """The first `pages` columns of every slot's block table, which one decode step reads (a view: a CUDA
        graph reads their live entries). Compiled, their number is a symbolic size, so one graph serves every
        width, where each width used to cost a full compilation (~25-30 s on an H200; a GRPO rollout of 256
        tokens crosses several). Each width is still captured as a CUDA graph of its own (capture needs fixed
        shapes; it takes milliseconds)."""
        table = self.block_table[:, :pages]
        if self._compile_mode != "off":  # (maybe_: an engine of one page has one width, left specialised)
            torch._dynamo.maybe_mark_dynamic(table, 1)
        return table

    def reset_graphs(self) -> None:
        """Drop every captured decode step (the next step of each width captures again, e.g. after a setting that
        the graphs baked in changed). Their memory pool goes with them: the allocator keeps a pool only while a
        graph captured into it lives, so capturing into the old handle after all its graphs are gone is an
        internal error in torch's caching allocator."""
        self._graphs.clear()
        self._graph_pool = None

    def _capture(self, mode: str, pages: int):
        """Record the decode step over `pages` block-table columns as a CUDA graph over the static slot buffers.
        All captured steps share one memory pool: they run one at a time, in stream order, and each step's
        outputs are copied out (or into the engine's own buffers) before the next step runs."""
        state = self._state + [self.active, self.block_table] + ([self.prev_pos] if self.speculate else [])
        saved = [t.clone() for t in state]
        table = self._table(pages)  # a view of the block table: the graph reads its live entries
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        try:
            # Warm up (and compile) outside the graph with every slot idle at position 0 of the reserved page,
            # so the warm-up steps write nothing into any sequence's pages.
            for t in (self.pos, self.active, self.block_table) + ((self.prev_pos,) if self.speculate else ()):
                t.zero_()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._step_fn(mode, table)
            torch.cuda.current_stream().wait_stream(side)
            for t, v in zip(state, saved):
                t.copy_(v)
            graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's calls are checked during the capture, so a trainer's update may
            # allocate and synchronise on another thread meanwhile (GRPO's grpo.async samples beside its update)
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                out = self._step_fn(mode, table)
        finally:  # the warm-up steps advanced the slots (capture itself runs nothing): put them back
            for t, v in zip(state, saved):
                t.copy_(v)
        return graph, out

    def completion(self, s: _Seq) -> Completion:
        """The Completion of a sequence returned by add_request (final once its finish_reason is set)."""
        text = None
        if self.tokenizer is not None:
            body = s.tokens[:-1] if s.tokens and (s.tokens[-1] == self.eos_id or s.tokens[-1] in
                                                  (s.params.stop_token_ids or [])) and s.finish_reason == "stop" \
                else s.tokens
            text = self.tokenizer.decode(body)
            if s.params.stop:
                cuts = [text.find(x) for x in s.params.stop if x in text]
                if cuts:
                    text = text[: min(cuts)]
        return Completion(s.prompt_index, s.sample_index, list(s.tokens), text, s.finish_reason or "length",
                          list(s.logprobs) if s.params.logprobs else None, len(s.prompt), s.cached_tokens or 0)
