"""LoRA (Hu et al. 2021): low-rank adapters wrapped around an unmodified model, saved and loaded in PEFT's format.

    W x  ->  W x + s B A x,   A (r, in), B (out, r), s = alpha / r,   B = 0 at the start

Like distribution (r1lab.parallel), LoRA is applied *to* a model: `apply_lora` replaces the targeted linear layers
by `LoRALinear` and the routed experts by `LoRAExperts`, which hold the original module as `base` (frozen) and the
factors beside it. Nothing in r1lab.model knows about adapters. Targets (`--lora.targets`):

  q_a, q_b, q, kv_a, kv_b, o   the MLA projections (q_a/q_b with q compression, q without)   "attention" = all
  mlp                          the dense layers' SwiGLU projections
  shared                       the shared experts' projections
  experts                      the routed experts: per expert, one A and B on the fused gate+up projection and
                               one on down, applied with grouped GEMMs beside the base's (no loop over experts)

Exactness: the low-rank term is added in each wrapped module's forward, so training, the engine's prefill and its
decode see W + s B A without a merged copy of any weight. Code that reads a weight directly gets the effective one
(`LoRALinear.weight`: MLA's absorbed decode folds kv_b_proj's weight; the MoE decode kernels read the shared
experts'); a MoE whose routed experts carry adapters runs its grouped path instead of the Triton decode kernels,
which read the stacked expert weights. `adapters_off(model)` gives the base model (GRPO's KL reference);
`merge_and_unload(model)` folds the adapters in for serving at the base's speed.

PEFT's format (adapter_config.json + adapter_model.safetensors) for transformers' DeepseekV3/V2ForCausalLM:
  base_model.model.model.layers.N.self_attn.q_a_proj.lora_A.weight      (r, in); lora_B.weight (out, r)
  target_modules: the attention projections by leaf name.
  Dense MLPs and shared experts go in `target_parameters` ("mlp.gate_proj.weight", ...), same key names. Why not
  target_modules: PEFT 0.18+ on transformers 5 maps every gate_proj/up_proj/down_proj target of these models to
  the fused routed experts (its v4->v5 MoE conversion) and drops the module target, so an MLP adapter named there
  would load onto the wrong weights. A 2-D target parameter is plain LoRA with the same names.
  Routed experts (transformers 5 stacks them: experts.gate_up_proj (E, 2I, D), experts.down_proj (E, D, I)):
  target_parameters "mlp.experts.gate_up_proj" and "mlp.experts.down_proj", PEFT's ParamWrapper layout
    lora_A.weight (E*r, in): rows expert-major (row e*r + j);  lora_B.weight (out, r*E): columns rank-major
    (column j*E + e); both on one module nest, gate_up inner: `mlp.experts.base_layer.lora_A.weight` is
    gate_up's, `mlp.experts.lora_A.weight` down's.
  PEFT refuses lora_dropout on parameter targets (it cannot factor x out of the update), so an adapter with any
  records lora_dropout 0 (dropout is a training-time choice; the adapter computes the same either way), and
  r1lab refuses dropout on routed experts. Adapters written by PEFT on transformers 4 (one module per routed
  expert: experts.E.gate_proj.lora_A.weight) load too: gate and up become one adapter of rank 2r, as PEFT's own
  conversion does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import parallel
from .model.layers import MLP
from .model.moe import Experts, MoE, _grouped_mm
from .model.transformer import Transformer

ATTENTION = {"q_a": "q_a_proj", "q_b": "q_b_proj", "q": "q_proj", "kv_a": "kv_a_proj_with_mqa",
             "kv_b": "kv_b_proj", "o": "o_proj"}
TARGETS = (*ATTENTION, "mlp", "shared", "experts")
GROUPS = {"attention": tuple(ATTENTION), "all": TARGETS}
DEFAULT_TARGETS = ["attention", "mlp", "shared"]
_PROJ = ("gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."


class LoRAError(ValueError):
    """An adapter or LoRA setting that cannot be used: the message names the file, key or option."""


# ---------------------------------------------------------------------- modules
class LoRALinear(nn.Module):
    """y = base(x) + s B A dropout(x), with `base` an nn.Linear that stays frozen."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.scaling, self.dropout, self.active = base, scaling, dropout, True
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.active:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling  # PEFT's order of operations

    def delta(self) -> torch.Tensor:
        """s B A (out, in), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads it directly (MLA's absorbed decode, MoE decode kernels)."""
        w = self.base.weight
        return w + self.delta().to(w.dtype) if self.active else w


class LoRAExperts(nn.Module):
    """The routed experts (`moe.Experts`, frozen, as `base`) with per-expert adapters on the fused gate+up
    projection (A (E, r, D), B (E, 2I, r); B's first I rows are gate's) and on down (A (E, r, I), B (E, D, r)).

    Same interface as Experts.forward: x (M, D) sorted by expert, counts (E,) -> (M, D). The grouped path adds two
    thin grouped GEMMs per adapted projection; its twin, a loop over experts, runs where grouped GEMMs cannot
    (impl="loop", or unsupported dtype/alignment) and is what the tests compare it with."""

    def __init__(self, base: Experts, ranks: dict[str, int], scaling: dict[str, float]):
        super().__init__()
        self.base, self.scaling = base, dict(scaling)
        self.active = True
        E, inter, dim = base.gate_proj.shape
        dev, dt = base.gate_proj.device, base.gate_proj.dtype
        shapes = {"gate_up": (dim, 2 * inter), "down": (inter, dim)}  # (in, out)
        for name, r in ranks.items():
            i, o = shapes[name]
            self.register_parameter(f"{name}_A", nn.Parameter(torch.zeros(E, r, i, device=dev, dtype=dt)))
            self.register_parameter(f"{name}_B", nn.Parameter(torch.zeros(E, o, r, device=dev, dtype=dt)))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        a = self._parameters.get(f"{name}_A")
        return None if a is None or not self.active else (a, self._parameters[f"{name}_B"])

    # the stacked base weights, read by MoE for their shapes (its kernel path is off while adapters are on)
    gate_proj = property(lambda self: self.base.gate_proj)
    up_proj = property(lambda self: self.base.up_proj)
    down_proj = property(lambda self: self.base.down_proj)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        if impl != "loop" and self._grouped_ok(x):
            offs = counts.cumsum(0).to(torch.int32)
            return self._swiglu(x, lambda a, w: _grouped_mm(a, w.transpose(-2, -1), offs=offs), slice(None))
        out, start = torch.empty_like(x), 0  # reference twin; counts.tolist() syncs with the device
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start:start + n] = self._swiglu(x[start:start + n], lambda a, w: a @ w.T, e)
                start += n
        return out

    def _swiglu(self, x, mm, e):
        """down(silu(gate(x)) * up(x)) with the adapters; mm(a, w) multiplies rows by weights w (.., out, in)
        (grouped: e selects all experts; loop: e is one expert)."""
        b = self.base
        g, u = mm(x, b.gate_proj[e]), mm(x, b.up_proj[e])
        gu = self.factors("gate_up")
        if gu is not None:
            d = mm(mm(x, gu[0][e]), gu[1][e]) * self.scaling["gate_up"]  # (M, 2I)
            dg, du = d.chunk(2, dim=-1)
            g, u = g + dg, u + du
        h = F.silu(g) * u
        y = mm(h, b.down_proj[e])
        dn = self.factors("down")
        if dn is not None:
            y = y + mm(mm(h, dn[0][e]), dn[1][e]) * self.scaling["down"]
        return y

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        # grouped GEMMs want 16-byte aligned rows: the ranks as well as the base's sizes
        ranks = [p.shape[1] for n, p in self._parameters.items() if n.endswith("_A")]
        return self.base.grouped_ok(x) and all(r * x.element_size() % 16 == 0 for r in ranks)

    def delta(self, name: str) -> torch.Tensor:
        """s B A per expert, (E, out, in), in fp32."""
        a, b = self._parameters[f"{name}_A"], self._parameters[f"{name}_B"]
        return torch.bmm(b.float(), a.float()) * self.scaling[name]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAExperts]:
    """The adapted modules by their path in the model (the path of the module they wrap)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


# ---------------------------------------------------------------------- applying
def expand_targets(targets: list[str]) -> list[str]:
    """Target names with the groups ("attention", "all") expanded; unknown names raise LoRAError."""
    out = []
    for t in targets:
        if t in GROUPS:
            out += [x for x in GROUPS[t] if x not in out]
        elif t in TARGETS:
            out += [t] if t not in out else []
        else:
            known = ", ".join(TARGETS + tuple(GROUPS))
            raise LoRAError(f"lora.targets: unknown target {t!r}; choose from {known}")
    return out


def _sites(model: Transformer, targets: list[str]):
    """(path, parent, attribute, target) of every module a target names, in the decoder layers (the MTP modules,
    which transformers does not load, stay as they are)."""
    for i, block in enumerate(model.model.layers):
        pre = f"model.layers.{i}"
        for t in targets:
            if t in ATTENTION and isinstance(getattr(block.self_attn, ATTENTION[t], None), nn.Linear):
                yield f"{pre}.self_attn.{ATTENTION[t]}", block.self_attn, ATTENTION[t], t
        mlp = block.mlp
        if "mlp" in targets and isinstance(mlp, MLP):
            for p in _PROJ:
                yield f"{pre}.mlp.{p}", mlp, p, "mlp"
        if isinstance(mlp, MoE):
            if "shared" in targets and mlp.shared_experts is not None:
                for p in _PROJ:
                    yield f"{pre}.mlp.shared_experts.{p}", mlp.shared_experts, p, "shared"
            if "experts" in targets and isinstance(mlp.experts, Experts):
                yield f"{pre}.mlp.experts", mlp, "experts", "experts"


def _wrap(parent: nn.Module, attr: str, ranks, scaling, dropout: float = 0.0):
    base = getattr(parent, attr)
    if isinstance(base, Experts):
        mod = LoRAExperts(base, ranks, scaling)
        # MoE's decode kernels and its gathered small-batch path read the stacked weights: route through ours
        mod.moe_impl = parent.impl
        parent.impl = "grouped"
    else:
        mod = LoRALinear(base, ranks, scaling, dropout)
    setattr(parent, attr, mod)
    return mod


def apply_lora(model: Transformer, rank: int, alpha: float, targets: list[str] | None = None, dropout: float = 0.0,
               seed: int = 0) -> dict[str, LoRALinear | LoRAExperts]:
    """Freeze `model` and wrap the targeted modules with adapters of rank `rank`, scaling alpha / rank, in place.

    A is drawn as PEFT draws it (kaiming-uniform, bound 1/sqrt(in)) from `seed`, B is zero, so the model computes
    what it did. The adapters take the base's dtype and device. Returns the adapted modules by path."""
    if rank < 1:
        raise LoRAError(f"lora.rank must be >= 1 (got {rank})")
    if not 0 <= dropout < 1:
        raise LoRAError(f"lora.dropout must be in [0, 1) (got {dropout})")
    targets = list(targets or DEFAULT_TARGETS)
    names = expand_targets(targets)
    if dropout and "experts" in names:
        raise LoRAError("lora.dropout applies to linear layers only; PEFT's format has no dropout on routed "
                        "experts: set lora.dropout 0 or drop 'experts' from lora.targets")
    if lora_modules(model):
        raise LoRAError("the model already carries adapters")
    model.requires_grad_(False)
    sites = list(_sites(model, names))
    found = {t for *_, t in sites}
    # a target named alone must exist; groups and the default list take what the model has
    missing = [t for t in targets if t in TARGETS and t not in found and targets != DEFAULT_TARGETS]
    if not sites or missing:
        raise LoRAError(f"lora.targets: {', '.join(missing or names)} name(s) no module of this model (q_a/q_b "
                        f"need q_lora_rank, q needs none; mlp needs dense layers; shared/experts need MoE layers)")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, parent, attr, t in sites:
        if t == "experts":
            s = alpha / rank
            mod = _wrap(parent, attr, {"gate_up": rank, "down": rank}, {"gate_up": s, "down": s})
            for name in ("gate_up", "down"):
                a = getattr(mod, f"{name}_A")
                a.data.copy_(_kaiming(a.shape, gen))
        else:
            mod = _wrap(parent, attr, rank, alpha / rank, dropout)
            mod.lora_A.data.copy_(_kaiming(mod.lora_A.shape, gen))
        out[path] = mod
    return out


def _kaiming(shape, gen) -> torch.Tensor:
    """PEFT's init of A: kaiming_uniform_(a=sqrt(5)), i.e. uniform(-1/sqrt(in), 1/sqrt(in)); drawn on the CPU so
    that every device starts from the same adapters."""
    bound = 1 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def empty_like(model: Transformer, device: str | torch.device) -> Transformer:
    """An uninitialised plain Transformer of `model`'s configuration on `device`, with adapters of the shapes
    `model`'s have, so that copies between the two go by state-dict name (`parallel.copy_full_weights` from a
    sharded model: GRPO's rollout copy, exports under torchrun). Modules a trainer added are not copied."""
    with torch.device("meta"):
        out = Transformer(model.config)
    out = out.to_empty(device=device).init_buffers()
    out.requires_grad_(False)
    for path, mod in lora_modules(model).items():
        parent_path, _, attr = path.rpartition(".")
        parent = out.get_submodule(parent_path)
        if isinstance(mod, LoRALinear):
            _wrap(parent, attr, mod.lora_A.shape[0], mod.scaling, mod.dropout)
        else:
            ranks = {n[:-2]: p.shape[1] for n, p in mod._parameters.items() if n.endswith("_A")}
            _wrap(parent, attr, ranks, mod.scaling)
    return out


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Inside, the model computes its base (GRPO's KL reference without a second model)."""
    mods = list(lora_modules(model).values())
    before = [m.active for m in mods]
    for m in mods:
        m.active = False
    try:
        yield model
    finally:
        for m, a in zip(mods, before):
            m.active = a


def active_parameters(model: nn.Module) -> int:
    """Adapter parameters one token passes through: all of the linear layers' adapters, the routed experts'
    of the num_experts_per_tok experts it is sent to (for MFU). Under expert parallelism each rank holds E/ep
    experts' factors (FSDP's DTensors count whole)."""
    n = 0
    for path, m in lora_modules(model).items():
        size = sum(p.numel() for p in m.parameters() if p.requires_grad)
        if isinstance(m, LoRAExperts):
            moe = model.get_submodule(path.rpartition(".")[0])
            size = size * getattr(m, "_r1lab_ep", (1,))[0] * moe.top_k // moe.n_experts
        n += size
    return n


@torch.no_grad()
def cast_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The frozen base (parameters and floating buffers, as `model.to(dtype)` casts them) in `dtype`, in place; the
    trained parameters (the adapters) keep their dtype and values. Before FSDP2 (r1lab.parallel): its sharded
    fp32 adapters are the master weights, and the base, which has no master, is stored sharded in the compute
    dtype. FSDP2 asks one dtype of the trained parameters of a `fully_shard` unit only (frozen ones may differ;
    its all-gather takes mixed dtypes), so one unit per block holds both."""
    keep = [(p, p.data) for p in model.parameters() if p.requires_grad]
    model.to(dtype)
    for p, data in keep:
        p.data = data
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts (shared tensors once)."""
    seen, counts = set(), [0, 0]
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            counts[0 if p.requires_grad else 1] += p.numel()
    return counts[0], counts[1]


# ---------------------------------------------------------------------- merging
def merged_weight(mod: LoRALinear | LoRAExperts, leaf: str, device=None) -> torch.Tensor:
    """The base's tensor `leaf` ("weight"; "gate_proj", "up_proj", "down_proj") with the adapter folded in: summed
    in fp32, rounded once to the base's dtype; a new tensor on `device` (default: the base's)."""
    t = getattr(mod.base, leaf)
    w = t.detach().to(device or t.device, torch.float32)
    if isinstance(mod, LoRALinear):
        d = mod.delta()
    elif leaf in ("gate_proj", "up_proj") and "gate_up_A" in mod._parameters:
        d = mod.delta("gate_up").chunk(2, dim=1)[0 if leaf == "gate_proj" else 1]
    elif leaf == "down_proj" and "down_A" in mod._parameters:
        d = mod.delta("down")
    else:
        return t.detach().to(device or t.device, copy=True)
    return (w + d.to(w.device)).to(t.dtype)


@torch.no_grad()
def merged_state_dict(model: Transformer, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict under the plain model's names, adapters folded into their weights. Unadapted
    tensors are the model's own (no copy); merged ones are new, on `device` (default: the model's)."""
    mods = lora_modules(model)
    sd = {}
    for name, t in model.state_dict().items():
        owner = next((p for p in mods if name.startswith(p + ".")), None)
        if owner is None:
            sd[name] = t
        elif name.startswith(owner + ".base."):  # (the factors themselves are left out)
            leaf = name[len(owner) + len(".base."):]
            sd[f"{owner}.{leaf}"] = merged_weight(mods[owner], leaf, device)
    return sd


def merged_model(model: Transformer, device: str | torch.device | None = "cpu") -> Transformer:
    """A plain Transformer computing base + adapters (for `save_pretrained`); `model` is left as it is. Merged
    weights are new tensors on `device`; the others are shared with `model`, and so are modules a trainer added
    (a reward model's `score_head`)."""
    sd = merged_state_dict(model, device)
    with torch.device("meta"):
        out = Transformer(model.config)
    extra = {name: child for name, child in model.named_children() if not hasattr(out, name)}
    sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] not in extra}
    out.load_state_dict(sd, strict=True, assign=True)
    for name, child in extra.items():
        setattr(out, name, child)
    if model.config.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    for a, b in zip(out.moe_layers(), model.moe_layers()):
        a.impl = b.experts.moe_impl if isinstance(b.experts, LoRAExperts) else b.impl
    return out.init_buffers().train(model.training)


@torch.no_grad()
def merge_and_unload(model: Transformer, mods: dict | None = None) -> Transformer:
    """Fold the adapters (all, or those of `mods`) into the base weights in place and put the plain modules back:
    the model then runs as fast as the base (what `r1lab generate --lora` does)."""
    for path, mod in (lora_modules(model) if mods is None else mods).items():
        for leaf, p in mod.base.named_parameters(recurse=False):  # one module's merged copy at a time
            p.copy_(merged_weight(mod, leaf))
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, mod.base)
        if isinstance(mod, LoRAExperts):
            parent.impl = mod.moe_impl
    return model


# ---------------------------------------------------------------------- PEFT's format
def _peft_targets(path: str) -> tuple[str | None, list[str]]:
    """(target_modules entry, target_parameters entries) that name the module at `path` in PEFT's config."""
    leaf = path.rsplit(".", 1)[-1]
    if ".self_attn." in path:
        return leaf, []
    if path.endswith(".mlp.experts"):
        return None, []  # decided by which projections carry adapters
    if ".shared_experts." in path:
        return None, [f"mlp.shared_experts.{leaf}.weight"]
    return None, [f"mlp.{leaf}.weight"]


def _full(t: torch.Tensor, mod: nn.Module | None = None) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a DTensor; collective), else the tensor; a factor of expert-parallel
    routed experts (`mod` split by `parallel.apply_expert_parallel`) gathered over the EP group, all E experts."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return parallel.gather_experts(t, mod) if getattr(mod, "_r1lab_ep", None) is not None else t


def adapter_state(model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT tensors, adapter_config.json contents) of the model's adapters; under FSDP every rank calls it."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model carries no adapters")
    tensors, modules, params, ranks = {}, set(), set(), {}
    for path, mod in mods.items():
        key = _PREFIX + path
        if isinstance(mod, LoRALinear):
            tensors[f"{key}.lora_A.weight"] = _full(mod.lora_A)
            tensors[f"{key}.lora_B.weight"] = _full(mod.lora_B)
            ranks[path] = (mod.lora_A.shape[0], mod.scaling)
            m, p = _peft_targets(path)
            modules.update([m] if m else [])
            params.update(p)
            continue
        present = [n for n in ("gate_up", "down") if f"{n}_A" in mod._parameters]
        for name in present:
            a = _full(mod._parameters[f"{name}_A"], mod)  # (E, r, in)
            b = _full(mod._parameters[f"{name}_B"], mod)  # (E, out, r)
            E, r = a.shape[:2]
            inner = name == "gate_up" and len(present) == 2  # gate_up is wrapped first, so it nests inside
            k = f"{key}.base_layer" if inner else key
            tensors[f"{k}.lora_A.weight"] = a.reshape(E * r, a.shape[2])  # row e*r + j
            tensors[f"{k}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * E)  # column j*E + e
            ranks[f"{path}.{name}_proj"] = (r, mod.scaling[name])
            params.add(f"mlp.experts.{name}_proj")
    r0, s0 = next(iter(ranks.values()))
    rank_pattern = {re.escape(p): r for p, (r, s) in ranks.items() if r != r0}
    alpha_pattern = {re.escape(p): s * r for p, (r, s) in ranks.items() if s * r != s0 * r0}
    dropout = max((m.dropout for m in mods.values() if isinstance(m, LoRALinear)), default=0.0)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": r0, "lora_alpha": s0 * r0, "lora_dropout": 0.0 if params else dropout,
        "target_modules": sorted(modules) or None, "target_parameters": sorted(params) or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "use_rslora": False,
        "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    return tensors, config


def save_adapter(model: Transformer, path: str | os.PathLike, base_model: str | None = None,
                 write: bool = True) -> Path:
    """Write the adapters as PEFT does: `adapter_config.json` + `adapter_model.safetensors` (in the adapters'
    dtype). base_model: recorded as base_model_name_or_path. Under FSDP every rank calls it (the shards are
    gathered) and only the one with `write` writes."""
    path = Path(path)
    tensors, config = adapter_state(model)
    config["base_model_name_or_path"] = base_model
    full = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if not write:
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(full, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def _pattern(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern P with re.match(f"(.*\\.)?({P})$", key)."""
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


_KEY = re.compile(r"^base_model\.model\.(.+?)(\.base_layer)?\.lora_([AB])(?:\.[^.]+)?\.weight$")
_LEGACY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of a PEFT LoRA folder, with the options r1lab cannot apply refused."""
    path = Path(path)
    cf, wf = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cf.is_file() or not wf.is_file():
        pickled = (path / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle file, which r1lab never reads)" if pickled else ""
        raise LoRAError(f"{path}: an adapter folder holds adapter_config.json and adapter_model.safetensors{hint}")
    try:
        cfg = json.loads(cf.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{cf}:{e.lineno}: invalid JSON: {e.msg}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{cf}: peft_type {cfg.get('peft_type')!r}: only LORA adapters load")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False), ("bias", "none"),
                    ("modules_to_save", None), ("trainable_token_indices", None)):
        if cfg.get(key, ok) not in (ok, [], {}):
            raise LoRAError(f"{cf}: {key} = {cfg[key]!r} is not supported (r1lab loads plain LoRA: "
                            f"{key} = {ok!r})")
    return cfg, load_file(str(wf))


@torch.no_grad()
def load_adapter(model: Transformer, path: str | os.PathLike) -> dict[str, LoRALinear | LoRAExperts]:
    """Wrap `model` (frozen) with the adapters of a PEFT folder (written by r1lab or by PEFT, on transformers 4 or
    5) and load them in the base's dtype. Returns the adapted modules by path."""
    cfg, tensors = read_adapter(path)
    if lora_modules(model):
        raise LoRAError("the model already carries adapters")
    model.requires_grad_(False)
    rslora = cfg.get("use_rslora", False)

    def scaling(key: str, r: int) -> float:
        a = _pattern(cfg.get("alpha_pattern"), key, cfg.get("lora_alpha", 8))
        return a / math.sqrt(r) if rslora else a / r

    # group the tensors by module: path -> {"A": .., "B": ..}; inner (base_layer) expert adapters apart
    groups: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _KEY.match(k)
        if not m:
            raise LoRAError(f"{path}: tensor {k} is not a LoRA factor (base_model.model.<module>.lora_A/B.weight)")
        groups.setdefault((m.group(1), bool(m.group(2))), {})[m.group(3)] = t
    for (mod_path, _), ab in groups.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{path}: {mod_path} has lora_{''.join(ab)} but not both factors")
    legacy: dict[str, dict[str, list]] = {}
    out = {}
    for (mod_path, inner), ab in sorted(groups.items()):
        lm = _LEGACY.match(mod_path)
        if lm:
            legacy.setdefault(lm.group(1), {}).setdefault(lm.group(3), []).append((int(lm.group(2)), ab))
            continue
        parent_path, _, attr = mod_path.rpartition(".")
        try:
            target = model.get_submodule(mod_path)
        except AttributeError:
            raise LoRAError(f"{path}: the adapter targets {mod_path}, which this model does not have (is it the "
                            f"adapter's base model? {cfg.get('base_model_name_or_path')})") from None
        if mod_path.endswith(".mlp.experts"):
            out[mod_path] = _load_experts(model, mod_path, inner, ab, cfg, out.get(mod_path), scaling, path)
            continue
        if not isinstance(target, nn.Linear):
            raise LoRAError(f"{path}: {mod_path} is a {type(target).__name__}, not a linear layer")
        a, b = ab["A"], ab["B"]
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
            raise LoRAError(f"{path}: {mod_path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                            f"its weight {tuple(target.weight.shape)}")
        mod = _wrap(model.get_submodule(parent_path), attr, a.shape[0], scaling(mod_path, a.shape[0]))
        mod.lora_A.copy_(a)
        mod.lora_B.copy_(b)
        out[mod_path] = mod
    for mod_path, projs in legacy.items():
        out[mod_path] = _load_legacy_experts(model, mod_path, projs, scaling, path)
    if not out:
        raise LoRAError(f"{path}: no adapters in adapter_model.safetensors")
    return out


def _experts_of(model, mod_path, path) -> tuple[MoE, Experts]:
    moe = model.get_submodule(mod_path.rpartition(".")[0])
    if not isinstance(moe, MoE):
        raise LoRAError(f"{path}: {mod_path} names routed experts, but that layer is not a MoE layer here")
    ex = moe.experts.base if isinstance(moe.experts, LoRAExperts) else moe.experts
    return moe, ex


def _load_experts(model, mod_path, inner, ab, cfg, existing, scaling, path) -> LoRAExperts:
    """One of PEFT's ParamWrapper adapters on the stacked experts, into r1lab's (E, r, in) / (E, out, r)."""
    moe, ex = _experts_of(model, mod_path, path)
    E, inter, dim = ex.gate_proj.shape
    a, b = ab["A"], ab["B"]
    params = [p.rsplit(".", 1)[-1] for p in cfg.get("target_parameters") or []]
    both = "gate_up_proj" in params and "down_proj" in params
    if inner or (b.shape[0] == 2 * inter and (2 * inter != dim or not both and "gate_up_proj" in params)):
        name = "gate_up"
    else:
        name = "down"
    want = {"gate_up": (dim, 2 * inter), "down": (inter, dim)}[name]
    if a.shape[0] % E or a.shape[1] != want[0] or b.shape[0] != want[1] or b.shape[1] != a.shape[0]:
        raise LoRAError(f"{path}: {mod_path} ({name}_proj): lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                        f"not fit {E} experts of ({want[1]}, {want[0]})")
    r = a.shape[0] // E
    A = a.reshape(E, r, want[0])
    B = b.reshape(want[1], r, E).permute(2, 0, 1)  # (E, out, r)
    return _add_expert_adapter(moe, existing, name, A, B, scaling(f"{mod_path}.{name}_proj", r))


def _add_expert_adapter(moe, existing, name, A, B, s) -> LoRAExperts:
    if existing is None:
        existing = _wrap(moe, "experts", {name: A.shape[1]}, {name: s})
    else:  # the second projection of an already wrapped module
        dev, dt = existing.base.gate_proj.device, existing.base.gate_proj.dtype
        existing.register_parameter(f"{name}_A", nn.Parameter(torch.zeros(A.shape, device=dev, dtype=dt)))
        existing.register_parameter(f"{name}_B", nn.Parameter(torch.zeros(B.shape, device=dev, dtype=dt)))
        existing.scaling[name] = s
    existing._parameters[f"{name}_A"].copy_(A)
    existing._parameters[f"{name}_B"].copy_(B)
    return existing


def _load_legacy_experts(model, mod_path, projs, scaling, path) -> LoRAExperts:
    """PEFT on transformers 4: one adapter per expert and projection. gate and up become one adapter on the fused
    projection, A = [A_gate ; A_up] and B = blockdiag(s_gate B_gate, s_up B_up) with scaling 1 (exact)."""
    moe, ex = _experts_of(model, mod_path, path)
    E, inter, dim = ex.gate_proj.shape
    stacked = {}
    for proj, items in projs.items():
        idx = sorted(e for e, _ in items)
        if idx != list(range(E)):
            raise LoRAError(f"{path}: {mod_path}.N.{proj}: adapters for experts {idx[:5]}... but the layer "
                            f"has {E}")
        ab = dict(items)
        A = torch.stack([ab[e]["A"] for e in range(E)])  # (E, r, in)
        B = torch.stack([ab[e]["B"] for e in range(E)])  # (E, out, r)
        s = scaling(f"{mod_path}.0.{proj}", A.shape[1])
        stacked[proj] = (A, B * s)
    mod = None
    if "gate_proj" in stacked or "up_proj" in stacked:
        parts = [(p, stacked[p]) for p in ("gate_proj", "up_proj") if p in stacked]
        A = torch.cat([a for _, (a, _) in parts], dim=1)
        B = torch.zeros(E, 2 * inter, A.shape[1], dtype=A.dtype)
        col = 0
        for p, (a, b) in parts:
            row = 0 if p == "gate_proj" else inter
            B[:, row:row + inter, col:col + a.shape[1]] = b
            col += a.shape[1]
        mod = _add_expert_adapter(moe, mod, "gate_up", A, B, 1.0)
    if "down_proj" in stacked:
        A, B = stacked["down_proj"]
        mod = _add_expert_adapter(moe, mod, "down", A, B, 1.0)
    return mod
