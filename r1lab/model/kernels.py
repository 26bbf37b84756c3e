"""Triton kernels for the MoE layer of a decode step (GPU, no gradient). The torch code in moe.py is their
slow twin, the CPU path and the training path; tests/test_kernels.py checks that the two agree (on the CPU
through Triton's interpreter, on a GPU natively).

Why: a decode step of one to a few hundred tokens is latency-bound. Written as PyTorch ops, routing alone is
a GEMV, a cast, a handful of fused elementwise kernels and a top-k; the experts are a sort, index copies,
three grouped GEMMs and the shared experts' three GEMMs. Here routing is two kernels (the logits, then the
selection) and all experts, routed and shared, are three more: one lists each expert's entries (a scan of the
routing indices per expert, nothing is sorted), then the up and the down projections.

Dimension legend as in moe.py: T tokens, D hidden_size, E routed experts, K experts per token, S shared
experts (the shared MLP of width S*I is S experts of width I: SwiGLU is separable over its inner channels),
I moe_intermediate_size, G groups. An *entry* is one (token, slot) pair, slot < K routed then S shared:
entry = token * (K + S) + slot, R = T * (K + S) entries in all.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - CPU installs without triton run the torch path
    triton = None

# The kernels run on CUDA tensors. Under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported) the
# tests set CPU_INTERPRET to run them on CPU tensors; nothing else ever routes CPU work through them.
CPU_INTERPRET = False
MAX_ROUTER_TOKENS = 1024  # beyond this a GEMM-based router reads the gate weight once instead of per token
MAX_ENTRIES = 4096  # beyond this (prefill) torch's grouped GEMMs are faster than these decode kernels
SCAN = 128  # routing entries _plan_kernel scans at a time to find an expert's own


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused kernels may run on x: Triton present, a CUDA tensor (or the interpreter), no gradient
    wanted, and not switched off with R1LAB_KERNELS=0 (for A/B benchmarks)."""
    if triton is None or torch.is_grad_enabled() or os.environ.get("R1LAB_KERNELS", "1") == "0":
        return False
    if x.is_cuda:  # bf16/fp16 only: in fp32, tl.dot would round its inputs to tf32
        return x.dtype in (torch.bfloat16, torch.float16)
    return CPU_INTERPRET and x.device.type == "cpu"


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def router_supported(gate) -> bool:
    """The fused router implements V3's routing: sigmoid scores, group-limited top-k on biased scores."""
    E, G = gate.n_experts, gate.n_group
    return (gate.method == "noaux_tc" and gate.scoring == "sigmoid" and _pow2(E) and _pow2(G)
            and E // G >= 2 and gate.topk_group <= G and gate.top_k <= E)


if triton is not None:

    @triton.jit
    def _router_logits_kernel(x_ptr, w_ptr, out_ptr, D, E: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr):
        """Program (token, block of BE experts): fp32 logits x . w_e, for _router_kernel's LOGITS mode."""
        t = tl.program_id(0)
        re = tl.program_id(1) * BE + tl.arange(0, BE)
        acc = tl.zeros((BE, BD), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            xv = tl.load(x_ptr + t * D + rd, mask=rd < D, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + re[:, None] * D + rd[None, :], mask=(rd < D)[None, :], other=0.0).to(tl.float32)
            acc += wv * xv[None, :]
        tl.store(out_ptr + t * E + re, tl.sum(acc, axis=1))

    @triton.jit
    def _router_kernel(x_ptr, w_ptr, bias_ptr, out_w_ptr, out_idx_ptr, D, scale,
                       E: tl.constexpr, G: tl.constexpr, TOPG: tl.constexpr, K: tl.constexpr,
                       KP: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr, LOGITS: tl.constexpr):
        """One program per token: scores, group selection and top-k, as Gate.forward does it. LOGITS: x_ptr
        holds the (T, E) fp32 logits already (from _router_logits_kernel); else the program computes them."""
        t = tl.program_id(0)
        re = tl.arange(0, E)
        if LOGITS:
            logits = tl.load(x_ptr + t * E + re)
        else:
            acc = tl.zeros((E, BD), dtype=tl.float32)
            for d0 in range(0, D, BD):
                rd = d0 + tl.arange(0, BD)
                xv = tl.load(x_ptr + t * D + rd, mask=rd < D, other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + re[:, None] * D + rd[None, :], mask=(rd < D)[None, :], other=0.0)
                acc += wv.to(tl.float32) * xv[None, :]
            logits = tl.sum(acc, axis=1)
        s = tl.sigmoid(logits)  # (E,) unbiased scores: the gating weights
        c = s + tl.load(bias_ptr + re)  # biased scores: the selection
        # each group's score: the sum of its two best biased scores (the best twice when it occurs twice)
        EG: tl.constexpr = E // G
        cg = tl.reshape(c, (G, EG))
        m1 = tl.max(cg, axis=1)
        a1 = tl.argmax(cg, axis=1)
        cols = tl.arange(0, EG)
        m2 = tl.max(tl.where(cols[None, :] == a1[:, None], float("-inf"), cg), axis=1)
        gs = m1 + m2  # (G,)
        rg = tl.arange(0, G)
        keep = rg < 0
        for _ in tl.static_range(TOPG):  # best groups first; ties go to the lower index, as in Gate.forward
            g = tl.argmax(gs, axis=0)
            keep = keep | (rg == g)
            gs = tl.where(rg == g, float("-inf"), gs)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, None], (G, EG)), (E,))
        c = tl.where(keep_e, c, float("-inf"))
        rk = tl.arange(0, KP)
        ws = tl.zeros((KP,), dtype=tl.float32)
        ids = tl.zeros((KP,), dtype=tl.int32)
        for j in tl.static_range(K):
            i = tl.argmax(c, axis=0)
            ws = tl.where(rk == j, tl.sum(tl.where(re == i, s, 0.0), axis=0), ws)
            ids = tl.where(rk == j, i, ids)
            c = tl.where(re == i, float("-inf"), c)
        if NORM:
            ws = ws / (tl.sum(ws, axis=0) + 1e-20)
        tl.store(out_w_ptr + t * K + rk, ws * scale, mask=rk < K)
        tl.store(out_idx_ptr + t * K + rk, ids.to(tl.int64), mask=rk < K)

    @triton.jit
    def _plan_kernel(idx_ptr, plan_ptr, cnt_ptr, n_routed, T, K, BR: tl.constexpr):
        """Program e: routed expert e's entries, found once for both expert kernels. Scans idx (T, K) BR at a
        time (a running count ranks each match) and writes the flat indices t*K + k of the (token, slot) pairs
        routed to e, in order, to plan[e, :count], and count to cnt[e]. A shared expert (e >= n_routed) takes
        every token: cnt[e] = T. Nothing is sorted."""
        e = tl.program_id(0)
        one = tl.arange(0, 1)
        if e < n_routed:
            n = tl.sum(tl.zeros((BR,), dtype=tl.int32), axis=0)  # matches so far
            for r0 in range(0, T * K, BR):
                r = r0 + tl.arange(0, BR)
                m = (tl.load(idx_ptr + r, mask=r < T * K, other=-1) == e).to(tl.int32)
                rank = n + tl.cumsum(m, axis=0) - 1
                tl.store(plan_ptr + e.to(tl.int64) * T + rank, r, mask=m == 1)
                n += tl.sum(m, axis=0)
            tl.store(cnt_ptr + e + one, tl.zeros((1,), dtype=tl.int64) + n)
        else:
            tl.store(cnt_ptr + e + one, tl.zeros((1,), dtype=tl.int64) + T)

    @triton.jit
    def _entries(plan_ptr, w_ptr, e, mb, count, n_routed, T, K, S, BM: tl.constexpr):
        """Block mb (BM rows) of expert e's entries: (entry, token, gating weight, valid), each (BM,).
        Routed expert: from _plan_kernel's list. Shared expert s: every token, weight 1."""
        want = mb * BM + tl.arange(0, BM)
        valid = want < count
        if e < n_routed:
            q = tl.load(plan_ptr + e.to(tl.int64) * T + want, mask=valid, other=0)  # flat index t*K + k
            tok = q // K
            entry = q + tok * S
            gw = tl.load(w_ptr + q, mask=valid, other=0.0)
        else:
            tok = want
            entry = want * (K + S) + K + (e - n_routed)
            gw = tl.where(valid, 1.0, 0.0)
        return entry, tok, gw, valid

    @triton.jit
    def _experts_up_kernel(x_ptr, plan_ptr, cnt_ptr, w_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, n_routed, T, K, S, D,
                           I, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Program (expert e, block of BN inner channels, block of BM of e's entries):
        h[entry] = silu(x[token] Wg^T) * (x[token] Wu^T), h in entry order (R, I)."""
        e = tl.program_id(0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mb = tl.program_id(2)
        count = tl.load(cnt_ptr + e)
        if mb * BM < count:  # the expert's entries reach this block
            entry, tok, gw, valid = _entries(plan_ptr, w_ptr, e, mb, count, n_routed, T, K, S, BM)
            if e < n_routed:
                wg = wg_ptr + e.to(tl.int64) * I * D
                wu = wu_ptr + e.to(tl.int64) * I * D
            else:  # a shared expert: rows [s*I, (s+1)*I) of the shared MLP's (S*I, D) weights
                wg = sg_ptr + (e - n_routed).to(tl.int64) * I * D
                wu = su_ptr + (e - n_routed).to(tl.int64) * I * D
            acc_g = tl.zeros((BM, BN), dtype=tl.float32)
            acc_u = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, D, BK):
                rk = k0 + tl.arange(0, BK)
                xa = tl.load(x_ptr + tok[:, None] * D + rk[None, :], mask=valid[:, None], other=0.0)
                acc_g = tl.dot(xa, tl.load(wg + rn[None, :] * D + rk[:, None]), acc_g)
                acc_u = tl.dot(xa, tl.load(wu + rn[None, :] * D + rk[:, None]), acc_u)
            h = acc_g * tl.sigmoid(acc_g) * acc_u
            tl.store(h_ptr + entry[:, None] * I + rn[None, :], h.to(h_ptr.dtype.element_ty), mask=valid[:, None])

    @triton.jit
    def _experts_down_kernel(h_ptr, plan_ptr, cnt_ptr, w_ptr, wd_ptr, sd_ptr, y_ptr, n_routed, T, K, S, D, I,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Program (expert e, block of BN output channels, block of BM of e's entries):
        y[entry] = gating weight * (h[entry] Wd^T) in fp32, y in entry order (R, D), so the sum over a token's
        slots is a plain reduction afterwards (deterministic, no atomics)."""
        e = tl.program_id(0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mb = tl.program_id(2)
        count = tl.load(cnt_ptr + e)
        if mb * BM < count:  # the expert's entries reach this block
            entry, tok, gw, valid = _entries(plan_ptr, w_ptr, e, mb, count, n_routed, T, K, S, BM)
            if e < n_routed:  # routed down_proj (E, D, I)
                wd = wd_ptr + e.to(tl.int64) * D * I
                row = I
            else:  # shared down_proj (D, S*I): columns [s*I, (s+1)*I)
                wd = sd_ptr + (e - n_routed).to(tl.int64) * I
                row = S * I
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, I, BK):
                rk = k0 + tl.arange(0, BK)
                ha = tl.load(h_ptr + entry[:, None] * I + rk[None, :], mask=valid[:, None], other=0.0)
                acc = tl.dot(ha, tl.load(wd + rn[None, :] * row + rk[:, None]), acc)
            tl.store(y_ptr + entry[:, None] * D + rn[None, :], acc * gw[:, None], mask=valid[:, None])

    @triton.jit
    def _attn_slots(q_c, q_r, kv_ptr, krow, live, rc, rr, m_i, l_i, acc, scale, C: tl.constexpr, R: tl.constexpr):
        """One block of cache slots in both latent-attention kernels: load the slots' latents and roped keys
        (rows `krow` of kv, those `live`), score the block of heads against them, and fold them into the online
        softmax state (max m_i, sum l_i, unnormalised output acc). Returns the new state."""
        kc = tl.load(kv_ptr + krow + rc[None, :], mask=live[:, None] & (rc < C)[None, :], other=0.0)
        kr = tl.load(kv_ptr + krow + C + rr[None, :], mask=live[:, None] & (rr < R)[None, :], other=0.0)
        kc = kc.to(q_c.dtype)
        sc = tl.dot(q_c, tl.trans(kc)) + tl.dot(q_r, tl.trans(kr.to(q_r.dtype)))  # (HB, BT) fp32
        sc = tl.where(live[None, :], sc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc)
        return m_new, l_i, acc

    @triton.jit
    def _store_split(m_ptr, l_ptr, o_ptr, out, heads, rc, m_i, l_i, acc, C: tl.constexpr):
        """A split's softmax state for the combine: rows `out` (those of real `heads`) of m, l and o."""
        tl.store(m_ptr + out, m_i, mask=heads)
        tl.store(l_ptr + out, l_i, mask=heads)
        tl.store(o_ptr + out[:, None] * C + rc[None, :], acc, mask=heads[:, None] & (rc < C)[None, :])

    @triton.jit
    def _latent_attn_kernel(q_ptr, kv_ptr, mask_ptr, m_ptr, l_ptr, o_ptr, T, span, scale,
                            H: tl.constexpr, C: tl.constexpr, R: tl.constexpr, HB: tl.constexpr,
                            CP: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr):
        """Program (sequence b, split s, block of HB heads): MLA's absorbed decode attention of one token's H heads (q (B, H, C+R):
        latent query ; roped query) over the cache slots [s*span, (s+1)*span) of kv (B, T, C+R) that mask (B, T)
        allows. One key/value head shared by all heads (MQA in latent space): key = [latent ; roped key], value
        = latent. Online softmax; writes the split's max m, sum l (B, NS, H) and unnormalised output o
        (B, NS, H, C) in fp32 for the combine (flash-decoding)."""
        b = tl.program_id(0)
        sp = tl.program_id(1)
        ns = tl.num_programs(1)
        rh = tl.program_id(2) * HB + tl.arange(0, HB)
        rc = tl.arange(0, CP)
        rr = tl.arange(0, RP)
        W: tl.constexpr = C + R
        qrow = (b * H + rh[:, None]) * W
        q_c = tl.load(q_ptr + qrow + rc[None, :], mask=(rh < H)[:, None] & (rc < C)[None, :], other=0.0)
        q_r = tl.load(q_ptr + qrow + C + rr[None, :], mask=(rh < H)[:, None] & (rr < R)[None, :], other=0.0)
        m_i = tl.full((HB,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((HB,), dtype=tl.float32)
        acc = tl.zeros((HB, CP), dtype=tl.float32)
        start = sp * span
        end = tl.minimum(start + span, T)
        for t0 in range(start, end, BT):
            rt = t0 + tl.arange(0, BT)
            live = (rt < end) & (tl.load(mask_ptr + b * T + rt, mask=rt < end, other=0) != 0)
            if tl.sum(live.to(tl.int32), axis=0) > 0:
                krow = (b * T + rt[:, None]).to(tl.int64) * W
                m_i, l_i, acc = _attn_slots(q_c, q_r, kv_ptr, krow, live, rc, rr, m_i, l_i, acc, scale, C, R)
        _store_split(m_ptr, l_ptr, o_ptr, (b * ns + sp) * H + rh, rh < H, rc, m_i, l_i, acc, C)

    ATTN_BT = 32  # cache slots per inner iteration
    # Launch parameters of the paged kernel: slots per inner iteration (a divisor of the page), warps, software
    # pipeline stages, and the programs aimed at over the whole batch (8 waves of an H200's 132 SMs), which set
    # the splits per sequence, with at least `span` positions in each (a split writes H x C fp32 partial outputs
    # that the combine reads back: with V2-Lite's 16 heads and 64 positions per split, ~90% more traffic than the
    # split's cache reads, which is what a batch-1 step at long context pays). The fastest of benchmarks/paged_attention.py's 36
    # settings on an H200 at 32 sequences x 32,000 positions: 3.04 TB/s, 72% of its copy bandwidth (the old
    # 32/4/3/264: 1.91 TB/s). span 256 against 64 on an H100: 65 against 73 us at 1 x 32,000, the same (487 us)
    # at 32 x 32,000.
    PAGED_ATTN = dict(BT=64, num_warps=4, num_stages=4, programs=1056, span=256)

    def _attn_outputs(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int):
        """The split's outputs m, l (B, NS, H) and o (B, NS, H, C), fp32, and the slots per split."""
        B, H, _ = q.shape
        T = kv.shape[1]
        # splits of the cache: enough programs to occupy the GPU at batch 1, none to spare at large batches
        ns = max(1, min(triton.cdiv(T, 64), triton.cdiv(264, B)))
        span = triton.cdiv(triton.cdiv(T, ns), ATTN_BT) * ATTN_BT
        ns = triton.cdiv(T, span)
        f32 = dict(dtype=torch.float32, device=q.device)
        return (torch.empty(B, ns, H, **f32), torch.empty(B, ns, H, **f32),
                torch.empty(B, ns, H, kv_lora_rank, **f32), span)

    # An opaque custom op, not a triton_op like the MoE kernels: torch.compile calls it as it is instead of
    # compiling the kernel itself. Inductor's compile of it failed on the H200 (it types the float `scale` as
    # fp64, which turned the online softmax's loop-carried fp32 state into fp64).
    @torch.library.custom_op("r1lab::latent_attention", mutates_args=())
    def _latent_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scale: float,
                          kv_lora_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, W = q.shape
        C, R = kv_lora_rank, W - kv_lora_rank
        m, l, o, span = _attn_outputs(q, kv, kv_lora_rank)
        p2 = triton.next_power_of_2
        # 16 heads per program (a 16-row tile for tl.dot; more would not fit V3's 512-wide latent in registers)
        _latent_attn_kernel[(B, m.shape[1], triton.cdiv(H, 16))](
            q, kv, mask, m, l, o, kv.shape[1], span, scale, H=H, C=C, R=R, HB=16, CP=max(16, p2(C)),
            RP=max(16, p2(R)), BT=ATTN_BT, num_warps=4)
        return m, l, o

    @_latent_attention.register_fake
    def _(q, kv, mask, scale, kv_lora_rank):
        return _attn_outputs(q, kv, kv_lora_rank)[:3]

    @triton.jit
    def _paged_latent_attn_kernel(q_ptr, pool_ptr, bt_ptr, lens_ptr, m_ptr, l_ptr, o_ptr, bt_stride, scale,
                                  H: tl.constexpr, C: tl.constexpr, R: tl.constexpr, HB: tl.constexpr,
                                  CP: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, PAGE: tl.constexpr):
        """_latent_attn_kernel over a paged cache (FlashMLA's layout): position t of sequence b is row t % PAGE of
        page bt[b, t // PAGE] of the pool (pages, PAGE, C+R), and the live positions are 0..lens[b]-1. Split s
        of NS covers its share of the sequence's *own* length, so the work (and the bytes read) follow each
        sequence's length, not the block table's capacity; the grid stays static for CUDA graphs."""
        b = tl.program_id(0)
        sp = tl.program_id(1)
        ns = tl.num_programs(1)
        rh = tl.program_id(2) * HB + tl.arange(0, HB)
        rc = tl.arange(0, CP)
        rr = tl.arange(0, RP)
        W: tl.constexpr = C + R
        qrow = (b * H + rh[:, None]) * W
        q_c = tl.load(q_ptr + qrow + rc[None, :], mask=(rh < H)[:, None] & (rc < C)[None, :], other=0.0)
        q_r = tl.load(q_ptr + qrow + C + rr[None, :], mask=(rh < H)[:, None] & (rr < R)[None, :], other=0.0)
        m_i = tl.full((HB,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((HB,), dtype=tl.float32)
        acc = tl.zeros((HB, CP), dtype=tl.float32)
        n = tl.load(lens_ptr + b)
        span = tl.cdiv(tl.cdiv(n, ns), BT) * BT
        start = sp * span
        end = tl.minimum(start + span, n)
        for t0 in range(start, end, BT):
            rt = t0 + tl.arange(0, BT)
            live = rt < end
            page = tl.load(bt_ptr + b * bt_stride + rt // PAGE, mask=live, other=0)
            krow = (page.to(tl.int64) * PAGE + rt % PAGE)[:, None] * W
            m_i, l_i, acc = _attn_slots(q_c, q_r, pool_ptr, krow, live, rc, rr, m_i, l_i, acc, scale, C, R)
        _store_split(m_ptr, l_ptr, o_ptr, (b * ns + sp) * H + rh, rh < H, rc, m_i, l_i, acc, C)

    def _paged_outputs(q: torch.Tensor, block_table: torch.Tensor, page: int, kv_lora_rank: int):
        """m, l (B, NS, H), o (B, NS, H, C) fp32 for the paged kernel. NS from the table's capacity and the
        batch (as _attn_outputs, PAGED_ATTN["programs"] in all); each sequence spreads its own length over the
        NS splits. sym_min/sym_max: under torch.compile with a symbolic table width (the engine's one decode
        graph for every width) NS stays an expression of it, where min/max would guard on the comparison and
        recompile the step at the width where it flips."""
        B, H, _ = q.shape
        cap = triton.cdiv(PAGED_ATTN["programs"], B)
        ns = torch.sym_max(1, torch.sym_min(block_table.shape[1] * page // PAGED_ATTN["span"], cap))
        f32 = dict(dtype=torch.float32, device=q.device)
        return (torch.empty(B, ns, H, **f32), torch.empty(B, ns, H, **f32),
                torch.empty(B, ns, H, kv_lora_rank, **f32))

    @torch.library.custom_op("r1lab::paged_latent_attention", mutates_args=())
    def _paged_latent_attention(q: torch.Tensor, pool: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor,
                                scale: float, kv_lora_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, W = q.shape
        C, R, page = kv_lora_rank, W - kv_lora_rank, pool.shape[1]
        m, l, o = _paged_outputs(q, block_table, page, kv_lora_rank)
        p2 = triton.next_power_of_2
        t = PAGED_ATTN
        _paged_latent_attn_kernel[(B, m.shape[1], triton.cdiv(H, 16))](
            q, pool, block_table, lens, m, l, o, block_table.stride(0), scale, H=H, C=C, R=R, HB=16,
            CP=max(16, p2(C)), RP=max(16, p2(R)), BT=t["BT"], PAGE=page, num_warps=t["num_warps"],
            num_stages=t["num_stages"])
        return m, l, o

    @_paged_latent_attention.register_fake
    def _(q, pool, block_table, lens, scale, kv_lora_rank):
        return _paged_outputs(q, block_table, pool.shape[1], kv_lora_rank)

    @triton_op("r1lab::moe_route", mutates_args={})
    def _route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
               topk_group: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        T, D = x.shape
        w = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
        idx = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
        E = weight.shape[0]
        cfg = dict(ROUTER_TILES(T, E, D))
        be = cfg.pop("BE", 0)
        if be:  # two kernels: logits with E/BE programs per token, then the selection
            logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
            wrap_triton(_router_logits_kernel)[(T, E // be)](x, weight, logits, D, E=E, BE=be, BD=cfg["BD"])
            x, cfg["num_warps"] = logits, cfg.pop("select_warps", cfg["num_warps"])
        wrap_triton(_router_kernel)[(T,)](
            x, weight, bias, w, idx, D, scale, E=E, G=n_group, TOPG=topk_group, K=top_k,
            KP=triton.next_power_of_2(top_k), NORM=norm, LOGITS=bool(be), **cfg)
        return w, idx

    @triton_op("r1lab::moe_experts", mutates_args={})
    def _experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                 wd: torch.Tensor, sg: torch.Tensor, su: torch.Tensor, sd: torch.Tensor,
                 n_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
        T, D = x.shape
        K = idx.shape[1]
        E, I = wg.shape[0], wg.shape[1]
        R = T * (K + n_shared)
        # An expert holds at most T entries (a token picks it once): plan rows of T, and the kernels' third axis
        # covers them in BM-row blocks.
        plan = torch.empty(E, T, dtype=torch.int32, device=x.device)
        counts = torch.empty(E + n_shared, dtype=torch.int64, device=x.device)
        h = torch.empty(R, I, dtype=x.dtype, device=x.device)
        y = torch.empty(R, D, dtype=torch.float32, device=x.device)
        up, down = EXPERT_TILES(T, D, I)
        wrap_triton(_plan_kernel)[(E + n_shared,)](idx, plan, counts, E, T, K, BR=SCAN, num_warps=4)
        wrap_triton(_experts_up_kernel)[(E + n_shared, I // up["BN"], triton.cdiv(T, up["BM"]))](
            x, plan, counts, w, wg, wu, sg, su, h, E, T, K, n_shared, D, I, **up)
        wrap_triton(_experts_down_kernel)[(E + n_shared, D // down["BN"], triton.cdiv(T, down["BM"]))](
            h, plan, counts, w, wd, sd, y, E, T, K, n_shared, D, I, **down)
        return y, counts


def _fit(pref: int, *dims: int) -> int:
    """The largest power of two <= pref dividing every dim (at least 16, which experts_supported ensures)."""
    while pref > 16 and any(d % pref for d in dims):
        pref //= 2
    return pref


def router_tiles(T: int, E: int, D: int) -> dict:
    """Launch parameters of the router, chosen with `benchmarks/moe_kernels.py --sweep` on an H200 (bench-moe-1b,
    see benchmarks/LOG.md): the logits from a kernel of their own (BE experts per program, so E/BE programs share
    each token's weight reads), then the selection in one warp (its ~20 small reductions stay in-warp)."""
    return dict(BD=256, num_warps=4, BE=min(E, 4 if T <= 32 else 8), select_warps=1)


def expert_tiles(T: int, D: int, I: int) -> tuple[dict, dict]:
    """Launch parameters of the two expert kernels, (up, down), chosen as router_tiles. One to a few tokens:
    long K-steps and deep pipelines (few rows, so the weight reads must be in flight at once); more tokens:
    64-wide tiles, where both kernels run at ~3.3 TB/s of weight reads."""
    if T <= 8:
        up = dict(BM=16, BN=_fit(32, I), BK=_fit(256, D), num_warps=4, num_stages=4)
        down = dict(BM=16, BN=_fit(64, D), BK=_fit(128, I), num_warps=4, num_stages=4)
    else:
        up = dict(BM=16, BN=_fit(64, I), BK=_fit(64, D), num_warps=4, num_stages=3)
        down = dict(BM=16, BN=_fit(64, D), BK=_fit(64, I), num_warps=4, num_stages=3)
    return up, down


ROUTER_TILES, EXPERT_TILES = router_tiles, expert_tiles  # what the ops call (the sweep swaps them)


def experts_supported(dim: int, inter: int) -> bool:
    """Tile shapes: the kernels need D and I to be multiples of 64 (16-wide tiles at least)."""
    return dim % 64 == 0 and inter % 64 == 0


def route(x: torch.Tensor, gate) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate.forward's (weights (T, K) fp32, expert indices (T, K)) from the router kernels. x (T, D)."""
    return _route(x.contiguous(), gate.weight, gate.e_score_correction_bias, gate.top_k, gate.n_group,
                  gate.topk_group, gate.norm_topk_prob, float(gate.scale))


def experts(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, routed, shared) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE layer's output before the residual, sum_k w_k expert_k(x) + shared(x), as (T, D) in x's dtype,
    and the tokens routed to each expert (E,) (for the load counter).

    x (T, D); w (T, K) fp32 gating weights; idx (T, K) expert indices; routed: moe.Experts; shared: the shared
    MLP or None. A small kernel lists each expert's entries (a scan of idx per expert): nothing is sorted."""
    T, K = idx.shape
    E = routed.gate_proj.shape[0]
    S = 0 if shared is None else shared.gate_proj.weight.shape[0] // routed.gate_proj.shape[1]
    if shared is None:
        sg, su, sd = routed.gate_proj, routed.up_proj, routed.down_proj  # never read (no expert >= E)
    else:
        sg, su, sd = shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
    y, counts = _experts(x.contiguous(), idx.contiguous(), w.float().contiguous(), routed.gate_proj, routed.up_proj,
                         routed.down_proj, sg, su, sd, S)
    return y.view(T, K + S, -1).sum(1).to(x.dtype), counts[:E]


def attention_enabled(x: torch.Tensor) -> bool:
    """The latent-attention decode kernel runs on CUDA by default: on an H200 (benchmarks/long_context.py,
    deepseek-v2-lite, eager steps in CUDA graphs) it beat the torch path (pages gathered to the block-table
    width, bmm, softmax, bmm) at batch 32 by 1.3-1.9x from 1K to 32K context; at batch 1 it was 1.35x faster at
    128K, even at 32K and 7% slower at 8K (before its launch settings were tuned). R1LAB_ATTN_KERNEL=0
    selects the torch path; =1 also turns it on under Triton's CPU interpreter (off there by default: slow)."""
    flag = os.environ.get("R1LAB_ATTN_KERNEL")
    return (x.is_cuda if flag is None else flag == "1") and enabled(x)


def latent_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scale: float,
                     kv_lora_rank: int) -> torch.Tensor:
    """MLA's absorbed decode attention for one query token per sequence: q (B, H, C+R) [latent query ; roped
    query], kv (B, T, C+R) the latent cache, mask (B, T) bool (True = attend) -> (B, H, C) fp32, the softmax-
    weighted latents (what MLA._absorbed gets from its two batched matmuls). Splits of the cache are combined
    here, in torch ops the compiler fuses."""
    m, l, o = _latent_attention(q.contiguous(), kv, mask.contiguous(), float(scale), kv_lora_rank)
    return _combine(m, l, o)


def paged_latent_attention(q: torch.Tensor, pool: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor,
                           scale: float, kv_lora_rank: int) -> torch.Tensor:
    """latent_attention over a paged cache: pool (pages, page, C+R), block_table (B, P) page ids (rows may be
    a column slice of a wider table), lens (B,) live positions per sequence (>= 1) -> (B, H, C) fp32. Reads
    only each sequence's first lens[b] positions. page must be a multiple of PAGED_ATTN["BT"] (64)."""
    bt = PAGED_ATTN["BT"]
    assert pool.shape[1] % bt == 0, f"page size {pool.shape[1]} is not a multiple of {bt}"
    m, l, o = _paged_latent_attention(q.contiguous(), pool, block_table, lens.to(torch.int32).contiguous(),
                                      float(scale), kv_lora_rank)
    return _combine(m, l, o)


def _combine(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Flash-decoding's combine of the splits' (max, sum, unnormalised output) into softmax-weighted latents."""
    top = m.amax(1, keepdim=True)  # (B, 1, H): every row has a live slot, so this is finite
    w = torch.exp(m - top)  # (B, NS, H); splits without a live slot weigh 0
    return (o * w[..., None]).sum(1) / (l * w).sum(1)[..., None]
