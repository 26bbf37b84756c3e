"""Model configuration: field names as Hugging Face's DeepseekV3Config, named presets, parameter counts.

`ModelConfig.from_hf_dict` reads the three config.json dialects met in practice:
  * the published DeepSeek-V3/R1 one (`rope_scaling: {"type": "yarn", ...}`, top-level `rope_theta`),
  * transformers 5's (`rope_parameters: {"rope_type": "yarn", "rope_theta": ...}`),
  * DeepSeek-V2's (`model_type: deepseek_v2`: softmax scoring, greedy top-k, no q compression).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3-style model (MLA attention + DeepSeekMoE)."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # width of the dense SwiGLU in the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA (DeepSeek-V2 paper, section 2.1)
    q_lora_rank: int | None = 1536  # None: queries come from one full projection `q_proj`
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (DeepSeek-V3 paper, section 2.1.2)
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # Positions: RoPE on `qk_rope_head_dim` channels, optionally YaRN-extended
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(
        type="yarn", factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # multi-token prediction modules (V3 paper, section 2.2)
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str | None = "bfloat16"  # the dtype checkpoints store; not the compute dtype
    quantization_config: dict | None = None  # as in the published FP8 checkpoints

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule: the first `first_k_dense_replace` layers are dense, then every `moe_layer_freq`-th."""
        return self.is_moe and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 (DeepSeek-V2 appendix, YaRN)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(field_name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{field_name}: {why} (got {getattr(self, field_name)!r})")

        if self.model_type not in MODEL_TYPES:
            raise bad("model_type", f"unknown model type; r1lab reads {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates channel pairs)")
        if self.is_moe:
            if self.topk_method not in TOPK_METHODS:
                raise bad("topk_method", f"must be one of {TOPK_METHODS}")
            if self.scoring_func not in SCORING_FUNCS:
                raise bad("scoring_func", f"must be one of {SCORING_FUNCS}")
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts={self.n_routed_experts}")
            if self.topk_method != "greedy":
                g = self.n_group or 1
                if self.n_routed_experts % g:
                    raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
                if not self.topk_group or self.topk_group > g:
                    raise bad("topk_group", f"must be in 1..n_group={g}")
                if self.topk_method == "noaux_tc" and self.n_routed_experts // g < 2:
                    raise bad("n_group", "noaux_tc scores a group by its top-2 experts: groups need >= 2 experts")
                if self.topk_group * (self.n_routed_experts // g) < self.num_experts_per_tok:
                    raise bad("topk_group", "the chosen groups hold fewer experts than num_experts_per_tok")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise bad("rope_scaling", "only YaRN scaling is supported")
            if kind == "yarn" and not self.rope_scaling.get("factor"):
                raise bad("rope_scaling", "YaRN needs a 'factor'")

    # ------------------------------------------------------------------ config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dictionary (any of the three dialects in the module docstring)."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json: unknown model_type {model_type!r}; r1lab reads {', '.join(MODEL_TYPES)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if model_type == "deepseek_v2":
            # V2 configs omit the V3-only fields; their defaults are V2's behaviour, not V3's.
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("norm_topk_prob", False)
            kw.setdefault("routed_scaling_factor", 1.0)
            kw.setdefault("first_k_dense_replace", 0)
            kw.setdefault("num_nextn_predict_layers", 0)
        else:
            kw.setdefault("num_nextn_predict_layers", d.get("num_mtp_layers", 0))
        kw.setdefault("q_lora_rank", None)
        # transformers 5 writes `rope_parameters`; the published checkpoints `rope_scaling` + `rope_theta`.
        rp = d.get("rope_parameters")
        if rp and "rope_scaling" not in d:
            rp = dict(rp)
            kw["rope_theta"] = rp.pop("rope_theta", d.get("rope_theta", 10000.0))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            kw["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        elif "rope_scaling" in d:
            rs = d["rope_scaling"]
            if rs is not None:
                rs = dict(rs)
                rs["type"] = rs.pop("rope_type", rs.get("type"))
            kw["rope_scaling"] = rs
        else:
            kw["rope_scaling"] = None
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("torch_dtype") is None and "dtype" in d:
            kw["torch_dtype"] = d["dtype"]
        try:
            return cls(**kw)
        except TypeError as e:  # a field with a wrong type, e.g. a string where an int belongs
            raise ValueError(f"config.json: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that both transformers (4.x and 5.x) and the published-checkpoint readers understand."""
        d = dataclasses.asdict(self)
        d.pop("quantization_config")
        if self.quantization_config:
            d["quantization_config"] = self.quantization_config
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        d["architectures"] = [arch]
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        d["rope_interleave"] = True  # checkpoints lay RoPE channels out as interleaved pairs
        if self.model_type == "deepseek_v2":
            for k in ("scoring_func", "num_nextn_predict_layers"):
                d.pop(k)
        # transformers 5 reads rope_parameters; older readers rope_scaling + rope_theta. Write both.
        rp = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            rp.update(rs, rope_type=rs.pop("type"))
            rp.pop("type", None)
        d["rope_parameters"] = rp
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parameter counts
    def num_params(self, *, active: bool = False, embeddings: bool = True, mtp: bool = False) -> int:
        """Parameters of the model computed from the config alone (no tensors built).

        active: count only what one token touches (shared experts + num_experts_per_tok routed experts).
        embeddings: include the input embedding and the output head.
        mtp: include the multi-token-prediction modules (the V3 paper's 671B excludes them).
        """
        D, H = self.hidden_size, self.num_attention_heads
        attn = D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank  # kv_a_proj_with_mqa + norm
        attn += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)  # kv_b_proj
        if self.q_lora_rank:
            attn += D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            attn += D * H * self.qk_head_dim
        attn += H * self.v_head_dim * D  # o_proj
        norms = 2 * D

        def block(layer: int) -> int:
            if not self.is_moe_layer(layer):
                return attn + norms + 3 * D * self.intermediate_size
            expert = 3 * D * self.moe_intermediate_size
            routed = self.num_experts_per_tok if active else self.n_routed_experts
            gate = self.n_routed_experts * D + (self.n_routed_experts if self.topk_method == "noaux_tc" else 0)
            return attn + norms + gate + expert * ((self.n_shared_experts or 0) + routed)

        total = sum(block(i) for i in range(self.num_hidden_layers)) + D  # + final norm
        if mtp:
            # each MTP module: enorm, hnorm, eh_proj, one block (MoE like the last layer), its own head norm
            total += self.num_nextn_predict_layers * (2 * D + 2 * D * D + block(self.num_hidden_layers) + D)
        if embeddings:
            total += self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return total

    def kv_cache_bytes_per_token(self, bytes_per_elem: int = 2) -> dict[str, int]:
        """Bytes cached per token over all layers: MLA's latent vs standard multi-head attention's K and V."""
        L, H = self.num_hidden_layers, self.num_attention_heads
        return {
            "mla_latent": L * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_elem,
            "mha": L * H * (self.qk_head_dim + self.v_head_dim) * bytes_per_elem,
        }


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1*mscale*ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------- presets
def _v3(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


def _speedrun(**kw: Any) -> ModelConfig:
    """The speedrun's models: its 128-token task vocabulary (ids 0/1 = bos/eos), one dense layer first, no YaRN,
    no MTP module."""
    return _v3(**{**dict(vocab_size=128, bos_token_id=0, eos_token_id=1, first_k_dense_replace=1, rope_scaling=None,
                         num_nextn_predict_layers=0), **kw})


PRESETS: dict[str, ModelConfig] = {
    # Unit tests: seconds on a CPU, yet the real 129,280-token vocabulary so the real tokenizer works end to end.
    # It keeps every feature on: q compression, 4 groups with topk_group < n_group, YaRN, one MTP module.
    "tiny": _v3(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, max_position_embeddings=1024,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=1, torch_dtype="float32"),
    # The engine's benchmark anchor (engine issue): a DeepSeek-V3-shaped MoE, 880M total / 378M active.
    "bench-moe-1b": _v3(
        hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256, num_hidden_layers=12,
        num_attention_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
        topk_group=4, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096, rope_scaling=None,
        num_nextn_predict_layers=0),
    # The speedrun (r1lab speedrun): a small MoE+MLA model and its smaller student, sized for a 2-core CPU, with the
    # speedrun's task vocabulary (vocab_size is set from its tokenizer); the -gpu pair for one H200.
    "speedrun": _speedrun(
        hidden_size=128, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        max_position_embeddings=512, torch_dtype="float32"),
    "speedrun-student": _speedrun(
        hidden_size=96, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=8,
        v_head_dim=24, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        max_position_embeddings=512, torch_dtype="float32"),
    "speedrun-gpu": _speedrun(
        hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16,
        v_head_dim=48, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        max_position_embeddings=1024),
    "speedrun-gpu-student": _speedrun(
        hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=24, qk_rope_head_dim=8,
        v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        max_position_embeddings=1024),
    "deepseek-v3": _v3(),
    "deepseek-r1": _v3(),  # R1 is V3's architecture with other weights
    "deepseek-v2-lite": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1,
        max_position_embeddings=163840,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (so callers may mutate it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], rope_scaling=dict(PRESETS[name].rope_scaling or {}) or None)
