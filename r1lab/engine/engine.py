"""Batched generation over the MLA latent cache, with continuous batching.

The cache is a pool of `max_batch` slots, each holding `max_seq_len` positions (rounded up to a multiple of 64)
of (latent, roped key) per layer: 576 numbers per token per layer for DeepSeek-V3, never expanded K/V. A
request's sequences take free slots; every decode step runs all slots at once with static shapes (one token
each, the absorbed attention path), so the step can be captured as a CUDA graph; finished sequences free their
slot and waiting ones are prefilled into it between steps. The `n` samples of one prompt share one prefill:
its cache rows are copied.

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
the plain one is. Rejected positions leave junk in both caches, overwritten before any query sees it.
"""

from __future__ import annotations

import random
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

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


class Engine:
    """Generation for one model: `Engine(model, tokenizer).generate(prompts, SamplingParams(...))`.

    max_batch: slots decoded together; max_seq_len: positions per slot (prompt + generated);
    cuda_graph: capture the decode step (default: on for CUDA models); compile: torch.compile the model's
    decode forward first (fuses its small kernels; ~30 s once per engine; default: on for CUDA models, and a
    failed compilation falls back to eager with a warning); prefill_tokens: prompt tokens per prefill batch;
    overlap: queue the next decode step before reading this one's tokens (default: on for CUDA models; `step()`
    then returns each decode token one call later); speculate: draft this many tokens per step with the MTP
    module(s) and verify them in one forward (0 = off; the model needs an MTP module). `stats` counts steps,
    drafted and accepted tokens.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 32, max_seq_len: int | None = None,
                 cuda_graph: bool | None = None, compile: bool | None = None, prefill_tokens: int = 16384,
                 overlap: bool | None = None, speculate: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 4096)
        if self.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
        self.device = model.device
        self.eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        B, dev = max_batch, self.device
        if speculate < 0 or (speculate and not len(model.mtp)):
            raise ValueError(f"speculate={speculate}: must be >= 0, and > 0 needs a model with an MTP module "
                             f"(this one has num_nextn_predict_layers={cfg.num_nextn_predict_layers})")
        self.speculate = k = speculate
        # Slots per cache row: max_seq_len rounded up to a multiple of 64. The decode step's attention products
        # have the row length as a leading dimension, and cuBLAS falls back to slow unaligned kernels for odd
        # ones (44 instead of 9 us a layer at 271 slots and batch 128 on an H200); extra slots are never attended.
        # Speculation writes up to k positions past a sequence's last, and with `overlap` one more step of k+1
        # after it finished: 2k more slots keep those writes inside the row.
        self.cache_len = -(-(self.max_seq_len + 2 * k) // 64) * 64
        self.cache = model.new_cache(B, self.cache_len)
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
            # `acc`), and one latent cache per MTP module used.
            n_mtp = min(k, len(model.mtp))
            width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
            self.mtp_cache = [torch.zeros(B, self.cache_len, width, dtype=model.dtype, device=dev)
                              for _ in range(n_mtp)]
            self.hid = torch.zeros(B, k + 1, cfg.hidden_size, dtype=model.dtype, device=dev)
            self.ahead = torch.zeros(B, k + 1, dtype=torch.long, device=dev)
            self.prev_pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.acc = torch.zeros(B, dtype=torch.long, device=dev)
            self.offsets = torch.arange(k + 1, device=dev)
            self._state += [self.hid, self.ahead, self.prev_pos, self.acc]
        self._counts = {"decode_steps": 0, "sequence_steps": 0, "drafted": 0, "accepted": 0}
        self.slots: list[_Seq | None] = [None] * B
        self.waiting: deque[list[_Seq]] = deque()  # groups of n samples of one prompt
        self._graphs: dict[bool, tuple] = {}
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
        """mode "step": compile forward + sampling; "forward": the model's forward only; "off": eager."""
        self._compile_mode = mode
        forward = self._verify_forward if self.speculate else self._forward
        step = self._speculative_eager if self.speculate else self._decode_eager
        self._forward_fn = torch.compile(forward, dynamic=False) if mode == "forward" else forward
        self._step_fn = torch.compile(step, dynamic=False) if mode == "step" else step

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
        """Queue one prompt's n samples; they are admitted when slots are free."""
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
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        group = [_Seq(prompt, params, prompt_index, i, (seed + i) & 0x7FFFFFFF) for i in range(params.n)]
        self.waiting.append(group)
        return group

    def abort(self, seqs: list[_Seq]) -> None:
        """Stop sequences (e.g. their client disconnected): free their slots or drop them from the queue."""
        for s in seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
            if s.slot >= 0 and self.slots[s.slot] is s:
                self._free(s.slot)
        self.waiting = deque(kept for g in self.waiting if (kept := [s for s in g if s.finish_reason is None]))

    @property
    def stats(self) -> dict:
        """Counters since the engine was built: decode steps, sequence-steps (one sequence in one step),
        drafted and accepted tokens; acceptance_rate = accepted / drafted; tokens_per_step = tokens a sequence
        gets from one decode step on average (1 without speculation, up to k+1); slots busy and sequences queued.
        Safe to read from another thread (a server's health check) while the engine's thread steps."""
        c, slots, waiting = dict(self._counts), list(self.slots), list(self.waiting)  # copies: C-level, atomic
        steps = max(c["sequence_steps"], 1)
        return {"speculate": self.speculate, **c,
                "acceptance_rate": c["accepted"] / c["drafted"] if c["drafted"] else None,
                "accepted_per_step": c["accepted"] / steps,
                "tokens_per_step": (c["accepted"] + c["sequence_steps"]) / steps if c["sequence_steps"] else None,
                "slots_busy": sum(s is not None for s in slots), "max_batch": self.max_batch,
                "waiting": sum(len(g) for g in waiting)}

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots) or self._inflight is not None

    @torch.no_grad()
    def step(self) -> list[tuple[_Seq, int]]:
        """Admit waiting prompts into free slots (prefill), then one decode step for every running sequence.
        Returns the (sequence, token) pairs produced: with `overlap`, the decode tokens of the previous call's
        step (this call's is then in flight)."""
        produced = self._admit()
        running = [s for s in self.slots if s is not None]
        launched = self._launch(running) if running else None
        if self._inflight is not None:
            produced += self._collect(*self._inflight)
        self._inflight = launched
        if launched is not None and not self.overlap:
            produced += self._collect(*launched)
            self._inflight = None
        return produced

    def _launch(self, running: list[_Seq]) -> tuple:
        """Queue one decode step for every slot; its outputs are copied to host memory without waiting."""
        # which sampler the step needs (each a graph of its own): greedy only, plain sampling, or top-p/k
        if all(s.params.temperature == 0 for s in running):
            mode = "greedy"
        else:
            mode = "filter" if any(s.params.top_p < 1 or s.params.top_k > 0 for s in running) else "sample"
        outs = self._decode(mode)  # tokens, log-probs (and with speculation, accepted counts)
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
        """Read a launched step's tokens (the one host sync per step) and hand them to their sequences."""
        if done is not None:
            done.synchronize()
        nxt, lp = out[0].tolist(), out[1].tolist()
        acc = out[2].tolist() if self.speculate else None
        produced, c = [], self._counts
        c["decode_steps"] += 1
        for s in running:
            if s.finish_reason is not None:  # finished (or aborted) since the step was launched
                continue
            c["sequence_steps"] += 1
            if not self.speculate:
                produced.append((s, nxt[s.slot]))
                self._append(s, nxt[s.slot], lp[s.slot])
                continue
            a = acc[s.slot]
            c["drafted"] += self.speculate
            c["accepted"] += a
            for t, logprob in zip(nxt[s.slot][: a + 1], lp[s.slot][: a + 1]):
                produced.append((s, t))
                self._append(s, t, logprob)
                if s.finish_reason is not None:  # stop token or string, or max_tokens: drop the rest
                    break
        return produced

    # ------------------------------------------------------------------ internals
    def _admit(self) -> list[tuple[_Seq, int]]:
        """Move waiting prompts into free slots: one batched prefill of all that fit, right-padded, on the full
        attention path, writing each prompt's latents into its first slot; its other samples copy them."""
        groups, free = [], [i for i, s in enumerate(self.slots) if s is None]
        budget = self.prefill_tokens
        while self.waiting and len(self.waiting[0]) <= len(free) and (
                not groups or budget >= len(self.waiting[0][0].prompt)):
            group = self.waiting.popleft()
            groups.append((group, free[: len(group)]))
            free = free[len(group):]
            budget -= len(group[0].prompt)
        if not groups:
            return []
        dev = self.device
        lens = [len(g[0].prompt) for g, _ in groups]
        P = max(lens)
        ids = torch.zeros(len(groups), P, dtype=torch.long)
        for i, (g, _) in enumerate(groups):
            ids[i, : lens[i]] = torch.tensor(g[0].prompt)
        pos = torch.arange(P, device=dev).expand(len(groups), P)
        rows = torch.tensor([slots[0] for _, slots in groups], device=dev)
        ids = ids.to(dev)
        # Pad positions write junk past a prompt's end; decoding overwrites slot p before any query sees it.
        h = self.model(ids, pos, cache=self.cache, cache_rows=rows, prefill=True, return_hidden=True)
        if self.speculate and P > 1:  # fill the MTP caches at positions 0..P-2 (decoding's first draft does P-1)
            prev, ahead = h[:, :-1], ids[:, 1:]
            for d, c in enumerate(self.mtp_cache):  # module d reads the token d+1 ahead
                prev = self.model.mtp_forward(d, prev, ahead, pos[:, :-1], cache=c, cache_rows=rows, prefill=True)
                ahead = torch.cat([ahead[:, 1:], torch.zeros_like(ahead[:, :1])], dim=1)
        last = torch.tensor(lens, device=dev) - 1
        logits = self.model.lm_head(h[torch.arange(len(groups), device=dev), last])  # (G, V)
        # Every sample of every admitted prompt: (its prompt's row in the prefill, the sequence, its slot).
        seqs = [(gi, s, slot) for gi, (group, slots) in enumerate(groups) for s, slot in zip(group, slots)]
        extra = [(slot, groups[gi][1][0]) for gi, _, slot in seqs if slot != groups[gi][1][0]]
        if extra:  # the other samples reuse their prompt's prefill: one copy per layer for all of them
            dst, src = (torch.tensor(x, device=dev) for x in zip(*extra))
            for c in self.cache + (self.mtp_cache if self.speculate else []):
                c[dst, :P] = c[src, :P]
        params = [s.params for _, s, _ in seqs]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
        seeds = torch.tensor([s.seed for _, s, _ in seqs], dtype=torch.long, device=dev)
        position = torch.tensor([lens[gi] for gi, _, _ in seqs], dtype=torch.long, device=dev)
        # One sampling call for all of them, in one sampler mode as a decode step is: a row without top-p/k in
        # the filter mode loses only tokens behind fp32-rounded mass of 1, i.e. of probability below ~1e-7.
        tokens, lps = sample(logits[torch.tensor([gi for gi, _, _ in seqs], device=dev)], temperature, top_p, top_k,
                             seeds, position, filter_top=any(p.top_p < 1 or p.top_k > 0 for p in params),
                             greedy_only=all(p.temperature == 0 for p in params))
        slots = torch.tensor([slot for _, _, slot in seqs], device=dev)
        self.tok[slots, 0] = tokens
        self.pos[slots, 0] = position
        self.active[slots, 0] = 1
        self.temperature[slots], self.top_p[slots], self.top_k[slots], self.seeds[slots] = (
            temperature, top_p, top_k, seeds)
        if self.speculate:  # drafting starts from the last prompt position, with the first token one ahead
            gi = torch.tensor([gi for gi, _, _ in seqs], device=dev)
            self.hid[slots, 0] = h[gi, last[gi]]
            self.ahead[slots, 0] = tokens
            self.prev_pos[slots, 0] = position - 1
            self.acc[slots] = 0
        produced = []
        for (_, s, slot), t, lp in zip(seqs, tokens.tolist(), lps.tolist()):
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
        self.slots[slot] = None
        self.active[slot, 0] = 0
        self.pos[slot, 0] = 0  # idle slots keep decoding harmlessly at position 0
        if self.speculate:
            self.prev_pos[slot, 0] = 0
            self.acc[slot] = 0

    def _hits_stop_string(self, s: _Seq) -> bool:
        longest = max(len(x) for x in s.params.stop)
        tail = self.tokenizer.decode(s.tokens[-(longest + 4):])
        return any(x in tail for x in s.params.stop)

    def _forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tok, pos, cache=self.cache, attn_mask=self.model.cache_mask(pos, self.cache_len))[:, -1]

    def _decode_eager(self, mode: str):
        logits = self._forward_fn(self.tok, self.pos)
        nxt, lp = sample(logits, self.temperature, self.top_p, self.top_k, self.seeds, self.pos[:, 0] + 1,
                         filter_top=mode == "filter", greedy_only=mode == "greedy")
        # advance running slots on the device, so the next step needs no host-built inputs
        self.tok.copy_(nxt[:, None])
        self.pos.add_(self.active)
        return nxt, lp

    def _verify_forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, k+1) tokens at positions (B, k+1) -> the main model's final hidden states (B, k+1, D)."""
        return self.model(tok, pos, cache=self.cache, attn_mask=self.model.cache_mask(pos, self.cache_len),
                          return_hidden=True)

    def _draft(self, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k draft tokens per slot (B, k) and their log draft distributions (B, k, V) (None when greedy)."""
        k, n_mtp, model = self.speculate, len(self.mtp_cache), self.model
        rows = torch.arange(self.max_batch, device=self.device)
        opts = dict(filter_top=mode == "filter", greedy_only=mode == "greedy")
        at = self.prev_pos + self.offsets  # (B, k+1): the last verify's positions
        mask = model.cache_mask(at, self.cache_len)
        prev, ahead = self.hid, self.ahead
        drafts, logqs = [], []
        for d in range(k):
            if d < n_mtp:  # module d over the last verify's positions; its draft is at the last accepted one
                prev = model.mtp_forward(d, prev, ahead, at, attn_mask=mask,
                                         cache=self.mtp_cache[d])  # (B, k+1, D)
                last = prev[rows, self.acc]  # (B, D)
            else:  # the last module again, one position further, fed its own output and the previous draft
                p1 = self.prev_pos + self.acc[:, None] + 1 + d - n_mtp  # (B, 1)
                last = model.mtp_forward(n_mtp - 1, last[:, None], drafts[-1][:, None], p1,
                                         attn_mask=model.cache_mask(p1, self.cache_len),
                                         cache=self.mtp_cache[-1])[:, 0]
            # draft d is the token at pos + 1 + d (pos: the last committed token's position)
            tok, logq = draft_sample(model.mtp_logits(min(d, n_mtp - 1), last), self.temperature, self.top_p,
                                     self.top_k, self.seeds, self.pos[:, 0] + 1 + d, **opts)
            drafts.append(tok)
            logqs.append(logq)
            if d + 1 < n_mtp:  # the next module reads one token further ahead: shift, this draft at the end
                ahead = torch.cat([ahead[:, 1:], ahead[:, :1]], dim=1).scatter(1, self.acc[:, None], tok[:, None])
        return torch.stack(drafts, 1), None if mode == "greedy" else torch.stack(logqs, 1)

    def _speculative_eager(self, mode: str):
        """One speculative step for every slot: draft k, verify k+1, advance each slot by what it accepted."""
        drafts, logq = self._draft(mode)
        ids = torch.cat([self.tok, drafts], dim=1)  # (B, k+1): the last committed token, then the drafts
        at = self.pos + self.offsets  # (B, k+1)
        h = self._forward_fn(ids, at)
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

    def _decode(self, mode: str):
        if not self.cuda_graph:
            return self._step_fn(mode)
        while mode not in self._graphs:
            try:
                self._graphs[mode] = self._capture(mode)
            except Exception as e:  # noqa: BLE001 - any compiler failure: keep generating, with less compiled
                if self._compile_mode == "off":
                    raise
                fallback = "forward" if self._compile_mode == "step" else "off"
                warnings.warn(f"torch.compile of the decode {'step' if fallback == 'forward' else 'forward'} failed "
                              f"({type(e).__name__}: {str(e)[:200]}); falling back to compile={fallback!r}")
                self._set_compile(fallback)
                self._graphs.clear()
        graph, out = self._graphs[mode]
        graph.replay()
        return out

    def _capture(self, mode: str):
        """Record the decode step as a CUDA graph over the static slot buffers."""
        saved = [t.clone() for t in self._state]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm up (and compile) outside the graph
                    self._step_fn(mode)
            torch.cuda.current_stream().wait_stream(side)
            for t, v in zip(self._state, saved):
                t.copy_(v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step_fn(mode)
        finally:  # the warm-up steps advanced the slots (capture itself runs nothing): put them back
            for t, v in zip(self._state, saved):
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
                          list(s.logprobs) if s.params.logprobs else None, len(s.prompt))
