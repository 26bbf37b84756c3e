"""Long training rows (issue #19, training half): document masking without an (S, S) mask, and the output head
in chunks, each against its slow twin (the dense mask; plain autograd through full fp32 logits), values and
gradients, on the CPU. The CUDA path (FlexAttention with backward) has a test that skips without a GPU.

Tolerances: fp32 throughout (the bf16 test says its own). Attention over at most S keys and a log-softmax over V
logits sum O(S) or O(V) terms in another order than their twin, so the bounds are a few hundred fp32 epsilons
(~1e-5), far below any masking or indexing error (O(1e-2) and more on these random inputs)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from r1lab.data import IGNORE, Sequences, make_batch
from r1lab.model.attention import FLEX_BLOCK, DocumentMask, document_attention, document_block_mask, document_mask
from r1lab.model.config import get_preset
from r1lab.model.head import head_logprob_sum, head_logprobs
from r1lab.model.transformer import Transformer
from r1lab.train.grpo import completion_logprobs
from r1lab.train.loop import Trainer, build_model, cross_entropy_sum
from r1lab.train.recipe import load_recipe

EPS32 = torch.finfo(torch.float32).eps
TOL = 256 * EPS32  # ~3e-5: see the module docstring


pytestmark = pytest.mark.usefixtures("one_thread")


def doc_ids(lengths: list[int]) -> torch.Tensor:
    """(S,) document number of each token for documents of these lengths, in order."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an op returns (what a computation materialises), and the matmuls."""

    def __init__(self):
        super().__init__()
        self.shapes, self.matmuls = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func in MATMULS
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


# ---------------------------------------------------------------------- document masking
def qkv(B, H, S, E, Ev, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, d, generator=g).requires_grad_(grad) for d in (E, E, Ev)]


def test_per_document_attention_equals_the_dense_mask_values_and_gradients():
    """The CPU path (SDPA per document) against SDPA under the dense block-diagonal causal mask, with documents of
    length 1, a continued document at the row start and rows of different splits; qk and v widths differ as in
    MLA (either wider: the narrower heads are padded for the fused kernel). Two rows hold one document each with
    the same number: the batch is split into documents as a whole, so a document must not run on into the next
    row."""
    S = 29
    doc = torch.stack([doc_ids([5, 1, 11, 12]), doc_ids([29]), doc_ids([29])])  # (3, S)
    mask = document_mask(doc, flex=False)
    for e, ev in ((12, 8), (8, 12), (8, 8)):
        q, k, v = qkv(3, 3, S, e, ev)
        g = torch.randn(3, 3, S, ev, generator=torch.Generator().manual_seed(1))
        out = document_attention(q, k, v, mask, scale=0.3)
        assert out.shape == (3, 3, S, ev)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), scale=0.3)
        ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
        close(out, ref)
        for a, b in zip(grads, ref_grads):
            assert a.shape == b.shape
            close(a, b)
    # the masking matters here: plain causal attention differs (so the comparison can fail)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert (causal[0] - ref[0]).abs().max() > 1e-2


@pytest.mark.parametrize("v_dim", [16, 32])  # tiny's query/key heads are 24 wide: the value heads narrower, wider
def test_causal_attention_on_a_cpu_takes_the_fused_kernel_and_equals_the_dense_mask(v_dim):
    """Plain causal rows (GRPO's padded pairs, prefill) on a CPU: the heads padded to one width take SDPA's fused
    kernel, and the model's logits and every parameter's gradient equal those under the same causal mask given
    as a dense (S, S) bool tensor (SDPA's unfused math); only the dense run holds (S, S) scores."""
    cfg = get_preset("tiny").replace(vocab_size=64, v_head_dim=v_dim, num_nextn_predict_layers=0)
    model = Transformer(cfg).init_weights(seed=3)
    S = 37
    tokens = torch.randint(0, 64, (3, S), generator=torch.Generator().manual_seed(4))
    dense = torch.ones(S, S, dtype=torch.bool).tril()[None, None].expand(3, 1, S, S)

    def run(mask):
        model.zero_grad()
        with ShapeLog() as log:
            logits = model(tokens, attn_mask=mask)
            logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], log

    (fused, f_grads, f_log), (ref, r_grads, r_log) = run(None), run(dense)
    close(fused, ref)
    assert len(f_grads) == len(r_grads)
    for a, b in zip(f_grads, r_grads):
        close(a, b)
    assert not any(sh[-2:] == (S, S) for sh in f_log.shapes) and any(sh[-2:] == (S, S) for sh in r_log.shapes)


def test_model_with_document_mask_equals_dense_mask_and_builds_no_seq_by_seq_tensor():
    """A tiny model (MTP on) on packed rows: logits, MTP logits and every parameter's gradient under the
    DocumentMask equal those under its dense mask; and no tensor of the DocumentMask run ends in (S, S), while
    the dense run's do (the mask and the scores): the check can fail."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=64, num_nextn_predict_layers=1)
    model = Transformer(cfg).init_weights(seed=0)
    S = 37  # (no model width is 37) documents of at most 13 tokens: per-document scores are (H, 13, 13) at most
    starts = torch.zeros(2, S + 1, dtype=torch.bool)
    starts[0, [0, 9, 22, 35]] = True
    starts[1, [13, 14, 27]] = True  # row 1 opens with a document continued from an earlier row
    tokens = torch.randint(0, 64, (2, S + 1))
    b = make_batch(tokens, starts, torch.ones_like(starts))
    assert isinstance(b.attn_mask, DocumentMask) and b.attn_mask.block_mask is None  # CPU rows: per-document path

    def run(mask):
        model.zero_grad()
        with ShapeLog() as log:
            logits, (mtp,) = model(b.input_ids, b.positions, attn_mask=mask, return_mtp=True)
            (logits.square().mean() + mtp.sin().mean()).backward()
        return logits.detach(), mtp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, log.shapes

    logits, mtp, grads, shapes = run(b.attn_mask)
    ref_logits, ref_mtp, ref_grads, ref_shapes = run(b.attn_mask.dense())
    close(logits, ref_logits)
    close(mtp, ref_mtp)
    for n, gr in ref_grads.items():
        close(grads[n], gr)
    assert not [s for s in shapes if s[-2:] == (S, S)]
    assert [s for s in ref_shapes if s[-2:] == (S, S)]


def dense_tiles(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A BlockMask's (kv_num_blocks, kv_indices) as a bool (B, H, n_q, n_kv) map of the listed tiles."""
    n = idx.shape[-1]
    listed = torch.arange(n) < num[..., None]  # (B, H, n_q, n)
    out = torch.zeros(*idx.shape[:-1], n, dtype=torch.bool)
    return out.scatter_(-1, idx.long(), listed)


@pytest.mark.parametrize("lengths", [[128 * 3], [100, 28, 300, 1, 83], [5, 250, 129, 128, 40]])
def test_block_mask_tiles_equal_create_block_masks(lengths):
    """The block mask built from tile ends lists the same partial and full tiles as torch's create_block_mask,
    which evaluates the mask_mod on every (query, key) pair; rows padded to 128 (the padding is a document)."""
    doc = doc_ids(lengths)[None]
    bm = document_block_mask(doc)
    docp = torch.cat([doc, (doc[:, -1:] + 1).expand(-1, -doc.shape[1] % FLEX_BLOCK)], dim=1)
    Sp = docp.shape[1]
    assert bm.seq_lengths == (Sp, Sp) and Sp % FLEX_BLOCK == 0
    ref = create_block_mask(lambda b, h, q, kv: (docp[b, q] == docp[b, kv]) & (q >= kv), 1, 1, Sp, Sp,
                            device="cpu", BLOCK_SIZE=FLEX_BLOCK)
    assert torch.equal(dense_tiles(bm.kv_num_blocks, bm.kv_indices), dense_tiles(ref.kv_num_blocks, ref.kv_indices))
    assert torch.equal(dense_tiles(bm.full_kv_num_blocks, bm.full_kv_indices),
                       dense_tiles(ref.full_kv_num_blocks, ref.full_kv_indices))


def test_flex_document_attention_forward_equals_the_dense_mask_on_cpu():
    """The CUDA path's FlexAttention call with the built block mask, run forward on the CPU (FlexAttention has no
    CPU backward): equal to the dense-mask SDPA, for a row whose length is a multiple of 128 and a ragged one
    (zero-padded to the mask and cut back)."""
    for lengths in ([60, 100, 1, 95], [200, 57]):  # 256 and 257 tokens
        doc = torch.stack([doc_ids(lengths), doc_ids([sum(lengths)])])
        mask = document_mask(doc, flex=True)
        assert mask.block_mask is not None
        q, k, v = qkv(2, 2, doc.shape[1], 24, 16, grad=False)
        out = document_attention(q, k, v, mask, scale=0.2)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), scale=0.2)
        close(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
def test_flex_document_attention_values_and_gradients_on_cuda():
    """On CUDA, in bf16 with MLA's head widths (qk 192, v 128): compiled FlexAttention under the block mask
    against fp32 SDPA under the dense mask on the same (bf16-rounded) inputs, values and gradients. bf16 keeps 8
    significant bits, so the bound is 8 bf16 epsilons of the largest value; a masking error is O(1) of it."""
    dev = torch.device("cuda")
    doc = torch.stack([doc_ids([60, 100, 1, 95]), doc_ids([255, 1])]).to(dev)  # 256 tokens per row
    mask = document_mask(doc)
    assert mask.block_mask is not None
    q, k, v = (t.detach().to(dev, torch.bfloat16).requires_grad_(True) for t in qkv(2, 4, 256, 192, 128))
    out = document_attention(q, k, v, mask, scale=192 ** -0.5)
    g = torch.randn(out.shape, device=dev)
    grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask.dense(), scale=192 ** -0.5)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q32, k32, v32))
    tol = 8 * torch.finfo(torch.bfloat16).eps
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol * b.abs().max().item())


# ---------------------------------------------------------------------- the chunked head
def head_case(N=37, D=16, V=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / math.sqrt(D) * 3).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = IGNORE
    return h, w, t, torch.randn(N, generator=g)


def reference_logprobs(h, w, t, temperature):
    """The unchunked formula: full fp32 logits, log-softmax, gather; 0 where there is no target."""
    logp_all = torch.log_softmax((h @ w.t()).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, t.clamp(min=0)[:, None])[:, 0].masked_fill(t < 0, 0.0)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk", [1, 4, 16, 37, 0])
def test_chunked_head_equals_full_logits_values_and_gradients(chunk):
    """Log-probs, entropy, and the gradients of a per-token weighted sum (as GRPO's objective weights tokens)
    with respect to hidden states and head weight, at temperature 0.7, for chunks that do and do not divide
    the 37 tokens; IGNORE targets give 0 and no gradient. And the log-prob sum (cross-entropy) with its
    gradients formed in the forward."""
    h, w, t, g = head_case()
    logp, ent = head_logprobs(h, w, t, 0.7, chunk=chunk, with_entropy=True)
    gh, gw = torch.autograd.grad((logp * g).sum(), (h, w))
    ref, ref_ent = reference_logprobs(h, w, t, 0.7)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h, w))
    close(logp, ref)
    close(ent, ref_ent)
    close(gh, ref_gh)
    close(gw, ref_gw)
    assert (logp[t < 0] == 0).all() and (gh[t < 0] == 0).all() and gh[t >= 0].abs().max() > 1e-3
    assert not ent.requires_grad
    # the plain sum (cross-entropy), gradients formed in the forward, under a scale the backward brings
    total = head_logprob_sum(h, w, t, chunk=chunk)
    gh, gw = torch.autograd.grad(total * -0.37, (h, w))
    ref = reference_logprobs(h, w, t, 1.0)[0].sum()
    ref_gh, ref_gw = torch.autograd.grad(ref * -0.37, (h, w))
    close(total, ref)
    close(gh, ref_gh)
    close(gw, ref_gw)


def test_chunked_head_holds_no_full_logits():
    """Forward and backward with chunks of 8 of 64 tokens create nothing of the (tokens, vocab) size: the largest
    tensors are the hidden states' gradient (N, D), the weight's (V, D) and a chunk's logits (8, V). Without
    chunks the same check finds the full logits (so it can fail). Matmuls per chunk: 4 for the per-token
    log-probs (the backward recomputes the logits), 3 for the sum (as many as the unchunked loss)."""
    N, D, V = 64, 16, 50
    for chunk, holds_full in ((8, False), (0, True)):
        for fn, matmuls in ((lambda *a: head_logprobs(*a, chunk=chunk)[0], 4),
                            (lambda *a: head_logprob_sum(*a, chunk=chunk), 3)):
            h, w, t, g = head_case(N, D, V)
            with ShapeLog() as log:
                logp = fn(h, w, t)
                (logp * (g if logp.dim() else 1.0)).sum().backward()
            biggest = max(math.prod(s) for s in log.shapes)
            assert (biggest >= N * V) == holds_full, (chunk, biggest)
            if not holds_full:
                assert biggest == max(N * D, V * D, chunk * V)
            assert log.matmuls == matmuls * (N // chunk if chunk else 1)


def test_chunked_head_in_bf16_matches_the_full_head():
    """bf16 hidden states and weight (the GPU's compute dtype; fp32 math after the matmul): chunks of 8 against
    the full logits. The logits themselves are bf16 products either way (rounded to 2^-8 relative), so the
    bound is a few bf16 epsilons; the weight gradient is summed over chunks in fp32 and rounded once."""
    h, w, t, g = head_case(N=40, D=32, V=64, dtype=torch.bfloat16)
    logp, _ = head_logprobs(h, w, t, chunk=8)  # per-token, then the sum (cross-entropy)
    gh, gw = torch.autograd.grad((logp * g).sum(), (h, w))
    ref, _ = reference_logprobs(h, w, t, 1.0)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h, w))
    tol = 4 * torch.finfo(torch.bfloat16).eps  # 0.03 relative
    assert gw.dtype == torch.bfloat16
    close(logp, ref, tol)
    torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=tol, atol=tol * ref_gh.float().abs().max().item())
    torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=tol, atol=tol * ref_gw.float().abs().max().item())
    total = head_logprob_sum(h, w, t, chunk=8)
    gh, gw = torch.autograd.grad(total / -29.0, (h, w))
    ref = reference_logprobs(h, w, t, 1.0)[0]
    ref_gh, ref_gw = torch.autograd.grad(ref.sum() / -29.0, (h, w))
    assert gh.dtype == gw.dtype == torch.bfloat16
    close(total, ref.sum(), tol)
    torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=tol, atol=tol * ref_gh.float().abs().max().item())
    torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=tol, atol=tol * ref_gw.float().abs().max().item())


def tiny_model(mtp: int = 0) -> Transformer:
    cfg = get_preset("tiny").replace(vocab_size=64, num_nextn_predict_layers=mtp)
    return Transformer(cfg).init_weights(seed=0)


def test_trainer_cross_entropy_equals_full_logits_cross_entropy():
    """The loop's loss (main and MTP heads, from hidden states, chunks of 5) equals F.cross_entropy on the full
    logits, values and every parameter's gradient."""
    torch.manual_seed(0)
    model = tiny_model(mtp=1)
    ids = torch.randint(0, 64, (2, 24))
    labels = torch.randint(0, 64, (2, 24))
    labels[:, :3] = IGNORE
    mtp_labels = labels.roll(-1, dims=1)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    h, (mh,) = model(ids, return_mtp=True, return_hidden=True)
    loss, g = grads(cross_entropy_sum(model, h, labels, 5) + 0.3 * cross_entropy_sum(model, mh, mtp_labels, 5))
    logits, (ml,) = model(ids, return_mtp=True)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    mce = F.cross_entropy(ml.flatten(0, 1).float(), mtp_labels.flatten(), ignore_index=IGNORE, reduction="sum")
    ref_loss, ref_g = grads(ce + 0.3 * mce)
    close(loss, ref_loss)
    for a, b in zip(g, ref_g):
        close(a, b)


def test_grpo_logprobs_and_entropy_chunked_equal_the_full_softmax():
    """completion_logprobs (the GRPO update's log-probs and entropy, head in chunks of 3) against the full
    logits of a plain forward at the completion positions, at temperature 0.8: values, entropy and the
    parameters' gradients of an advantage-weighted sum."""
    torch.manual_seed(0)
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    completions = [[11, 12, 13, 14], [15], [16, 17, 18]]
    adv = torch.tensor([0.5, -1.0, 2.0])
    model.zero_grad()
    logp, mask, ent = completion_logprobs(model, prompts, completions, 0.8, with_entropy=True, chunk=3)
    (logp * adv[:, None]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_lp, ref_ent, total = torch.zeros_like(logp), torch.zeros_like(logp), 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logits = model(torch.tensor([p + c[:-1]]))[0, len(p) - 1:]  # (len(c), V): the rows predicting c
        lp_all = torch.log_softmax(logits.float() / 0.8, dim=-1)
        lp = lp_all.gather(-1, torch.tensor(c)[:, None])[:, 0]
        ref_lp[i, :len(c)] = lp.detach()
        ref_ent[i, :len(c)] = -(lp_all.exp() * lp_all).sum(-1).detach()
        total = total + adv[i] * lp.sum()
    total.backward()
    assert mask.sum(1).tolist() == [4, 1, 3]
    close(logp, ref_lp)
    close(ent * mask, ref_ent)
    for a, p in zip(grads, model.parameters()):
        close(a, p.grad)


def test_train_step_holds_no_full_logits_and_no_seq_by_seq_mask(tmp_path):
    """One optimizer step of the training loop (packed documents, MTP on, train.head_chunk = 8) creates no
    tensor of the (tokens, vocab) shape and none ending in (S, S); with head_chunk = 0 (all tokens at once) the
    same check finds the full logits, so the recipe key reaches the loss. Vocabulary 97 and rows of 29 tokens:
    sizes no model width shares."""
    V, S, B = 97, 29, 2
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, S + 1), generator=g, dtype=torch.int32)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, [0, 11, 20]] = True
    data = Sequences(tokens, starts, torch.ones_like(starts))
    for chunk, holds_full in ((8, False), (0, True)):
        r = load_recipe(None, "pretrain", {
            "model.config": '{"vocab_size": 97}', "data.seq_len": str(S), "train.batch_size": str(B),
            "train.head_chunk": str(chunk), "moe.mtp_weight": "0.3", "log.tensorboard": "false",
            "ckpt.export": "false", "run.out": str(tmp_path / f"run{chunk}")})
        torch.manual_seed(0)
        t = Trainer(r, build_model(r, torch.device("cpu")), data, quiet=True)
        batch = data.batch([0, 1])
        with ShapeLog() as log:
            rec = t.train_step([batch])
        assert math.isfinite(rec["loss"]) and rec["grad_norm"] > 0
        D = t.model.config.hidden_size  # (D, V) is the head weight transposed, not logits
        vocab_rows = max(math.prod(s[:-1]) for s in log.shapes if len(s) >= 2 and s[-1] == V and s != (D, V))
        assert (vocab_rows >= B * S) == holds_full, (chunk, vocab_rows)
        assert not [s for s in log.shapes if s[-2:] == (S, S)]
