"""The output head's log-probabilities in chunks of tokens: fp32 (tokens x vocab) logits are never held whole.

    logp[i] = log softmax(h[i] @ W^T / T)[t[i]]        (the log-prob of target t[i] at temperature T)
    ent[i]  = lse_i - sum_v p_iv z_iv                   (entropy; z = h W^T / T, p = softmax(z), lse = log-sum-exp)

A long row's full logits are the largest tensor of a training step (32K tokens x 102,400 vocabulary: 13.4 GB in
fp32, twice that with their gradient), so the head runs over `chunk` tokens at a time. Forward: per chunk the
logits (compute dtype), then in fp32 their log-sum-exp and the target's logit; only h, W, the targets and the
log-sum-exps (N floats) are kept. Backward recomputes each chunk's logits (one more head matmul, as Cut Cross
Entropy and torchtitan's chunked loss do) and, per token, d logp / d z = (onehot(t) - p) / T, scaled by the
incoming gradient: any per-token weighting works (cross-entropy = -sum logp; GRPO's clipped objective).
The values and gradients are those of the unchunked formula; in fp32 they agree to rounding
(tests/test_long_rows.py). The weight gradient is accumulated over chunks in fp32 and cast once.

A plain sum of log-probs (cross-entropy: the training loop's loss and its MTP losses) needs no recompute: its
gradient is known up to the one scalar the backward brings, so `head_logprob_sum` forms the gradients chunk by
chunk during the forward (as Liger's fused linear cross-entropy does) and keeps them, (N, D) and (V, D) in the
compute dtype, for the backward to scale: the three head matmuls of the unchunked loss, not four.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 2048  # tokens per chunk: fp32 logits of 2048 x 129,280 (V3's vocabulary) = 1.06 GB


def _chunk_stats(z: torch.Tensor, t: torch.Tensor, temperature: float, with_entropy: bool):
    """Logits z (n, V) (compute dtype), targets t (n,) (< 0: none) -> fp32 logp (n,) (0 where no target),
    log-sum-exp (n,), entropy (n,) or None."""
    z = z.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = torch.where(t >= 0, z.gather(-1, t.clamp(min=0)[:, None])[:, 0] - lse, 0.0)
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if with_entropy else None
    return logp, lse, ent


def _chunk_grad(z: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, temperature: float):
    """Gradient of sum_i g_i logp_i with respect to the unscaled logits z (n, V): g_i (onehot(t_i) - p_i) / T,
    in z's dtype (tokens without a target get none)."""
    p = torch.exp(z.float() / temperature - lse[:, None])
    g = torch.where(t >= 0, g, 0.0)
    gz = -p * g[:, None]
    gz.scatter_add_(-1, t.clamp(min=0)[:, None], g[:, None])
    return (gz / temperature).to(z.dtype)


_compiled: dict = {}


def _fn(fn, compiled: bool):
    """fn or its torch.compile'd twin (fused: one pass over a chunk's logits instead of several), compiled once
    for every number of tokens: dim 0 of its tensor arguments is marked dynamic before each call (a batch's last
    chunk is shorter, and GRPO's completion lengths change every step), where torch.compile would first build a
    graph for the first size and recompile at the second."""
    if not compiled:
        return fn
    if fn not in _compiled:
        compiled_fn = torch.compile(fn)

        def call(*args):
            for a in args:
                if isinstance(a, torch.Tensor):
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            return compiled_fn(*args)

        _compiled[fn] = call
    return _compiled[fn]


def _weight_grad_into(acc: torch.Tensor, gz: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, D) fp32 += gz^T h: in one fp32 matmul for fp32 inputs; for bf16 inputs the chunk's product is
    formed in bf16 (fp32 accumulation inside the matmul) and added in fp32."""
    if gz.dtype == torch.float32:
        acc.addmm_(gz.t(), h)
    else:
        acc += torch.mm(gz.t(), h).float()


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk, with_entropy, compiled):
        N = h.shape[0]
        logp = h.new_empty(N, dtype=torch.float32)
        lse = h.new_empty(N, dtype=torch.float32)
        ent = h.new_empty(N, dtype=torch.float32) if with_entropy else None
        stats = _fn(_chunk_stats, compiled)
        for s in range(0, N, chunk):
            lp, ls, en = stats(h[s:s + chunk] @ weight.t(), targets[s:s + chunk], temperature, with_entropy)
            logp[s:s + chunk], lse[s:s + chunk] = lp, ls
            if with_entropy:
                ent[s:s + chunk] = en
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.compiled = temperature, chunk, compiled
        if with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, targets, lse = ctx.saved_tensors
        chunk, T = ctx.chunk, ctx.temperature
        want_h, want_w = ctx.needs_input_grad[:2]
        gh = torch.empty_like(h) if want_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad = _fn(_chunk_grad, ctx.compiled)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            gz = grad(hc @ weight.t(), targets[s:s + chunk], lse[s:s + chunk], g_logp[s:s + chunk].float(), T)
            if want_h:
                gh[s:s + chunk] = gz @ weight
            if want_w:
                _weight_grad_into(gw, gz, hc)
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None, None, None


class _HeadLogProbSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, compiled, want_h, want_w):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if want_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        stats, grad = _fn(_chunk_stats, compiled), _fn(_chunk_grad, compiled)
        for s in range(0, h.shape[0], chunk):
            hc, t = h[s:s + chunk], targets[s:s + chunk]
            z = hc @ weight.t()
            logp, lse, _ = stats(z, t, 1.0, False)
            total += logp.sum()
            if want_h or want_w:  # d total / d z of this chunk: onehot(t) - p
                gz = grad(z, t, lse, torch.ones_like(lse), 1.0)
                if want_h:
                    gh[s:s + chunk] = gz @ weight
                if want_w:
                    _weight_grad_into(gw, gz, hc)
        ctx.save_for_backward(gh, None if gw is None else gw.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors  # scaled in fp32: the scale (e.g. -1 / target count) is not rounded to bf16
        gh, gw = ((None if t is None else (t.float() * g).to(t.dtype)) for t in (gh, gw))
        return gh, gw, None, None, None, None, None


def head_logprob_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int = DEFAULT_CHUNK,
                     compiled: bool = False) -> torch.Tensor:
    """sum of log p(targets) under softmax(h W^T) (temperature 1) over the tokens with a target (>= 0), fp32,
    chunked, its gradients formed in the forward (module docstring); -1 x this is the summed cross-entropy.
    h (..., D), weight (V, D), targets (...). Equal to head_logprobs(...)[0].sum(), one matmul cheaper."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    chunk = chunk if chunk > 0 else max(h.shape[0], 1)
    grads = torch.is_grad_enabled()  # (inside a Function's forward grad mode is always off: decide here)
    return _HeadLogProbSum.apply(h, weight, targets, chunk, compiled, grads and h.requires_grad,
                                 grads and weight.requires_grad)


def head_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                  chunk: int = DEFAULT_CHUNK, with_entropy: bool = False,
                  compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of `targets` under softmax(h W^T / temperature), chunked (module docstring).

    h (..., D) hidden states in the compute dtype; weight (V, D) the head; targets (...) long, negative (IGNORE)
    where a token has no target: its log-prob is 0 and it gets no gradient. chunk: tokens per chunk (0 = all at
    once). Returns fp32 logp (...), differentiable in h and weight, and with_entropy the fp32 entropy (...) of
    each token's distribution (no gradient). compiled: the per-chunk fp32 math through torch.compile.
    """
    lead = targets.shape
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    chunk = chunk if chunk > 0 else max(h.shape[0], 1)
    logp, ent = _HeadLogProbs.apply(h, weight, targets, float(temperature), chunk, with_entropy, compiled)
    return logp.view(lead), None if ent is None else ent.view(lead)
