"""The DeepSeek-V3 decoder: blocks of MLA + (dense MLP | DeepSeekMoE), and multi-token prediction.

Module names equal the published checkpoints' tensor names (`model.layers.3.self_attn.kv_b_proj.weight`,
`lm_head.weight`), except two things r1lab.checkpoint maps: routed experts are stacked into one tensor per
projection, and the MTP modules live in `mtp.k` rather than `model.layers.{num_hidden_layers + k}`.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MLA
from .config import ModelConfig
from .head import DEFAULT_CHUNK, head_logprob_sum, head_logprobs
from .layers import MLP, KeepFP32Buffers, RMSNorm, rope_cos_sin, rope_inv_freq
from .moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, write_index=None, cache_rows=None, prefill=False,
                block_table=None, prefix=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, write_index, cache_rows, prefill,
                               block_table, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm: the checkpoints' `model.*`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """One multi-token-prediction depth (V3 paper, eq. 21-23): from the main model's hidden state at
    position i and the embedding of token i+1, predict token i+2. Embedding and head are the main model's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, cfg.num_hidden_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # the checkpoints' `shared_head.norm`


class Transformer(KeepFP32Buffers):
    """The model. `model(input_ids) -> logits (B, S, vocab)`.

    Build on the meta device for large configs (`with torch.device("meta"): Transformer(cfg)`), then
    `to_empty(device=...)` and `init_weights()`, or use r1lab.load_pretrained.
    """

    fp32_buffers = ("inv_freq",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_nextn_predict_layers))
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        cache: list[torch.Tensor] | None = None,
        write_index: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        prefill: bool = False,
        block_table: torch.Tensor | None = None,
        prefix: int = 0,
        return_mtp: bool = False,
        return_hidden: bool = False,
    ):
        """input_ids (B, S) -> logits (B, S, vocab) in the compute dtype.

        positions (B, S): token positions (default 0..S-1). attn_mask: bool, True = may attend; (B, 1, S, S)
        without cache (default causal), (B, 1, S, T) with one. cache: per layer a (B, T, kv_lora_rank +
        qk_rope_head_dim) buffer of [latent ; k_pe], written at `write_index` (B, S) (default: = positions) of
        rows `cache_rows` (B,) (default: batch row b -> cache row b). prefill: the tokens are their sequences'
        whole context (right-padded); attend on the full path while filling the cache.
        block_table (B, P): a paged cache (the engine's): each layer's cache is a pool (pages, page, width) and
            position p of row b lives in page block_table[b, p // page] (see MLA.forward); prefix: with prefill
            and B = 1, the tokens follow `prefix` positions already cached, which they attend to as well.
        return_mtp: also return a list of MTP logits, depth k at position i predicting token i+1+k
            (positions whose future tokens are past the end see a zero embedding; mask them in the loss).
        return_hidden: return the final hidden states (normed, (B, S, D)) instead of logits (and, with
            return_mtp, each MTP depth's normed hidden states): `logprobs` then applies the head in chunks.
        """
        B, S = input_ids.shape
        if positions is None:
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_scale)
        if cache is not None and write_index is None:
            write_index = positions
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, attn_mask, None if cache is None else cache[i], write_index, cache_rows, prefill,
                      block_table, prefix)
        h = self.model.norm(h)
        out = h if return_hidden else self.lm_head(h)
        if not return_mtp:
            return out
        # Depth 1 starts from the main model's final (normed) hidden state, as serving engines that run
        # the published MTP weights do; depth k+1 from depth k's block output.
        mtp_logits, prev = [], h
        for k, m in enumerate(self.mtp):
            # Embedding of the token k+1 ahead of each position; zeros past the end.
            nxt = torch.zeros_like(input_ids)
            nxt[:, : S - k - 1] = input_ids[:, k + 1:]
            prev = self._mtp_block(m, prev, nxt, cos, sin, attn_mask)
            mtp_logits.append(m.norm(prev) if return_hidden else self.lm_head(m.norm(prev)))
        return out, mtp_logits

    def _mtp_block(self, m: MTPModule, prev, next_ids, cos, sin, attn_mask=None, cache=None, write_index=None,
                   cache_rows=None, prefill=False, block_table=None, prefix=0) -> torch.Tensor:
        e = m.enorm(self.model.embed_tokens(next_ids))
        x = m.eh_proj(torch.cat([e, m.hnorm(prev)], dim=-1))  # (B, S, 2D) -> (B, S, D)
        return m.block(x, cos, sin, attn_mask, cache, write_index, cache_rows, prefill, block_table, prefix)

    def mtp_forward(self, depth: int, prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, *,
                    attn_mask: torch.Tensor | None = None, cache: torch.Tensor | None = None,
                    cache_rows: torch.Tensor | None = None, prefill: bool = False,
                    block_table: torch.Tensor | None = None, prefix: int = 0) -> torch.Tensor:
        """MTP module `depth` (0-based) on its own, for drafting: what `forward(return_mtp=True)` computes per
        depth, with a latent cache of the module's one attention layer.

        prev (B, S, D): the main model's final (normed) hidden states for depth 0, the previous depth's output
        otherwise; next_ids (B, S): at each position the token depth+1 ahead; positions (B, S). cache, attn_mask,
        cache_rows, prefill, block_table, prefix as for one layer in `forward` (the cache is written at
        `positions`; with prefix, a chunk of a prefill attends to the module's cache before it too).
        Returns the module's block output (B, S, D): the next depth's `prev`; `mtp_logits` makes it logits.
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_scale)
        return self._mtp_block(self.mtp[depth], prev, next_ids, cos, sin, attn_mask, cache,
                               None if cache is None else positions, cache_rows, prefill, block_table, prefix)

    def mtp_logits(self, depth: int, out: torch.Tensor) -> torch.Tensor:
        """Logits of MTP module `depth` from its block output (`mtp_forward`): shared head after its norm."""
        return self.lm_head(self.mtp[depth].norm(out))

    def logprobs(self, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                 chunk: int = DEFAULT_CHUNK, with_entropy: bool = False, compiled: bool = False):
        """fp32 log-probs of `targets` (..., IGNORE = none) from normed hidden states h (..., D) through the
        output head at `temperature`, `chunk` tokens at a time, never holding the fp32 (tokens, vocab) logits
        (r1lab.model.head). Returns (logp (...), entropy (...) or None); cross-entropy is -logp.sum()."""
        return head_logprobs(h, self.lm_head.weight, targets, temperature, chunk=chunk, with_entropy=with_entropy,
                             compiled=compiled)

    def cross_entropy_sum(self, h: torch.Tensor, labels: torch.Tensor, *, chunk: int = DEFAULT_CHUNK,
                          compiled: bool = False) -> torch.Tensor:
        """Summed fp32 next-token cross-entropy of `labels` (..., IGNORE = none) from normed hidden states
        (..., D): -sum of `logprobs`, chunked, with its gradients formed in the forward (one head matmul fewer
        than `logprobs`' recomputing backward; r1lab.model.head)."""
        return -head_logprob_sum(h, self.lm_head.weight, labels, chunk=chunk, compiled=compiled)

    # ------------------------------------------------------------------ latent cache
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Empty MLA latent cache: per layer one (B, T, kv_lora_rank + qk_rope_head_dim) buffer holding the
        normed latent and the roped shared key of each token, side by side (what decode attends over)."""
        cfg, dtype, device = self.config, dtype or self.dtype, device or self.device
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return [torch.zeros(batch, max_len, width, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]

    @staticmethod
    def cache_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
        """Bool (B, 1, S, T) mask for a cache whose slot t holds position t: a token at position p sees
        slots 0..p. Slots past a sequence's end are never seen, so rows of different lengths share a batch."""
        slots = torch.arange(max_len, device=positions.device)
        return (slots <= positions[..., None])[:, None]

    # ------------------------------------------------------------------ MoE balancing
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_router_bias(self, gamma: float) -> None:
        """Aux-loss-free bias update for every MoE layer; call once per optimizer step."""
        for m in self.moe_layers():
            m.update_bias(gamma)

    def set_balance_alpha(self, alpha: float) -> None:
        for m in self.moe_layers():
            m.balance_alpha = alpha

    def balance_loss(self) -> torch.Tensor | None:
        """Sum of the sequence-wise balance losses of the last forward (None when alpha is 0 or not training)."""
        losses = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def expert_load(self) -> torch.Tensor:
        """(n_moe_layers, E) tokens routed to each expert since the last bias update."""
        return torch.stack([m.expert_load for m in self.moe_layers()])

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """The one place weights are initialised: normal(0, initializer_range) for matrices, ones for norms,
        zeros for the router bias. Works after `to_empty` on a meta-built model."""
        g = None
        if seed is not None:
            g = torch.Generator(device=self.inv_freq.device).manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
        for m in self.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.zero_()
        return self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> "Transformer":
        """(Re)compute the non-persistent buffers (RoPE frequencies, expert load counters) on the model's device,
        materialising any still on the meta device, e.g. after loading weights with `assign=True`."""
        device = self.lm_head.weight.device
        for mod in self.modules():
            for name, b in mod._buffers.items():
                if b is not None and b.is_meta:
                    mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        for m in self.moe_layers():
            m.expert_load.zero_()
        self.inv_freq.copy_(rope_inv_freq(self.config)[0])
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
