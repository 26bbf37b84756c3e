"""Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1; V3 paper, section 2.1.1).

Dimension legend
  B batch, S query tokens, T key tokens, H heads, D hidden_size
  Q q_lora_rank, C kv_lora_rank (the cached latent), R qk_rope_head_dim (decoupled RoPE key, shared by heads)
  N qk_nope_head_dim, V v_head_dim

Keys and values come from one latent per token: c = kv_a_layernorm(kv_a_proj(x)[:C]) of width C, plus a
roped key k_pe = rope(kv_a_proj(x)[C:]) of width R that all heads share. Two ways to attend:

* full path (training, prefill without cache): expand c with kv_b_proj into per-head K_nope (N) and V (V).
  Packed training rows attend causally within each document (`DocumentMask`) without an (S, S) mask: on CUDA
  through FlexAttention with a block-sparse mask (blocks of other documents are skipped), elsewhere (the CPU,
  where FlexAttention has no backward) per document with SDPA over that document's slice of the row.
* absorbed path (decode over the cache): never expand. Fold kv_b_proj's key half W_UK into the query,
  q_lat = q_nope @ W_UK (H, C), attend over [c ; k_pe] as a single shared key/value head of width C+R
  (multi-query attention in latent space), then fold the value half W_UV into the output. The cache holds
  C+R numbers per token per layer (576 for V3) instead of H*(N+R+V) (40,960).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import kernels
from .config import ModelConfig
from .layers import RMSNorm, apply_rope


# ---------------------------------------------------------------------- document masking (training rows)
FLEX_BLOCK = 128  # FlexAttention's sparse block (its default): the mask is kept per 128 x 128 tile


@dataclass
class DocumentMask:
    """Causal attention within the documents packed into a row: query i sees key j iff j <= i and
    doc[b, j] == doc[b, i]. No (S, S) tensor is held.

    doc (B, S) int: each token's document number in its row, non-decreasing along the row.
    block_mask: FlexAttention's block-sparse form of the same mask (for rows padded to a multiple of
        FLEX_BLOCK), built by `document_mask` for CUDA rows; None selects the per-document SDPA path.
    """

    doc: torch.Tensor
    block_mask: BlockMask | None = None

    def dense(self) -> torch.Tensor:
        """The same mask as a dense bool (B, 1, S, S) tensor, True = may attend (the slow twin, for tests)."""
        S = self.doc.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=self.doc.device).tril()
        return ((self.doc[:, :, None] == self.doc[:, None, :]) & causal)[:, None]


def document_mask(doc: torch.Tensor, flex: bool | None = None) -> DocumentMask:
    """DocumentMask of `doc` (B, S); flex (default: on CUDA) also builds the FlexAttention block mask."""
    flex = doc.is_cuda if flex is None else flex
    return DocumentMask(doc, document_block_mask(doc) if flex else None)


def _pad_documents(doc: torch.Tensor) -> torch.Tensor:
    """doc (B, S) padded to a multiple of FLEX_BLOCK; the padding is one more document of its own (it sees only
    itself), so mask_mod never indexes past the row and the real tokens never see it."""
    pad = -doc.shape[1] % FLEX_BLOCK
    if not pad:
        return doc
    return torch.cat([doc, (doc[:, -1:] + 1).expand(-1, pad)], dim=1)


def document_block_mask(doc: torch.Tensor) -> BlockMask:
    """FlexAttention BlockMask of the document mask, built from each tile's first and last document number:
    O((S / 128)^2) work and memory, never the (S, S) mask (which create_block_mask would evaluate).

    With documents non-decreasing along the row, key tile j <= query tile i holds a visible key iff its last
    document reaches the query tile's first (last[j] >= first[i]); it is full (no element masked, mask_mod
    skipped) iff j < i and the whole span from key tile j to query tile i is one document
    (first[j] == last[i]). The diagonal tiles are partial (causal).
    """
    docp = _pad_documents(doc)
    B, Sp = docp.shape
    first, last = docp[:, ::FLEX_BLOCK], docp[:, FLEX_BLOCK - 1::FLEX_BLOCK]  # (B, n) per tile
    n = first.shape[1]
    tile = torch.arange(n, device=doc.device)
    below = tile[None, :] <= tile[:, None]  # (n_q, n_kv): key tile j <= query tile i
    visible = below & (last[:, None, :] >= first[:, :, None])  # (B, n_q, n_kv)
    full = below & (tile[None, :] < tile[:, None]) & (first[:, None, :] == last[:, :, None])
    partial = visible & ~full

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # count and indices of the True tiles of each query tile, True ones first in ascending order
        idx = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
        return blocks.sum(-1).to(torch.int32)[:, None], idx.to(torch.int32)[:, None]  # (B, 1, n), (B, 1, n, n)

    def mask_mod(b, h, q_idx, kv_idx):
        return (docp[b, q_idx] == docp[b, kv_idx]) & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(Sp, Sp))


_compiled_flex = None


def _flex(q, k, v, block_mask: BlockMask, scale: float) -> torch.Tensor:
    """flex_attention, compiled once per process on CUDA (eager FlexAttention materialises the scores); inside
    a compiled model (train.compile) the call is traced into the model's graph as it is."""
    global _compiled_flex
    if not q.is_cuda or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)


def _one_width(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v with the narrower of the query/key and the value heads zero-padded to the other's width. The CPU's
    fused (flash) SDPA takes only 4-D inputs whose heads are all one width; otherwise SDPA falls back to its
    unfused math, which holds the (S, S) scores and takes several passes over them. Zero query/key columns add
    nothing to the scores (pass the scale explicitly), and the output's zero value columns are cut off again."""
    E, Ev = q.shape[-1], v.shape[-1]
    if E < Ev:
        return F.pad(q, (0, Ev - E)), F.pad(k, (0, Ev - E)), v
    if Ev < E:
        return q, k, F.pad(v, (0, E - Ev))
    return q, k, v


@torch.compiler.disable  # the split follows the data (document lengths reach the host): eager even when compiled
def _per_document(q, k, v, doc: torch.Tensor, scale: float) -> torch.Tensor:
    """Variable-length attention as a loop: the rows are laid end to end per head, (1, H, B*S, E), split once
    into documents (no document crosses a row), and each document is causal SDPA over its own slice. One split
    and one cat for the whole batch: indexing row by row instead made each row's backward write a zero-filled
    (B, H, S, E) gradient, B times per layer (a third of a CPU pretraining step at B = 16, S = 256).
    4-D slices of one head width (`_one_width`) take the CPU's fused kernel: a speedrun layer's attention,
    forward and backward, takes about a fifth less time."""
    B, H, S, E = q.shape
    Ev = v.shape[-1]
    q, k, v = _one_width(q, k, v)
    row = torch.arange(B, device=doc.device, dtype=torch.long)[:, None] * (S + 1)  # doc numbers are <= S
    lens = torch.unique_consecutive(doc.long() + row, return_counts=True)[1].tolist()

    def flat(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.transpose(0, 1).reshape(1, H, B * S, t.shape[-1]).split(lens, dim=2)

    out = torch.cat([F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
                     for qd, kd, vd in zip(flat(q), flat(k), flat(v))], dim=2)
    return out[..., :Ev].reshape(H, B, S, Ev).transpose(0, 1)


def document_attention(q, k, v, mask: DocumentMask, scale: float) -> torch.Tensor:
    """Attention of q (B, H, S, E), k (B, H, S, E), v (B, H, S, Ev) under a DocumentMask -> (B, H, S, Ev).

    With a block mask (CUDA rows): FlexAttention, tiles of other documents skipped; a row whose length is not a
    multiple of FLEX_BLOCK is zero-padded to the block mask's length (the padding is its own document) and cut
    back. Without one: SDPA per document (CPU; FlexAttention has no backward there).
    """
    if mask.block_mask is None:
        return _per_document(q, k, v, mask.doc, scale)
    S = q.shape[2]
    pad = mask.block_mask.seq_lengths[0] - S
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    return _flex(q, k, v, mask.block_mask, scale)[:, :, :S]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        H, D = self.n_heads, cfg.hidden_size
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)

    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.unflatten(-1, (self.n_heads, self.qk_dim))  # (B, S, H, N+R)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores per token: normed latent c (B, S, C) and roped shared key k_pe (B, S, R)."""
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c), apply_rope(k_pe, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
        write_index: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        prefill: bool = False,
        block_table: torch.Tensor | None = None,
        prefix: int = 0,
    ) -> torch.Tensor:
        """x: (B, S, D); cos/sin: (B, S, R/2) for the tokens' positions.

        Without `cache`: full path, causal over the S tokens, or under `attn_mask`: bool (B, 1, S, S), True =
        attend, or a `DocumentMask` (packed training rows, no (S, S) tensor).
        With `cache` (rows, T, C+R) holding [latent ; k_pe] per slot: the new tokens' entries are written in
        place at positions `write_index` (B, S) of cache rows `cache_rows` (B,) (default: row b for batch row b).
        Then either `prefill`: the S tokens are a sequence's whole context, so attend among them on the full
        path (compute-efficient for long prompts); or the absorbed path over all T slots of the rows under
        `attn_mask` (bool (B, 1, S, T)), which the caller builds (it knows which slots are live).

        Paged (`block_table` (B, P), the engine's layout): `cache` is a pool of pages (pages, page, C+R) and
        position p of batch row b lives at slot p % page of page block_table[b, p // page]; T = P * page.
        `prefix` (prefill only, B = 1): the S tokens follow `prefix` positions already in the cache (a prefix-
        cache hit, or the earlier chunks of a long prompt), and attend to those as well.
        """
        q_nope, q_pe = self._query(x, cos, sin)
        c, k_pe = self.latent(x, cos, sin)
        if cache is not None:
            new = torch.cat([c, k_pe], dim=-1).to(cache.dtype)  # (B, S, C+R)
            # index_put_ on the cache itself, not scatter_ and not through a view of it: compiled (torch 2.11),
            # either becomes a copy of the whole cache plus a copy back, twice the pool's bytes per layer per
            # decode step (a 131K-token pool: 0.9 ms of a 2.7 ms step); this writes B*S rows.
            if block_table is not None:
                page = cache.shape[1]
                cache[block_table.gather(1, write_index // page), write_index % page] = new  # page, row: (B, S)
            else:
                rows = torch.arange(x.shape[0], device=x.device) if cache_rows is None else cache_rows
                cache[rows[:, None], write_index] = new
            if prefill and prefix:
                return self._prefill_over_cache(q_nope, q_pe, cache, block_table, prefix)
            if not prefill:
                return self._absorbed(q_nope, q_pe, cache, attn_mask, block_table)
        return self._full(q_nope, q_pe, c, k_pe, attn_mask)

    def _full(self, q_nope, q_pe, c, k_pe, attn_mask):
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(c).unflatten(-1, (H, self.nope_dim + self.v_dim))  # (B, S, H, N+V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, S, H, N+R)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope_dim)], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, .)
        if isinstance(attn_mask, DocumentMask):
            out = document_attention(q, k, v, attn_mask, self.softmax_scale)  # (B, H, S, V)
        elif attn_mask is None and q.device.type == "cpu":  # causal: heads of one width take the fused kernel
            out = F.scaled_dot_product_attention(*_one_width(q, k, v), is_causal=True,
                                                 scale=self.softmax_scale)[..., : self.v_dim]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                                 scale=self.softmax_scale)  # (B, H, S, V)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _prefill_over_cache(self, q_nope, q_pe, cache, block_table, prefix):
        """Full-path attention of S new tokens (one sequence) over its `prefix` cached positions and
        themselves: the cached latents are expanded with kv_b_proj as the new ones are, so this equals `_full`
        over the whole context for the last S queries. Compute-bound like `_full`; the lower-right causal
        bias keeps SDPA on its fused kernels (no (S, T) mask is built)."""
        B, S, H, _ = q_nope.shape
        assert B == 1, "prefill over cached positions runs one sequence at a time"
        T = prefix + S
        kv = cache[block_table[:, : -(-T // cache.shape[1])]].flatten(1, 2)[:, :T]  # (1, T, C+R), new ones too
        c, k_pe = kv.to(q_nope.dtype).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c).unflatten(-1, (H, self.nope_dim + self.v_dim))  # (1, T, H, N+V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (1, S, H, N+R)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, H, self.rope_dim)], dim=-1)  # (1, T, H, N+R)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=causal_lower_right(S, T),
            scale=self.softmax_scale)  # (1, H, S, V)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _absorbed(self, q_nope, q_pe, cache, attn_mask, block_table=None):
        H, C = self.n_heads, self.kv_lora_rank
        w = self.kv_b_proj.weight.unflatten(0, (H, self.nope_dim + self.v_dim))  # (H, N+V, C)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, N, C), (H, V, C)
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # (B, S, H, C)
        B, S = q_lat.shape[:2]
        q = torch.cat([q_lat, q_pe], dim=-1).flatten(1, 2)  # (B, S*H, C+R): heads fold into rows
        if S == 1 and attn_mask is not None and kernels.attention_enabled(q):
            if block_table is not None:  # reads each sequence's own pages up to its length, nothing more
                lens = attn_mask[:, 0, 0].sum(-1)  # (B,): the engine's masks are prefixes 0..pos
                out = kernels.paged_latent_attention(q, cache, block_table, lens, self.softmax_scale, C)
            elif cache.shape[0] == B:
                out = kernels.latent_attention(q, cache, attn_mask[:, 0, 0], self.softmax_scale, C)  # (B, H, C)
            else:
                out = None
            if out is not None:
                out = torch.einsum("bhsc,hvc->bshv", out.to(q.dtype)[:, :, None], w_uv)  # (B, 1, H, V)
                return self.o_proj(out.flatten(2))
        if block_table is not None:  # the sequences' pages side by side: (B, P*page, C+R); index_select copies
            # whole pages (1.6x faster than cache[block_table] on a CPU, where this gather was a third of decode)
            cache = cache.index_select(0, block_table.flatten()).unflatten(0, block_table.shape).flatten(1, 2)
        kv = cache.to(q.dtype)  # (B, T, C+R): one key shared by all heads (MQA in latent space)
        # Plain batched matmuls, not SDPA with enable_gqa: that would materialise K per head (H x the cache).
        scores = torch.bmm(q, kv.transpose(1, 2)).float() * self.softmax_scale  # (B, S*H, T)
        if attn_mask is not None:  # (B, 1, S, T) -> one row per (query, head)
            mask = attn_mask[:, 0, :, None, :].expand(B, S, H, -1).flatten(1, 2)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        out = torch.bmm(probs, kv[..., :C]).unflatten(1, (S, H)).transpose(1, 2)  # (B, H, S, C): value = latent
        out = torch.einsum("bhsc,hvc->bshv", out, w_uv)  # (B, S, H, V)
        return self.o_proj(out.flatten(2))
