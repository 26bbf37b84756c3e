"""Token sampling with per-sequence seeds and no generator state.

Randomness comes from a counter-based hash of (seed, position, token id), so a sequence's samples depend only
on its own seed and position, not on what else shares the batch, and the step has static shapes and no
host synchronisation (it can be captured in a CUDA graph). Sampling uses the exponential race: the argmax of
p_i / E_i with E_i ~ Exp(1) is distributed as p.

Why not inverse-CDF sampling with one uniform per row (cheaper: no noise over the vocabulary)? With 129,280
tokens and a flat distribution the CDF's steps (~1e-5) are as small as fp32 cumsum error, so logits that
differ in the 7th digit (another batch shape, another BLAS blocking) pick another token; the race only flips
at near-ties. Tried, and it broke batch-independent reproducibility.

Speculative decoding (`speculative_sample`) draws from the same hash in separate streams, one per decision:
the draft token (DRAFT), the accept test (ACCEPT), the resample from the residual after a rejection (RESIDUAL)
and the bonus token after k accepted drafts (stream 0, what plain sampling uses at that position). The token
at a position is decided once, by noise of that position only; earlier steps may have drawn drafts there
with the same noise, but nothing committed depended on them (verification is causal and stops at the first
rejection), so the noise is still independent of the history and each decision is exact rejection sampling:
the committed tokens follow the target distribution, whatever the draft.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift-multiply) on int64 tensors holding values in [0, 2^32)."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    x = x & _MASK32
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """`_hash32` on int32 bit patterns: wrapping multiplies and masked (logical) shifts give the same bits at
    half the memory traffic of int64, and compile to plain 32-bit integer code."""
    x = (x ^ ((x >> 16) & 0xFFFF)) * 0x7FEB352D
    x = (x ^ ((x >> 15) & 0x1FFFF)) * (0x846CA68B - 2**32)
    return x ^ ((x >> 16) & 0xFFFF)


DRAFT, ACCEPT, RESIDUAL = 1, 2, 3  # noise streams of speculative decoding (module docstring)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int, stream: int = 0) -> torch.Tensor:
    """(B,) seeds, (B,) positions -> (B, vocab) uniforms in (0, 1), a pure function of its inputs.
    stream > 0 rehashes each row with a stream constant: independent noise for the same (seed, position)."""
    row = _hash32(seeds[:, None] * 0x9E3779B1 + positions[:, None])  # (B, 1)
    if stream:
        row = _hash32(row ^ ((stream * 0x632BE5AB) & _MASK32))
    row = _as_int32(row)
    # (tok * 0x85EBCA6B) mod 2^32 as a wrapping int32 product (a constant beyond int32 breaks inductor's codegen)
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int32) * (0x85EBCA6B - 2**32)  # (V,)
    h = _mix32(row ^ tok)
    # 23 bits: (k + 0.5) / 2^23 is exact in fp32 and at most 1 - 2^-24. With 24 bits the largest value,
    # (2^24 - 0.5) / 2^24, rounds to 1.0 in fp32, and -log(-log(1.0)) = inf picks its token whatever its
    # probability (seed 3, position 132 of a 129,280-token vocabulary did).
    return (((h >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) / float(1 << 23)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor, filter_top: bool = True,
           greedy_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    logits (B, V) any dtype; temperature, top_p (B,) float (temperature 0 = greedy); top_k (B,) long (0 = off);
    seeds, positions (B,) long. filter_top=False skips the top-p/top-k sort when no row uses them;
    greedy_only=True (every row has temperature 0) skips the noise: the same tokens and log-probs, less work.
    Returns tokens (B,) and their log-probabilities (B,) in fp32 under the temperature-scaled distribution
    before top-p/top-k truncation (what a policy-gradient trainer recomputes from the same logits).
    """
    logits = logits.float()
    if greedy_only:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(logits / t[:, None], dim=-1)
    masked = top_p_top_k(logp, top_p, top_k) if filter_top else logp
    race = masked - torch.log(-torch.log(uniform_noise(seeds, positions, logp.shape[-1])))  # log(p / E)
    tokens = torch.where(greedy, logits.argmax(-1), race.argmax(-1))
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


# Eager even inside a compiled decode step: Inductor 2.11 miscompiles this sort / cumsum / scatter next to the
# log-softmax before it (CPU: every token 0, or a codegen error; tests/test_engine.py checks compiled = eager).
@torch.compiler.disable
def top_p_top_k(logp: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """logp (B, V) with the tokens outside each row's nucleus (top_p) and top-k set to -inf."""
    sorted_lp, order = logp.sort(dim=-1, descending=True)
    probs = sorted_lp.exp()
    rank = torch.arange(logp.shape[-1], device=logp.device)
    # keep a token if the mass strictly before it is < top_p (the top token always survives)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    return torch.full_like(logp, float("-inf")).scatter(1, order, sorted_lp.masked_fill(drop, float("-inf")))


def target_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                    filter_top: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) -> (logp, dist), both (N, V) fp32: logp the temperature-scaled log-probs (what `sample`
    returns log-probs of), dist the log of the distribution `sample` draws from: logp truncated by top-p/top-k
    and renormalised, or one-hot at the argmax for temperature-0 rows (log 0 = -inf elsewhere)."""
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(logits / t[:, None], dim=-1)
    dist = torch.log_softmax(top_p_top_k(logp, top_p, top_k), dim=-1) if filter_top else logp
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    onehot = torch.where(vocab == logits.argmax(-1, keepdim=True), 0.0, float("-inf"))
    return logp, torch.where(greedy[:, None], onehot, dist)


def _race(logdist: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax of log(p / E), E = -log(U) ~ Exp(1): a sample of p (one-hot rows give their token)."""
    return (logdist - torch.log(-torch.log(noise))).argmax(-1)


def draft_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 seeds: torch.Tensor, positions: torch.Tensor, filter_top: bool = True,
                 greedy_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample a draft token per row from the draft logits (B, V) under the rows' own temperature, top-p and
    top-k (a draft shaped like the target is accepted more often). positions (B,): where the token would go.
    Returns tokens (B,) and the log draft distribution q (B, V) the verifier needs (None when greedy_only:
    the verifier then only compares tokens)."""
    if greedy_only:
        return logits.argmax(-1), None
    _, logq = target_logprobs(logits, temperature, top_p, top_k, filter_top)
    return _race(logq, uniform_noise(seeds, positions, logq.shape[-1], DRAFT)), logq


def speculative_sample(logits: torch.Tensor, drafts: torch.Tensor, draft_logq: torch.Tensor | None,
                       temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, seeds: torch.Tensor,
                       positions: torch.Tensor, filter_top: bool = True,
                       greedy_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify k drafts per row by rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    logits (B, k+1, V): the target model at the last committed token and the k drafts; drafts (B, k);
    draft_logq (B, k, V) from `draft_sample` (None when greedy_only); positions (B,): the position of the
    first token decided (that of drafts[:, 0]). Draft j is accepted with probability min(1, p(d)/q(d)) under
    the target distribution p of `sample` (temperature, top-p, top-k; one-hot argmax at temperature 0); at the
    first rejection the token is drawn from max(0, p - q) renormalised; if all k pass, a bonus token is drawn
    from p at position k.
    Returns tokens (B, k+1), valid up to and including index `accepted`; their log-probs (B, k+1) as `sample`
    returns them (temperature-scaled, before truncation); accepted (B,) long in [0, k].
    """
    B, K1, V = logits.shape
    K = K1 - 1
    logits = logits.float()
    j = torch.arange(K1, device=logits.device)
    at = positions[:, None] + j  # (B, k+1) the position each index decides
    if greedy_only:
        logp = torch.log_softmax(logits, dim=-1)
        fresh = logits.argmax(-1)  # (B, k+1)
        ok = drafts == fresh[:, :K]
    else:
        def per_index(x):  # (B,) -> (B * (k+1),): each row's parameters at each of its k+1 positions
            return x.repeat_interleave(K1)
        logp, dist = (x.view(B, K1, V) for x in target_logprobs(
            logits.flatten(0, 1), per_index(temperature), per_index(top_p), per_index(top_k), filter_top))
        p, q = dist[:, :K].exp(), draft_logq.exp()  # (B, k, V)
        p_d = p.gather(2, drafts[..., None])[..., 0]
        q_d = q.gather(2, drafts[..., None])[..., 0]  # > 0: the draft was drawn from q
        s_k, at_k = seeds.repeat_interleave(K), at[:, :K].flatten()
        u = uniform_noise(s_k, at_k, 1, ACCEPT).view(B, K)
        ok = u * q_d < p_d  # u < p/q without the division
        resid = (p - q).clamp(min=0)
        # max(0, p - q) is all zero only when p = q, where nothing is rejected (u < 1): any fallback will do
        log_r = torch.where(resid.sum(-1, keepdim=True) > 0, resid.log(), dist[:, :K])
        noise = torch.cat([uniform_noise(s_k, at_k, V, RESIDUAL).view(B, K, V),
                           uniform_noise(seeds, at[:, K], V)[:, None]], dim=1)
        fresh = _race(torch.cat([log_r, dist[:, K:]], dim=1), noise)  # (B, k+1)
    accepted = ok.long().cumprod(-1).sum(-1)  # leading accepted drafts
    kept = torch.cat([drafts, fresh[:, K:]], dim=1)
    tokens = torch.where(j < accepted[:, None], kept, fresh)
    return tokens, logp.gather(2, tokens[..., None])[..., 0], accepted
