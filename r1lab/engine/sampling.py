"""Token sampling with per-sequence seeds and no generator state.

Randomness comes from a counter-based hash of (seed, position, token id), so a sequence's samples depend only
on its own seed and position, not on what else shares the batch, and the step has static shapes and no
host synchronisation (it can be captured in a CUDA graph). Sampling uses the exponential race: the argmax of
p_i / E_i with E_i ~ Exp(1) is distributed as p.

Why not inverse-CDF sampling with one uniform per row (cheaper: no noise over the vocabulary)? With 129,280
tokens and a flat distribution the CDF's steps (~1e-5) are as small as fp32 cumsum error, so logits that
differ in the 7th digit (another batch shape, another BLAS blocking) pick another token; the race only flips
at near-ties. Tried, and it broke batch-independent reproducibility.
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


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B,) seeds, (B,) positions -> (B, vocab) uniforms in (0, 1), a pure function of its inputs."""
    row = _as_int32(_hash32(seeds[:, None] * 0x9E3779B1 + positions[:, None]))  # (B, 1)
    # (tok * 0x85EBCA6B) mod 2^32 as a wrapping int32 product (a constant beyond int32 breaks inductor's codegen)
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int32) * (0x85EBCA6B - 2**32)  # (V,)
    h = _mix32(row ^ tok)
    return (((h >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) / float(1 << 24)


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
