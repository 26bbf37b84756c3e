"""Hugging Face-layout checkpoints: config.json + safetensors (sharded or not, FP8 block-scaled or not).

Tensor names are the published DeepSeek-V3/R1 ones, so real checkpoints load without conversion:
  model.layers.L.mlp.experts.E.gate_proj.weight   one tensor per routed expert (r1lab stacks them)
  model.layers.{num_hidden_layers + k}.*          the k-th multi-token-prediction module (r1lab's `mtp.k`)
  *.weight_scale_inv                              FP8 block scales, [ceil(out/128), ceil(in/128)]
transformers 5's fused expert layout (`experts.gate_up_proj` (E, 2I, D), `experts.down_proj`) is read too.
Only safetensors are ever read: no pickle.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model.config import ModelConfig
from .model.transformer import Transformer

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.")  # MTP tensors outside its transformer block
_MTP_SHARED = ("embed_tokens.", "shared_head.head.")  # copies of the main model's embedding and head


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read: the message says which file or tensor and why."""


# ---------------------------------------------------------------------- FP8
def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """weight (out, in) e4m3 with per-block scales (ceil(out/bo), ceil(in/bi)) -> dense weight.

    Despite its name, DeepSeek's `weight_scale_inv` is multiplied: w = q * s, block by block. Edge blocks
    of shapes that are not multiples of the block size are partial; the scale grid is cut to fit.
    """
    out, inp = weight.shape
    bo, bi = block
    want = (math.ceil(out / bo), math.ceil(inp / bi))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"FP8 scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)} "
                              f"with {bo}x{bi} blocks (expected {want})")
    s = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (weight.float() * s).to(dtype)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3 quantisation as DeepSeek's FP8 checkpoints store it: scale = amax(block) / 448."""
    out, inp = weight.shape
    bo, bi = block
    ro, ri = math.ceil(out / bo), math.ceil(inp / bi)
    padded = torch.zeros(ro * bo, ri * bi, dtype=torch.float32)
    padded[:out, :inp] = weight.float()
    blocks = padded.view(ro, bo, ri, bi)
    scale = (blocks.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)  # (ro, ri)
    q = (blocks / scale[:, None, :, None]).view(ro * bo, ri * bi)[:out, :inp].to(torch.float8_e4m3fn)
    return q, scale


# ---------------------------------------------------------------------- names
def hf_to_r1lab(key: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """Checkpoint tensor name -> (r1lab state-dict name, expert index or None); None for tensors r1lab
    does not keep (MTP copies of embedding/head, MTP modules beyond the config, rotary caches)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER.match(key)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        k, rest = int(m.group(1)) - cfg.num_hidden_layers, m.group(2)
        if k >= cfg.num_nextn_predict_layers or rest.startswith(_MTP_SHARED):
            return None
        if rest == "shared_head.norm.weight":
            rest = "norm.weight"
        elif not rest.startswith(_MTP_OWN):
            rest = "block." + rest
        key = f"mtp.{k}.{rest}"
    m = _EXPERT.match(key)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return key, None


def r1lab_to_hf(name: str, cfg: ModelConfig) -> str:
    """r1lab state-dict name (non-expert) -> checkpoint tensor name."""
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if not m:
        return name
    layer, rest = cfg.num_hidden_layers + int(m.group(1)), m.group(2)
    if rest == "norm.weight":
        rest = "shared_head.norm.weight"
    elif rest.startswith("block."):
        rest = rest[len("block."):]
    return f"model.layers.{layer}.{rest}"


# ---------------------------------------------------------------------- loading
def read_config(path: str | os.PathLike) -> ModelConfig:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}:{e.lineno}: invalid JSON: {e.msg}") from None
    try:
        return ModelConfig.from_hf_dict(d)
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name in the folder to the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: names shard files that are not there: {', '.join(missing[:5])}")
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(bins[:3])}: pickle files are never read; convert them to safetensors)" if bins else ""
        raise CheckpointError(f"{path}: no *.safetensors files{hint}")
    out = {}
    for f in files:
        with _open(f) as st:
            out.update((k, f) for k in st.keys())
    return out


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")  # memory-mapped
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read as safetensors ({e}); the file may be truncated or corrupt") from None


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    config: ModelConfig | None = None) -> Transformer:
    """Load an HF-layout folder into a Transformer.

    Built on the meta device and filled tensor by tensor from memory-mapped files, so the model exists once.
    dtype: compute dtype of the weights; None keeps the checkpoint's (FP8 weights become bfloat16).
    Missing or mis-shaped tensors raise CheckpointError naming them.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    cfg = config or read_config(path)
    files = _tensor_files(path)
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", (128, 128)))

    # Route every checkpoint tensor to its r1lab destination.
    sources: dict[str, list[tuple[str, int | None]]] = defaultdict(list)
    for key in files:
        if key.endswith("_scale_inv"):
            continue
        dest = hf_to_r1lab(key, cfg)
        if dest is None:
            continue
        m = _FUSED.match(dest[0])
        if m and m.group(2) == "gate_up_proj":  # transformers 5: gate and up fused along the output dim
            sources[f"{m.group(1)}.gate_proj"].append((key, None))
            sources[f"{m.group(1)}.up_proj"].append((key, None))
        else:
            sources[dest[0]].append((key, dest[1]))
    has_mtp = any(n.startswith("mtp.") for n in sources)
    if cfg.num_nextn_predict_layers and not has_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)  # a checkpoint without its MTP module: plain inference

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers()
                                                      if n.rsplit(".", 1)[-1] in _PERSISTENT}}
    missing = [n for n in expected if n not in sources]
    unexpected = [s[0][0] for n, s in sources.items() if n not in expected]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. "
                              f"{', '.join(r1lab_to_hf(n, cfg) for n in missing[:5])}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensors r1lab does not know, e.g. {', '.join(unexpected[:5])}")

    handles: dict[Path, object] = {}

    def read(key: str) -> torch.Tensor:
        f = files[key]
        if f not in handles:
            handles[f] = _open(f)
        try:
            t = handles[f].get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {key} ({e}); the file may be truncated or corrupt") from None
        if t.dtype == torch.float8_e4m3fn:
            scale_key = key + "_scale_inv"
            if scale_key not in files:
                raise CheckpointError(f"{f}: FP8 tensor {key} has no {scale_key}")
            t = dequantize_fp8(t, read(scale_key), block, dtype or torch.bfloat16)
        return t

    state = {}
    for name, ref in expected.items():
        want_dtype = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        srcs = sources[name]
        if srcs[0][1] is None and len(srcs) == 1:  # one checkpoint tensor (possibly fused experts)
            t = read(srcs[0][0])
            if _FUSED.match(srcs[0][0]) and srcs[0][0].endswith("gate_up_proj"):
                t = t.chunk(2, dim=1)[0 if name.endswith("gate_proj") else 1]
            _check_shape(srcs[0][0], ref.shape, t.shape, files)
            state[name] = t.to(device=device, dtype=want_dtype or t.dtype)
            continue
        # Routed experts: stack one tensor per expert into a preallocated (E, out, in) tensor.
        idx = sorted(e for _, e in srcs)
        if idx != list(range(ref.shape[0])):
            gaps = sorted(set(range(ref.shape[0])) - set(idx))
            raise CheckpointError(f"{path}: {name}: experts {gaps[:5]} missing (have {len(idx)} of {ref.shape[0]})")
        out = None
        for key, e in srcs:
            t = read(key)
            _check_shape(key, ref.shape[1:], t.shape, files)
            if out is None:
                out = torch.empty(ref.shape, dtype=want_dtype or t.dtype, device=device)
            out[e].copy_(t)
        state[name] = out
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if cfg.quantization_config:
        model.config = cfg.replace(quantization_config=None)  # weights are dense now
    model.init_buffers()
    model.config.torch_dtype = str(model.dtype).removeprefix("torch.")
    return model.eval()


_PERSISTENT = ("e_score_correction_bias",)


def _check_shape(key, want, got, files):
    if tuple(want) != tuple(got):
        raise CheckpointError(f"{files[key]}: tensor {key} has shape {tuple(got)}, expected {tuple(want)} "
                              f"(does config.json match the weights?)")


# ---------------------------------------------------------------------- saving
def hf_state_dict(model: Transformer):
    """Yield (checkpoint name, tensor) pairs in the published layout, one routed expert at a time."""
    cfg = model.config
    sd = model.state_dict()
    for name, t in sd.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith(("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")):
            prefix, proj = name.rsplit(".", 1)
            hf_prefix = r1lab_to_hf(prefix, cfg)
            for e in range(t.shape[0]):
                yield f"{hf_prefix}.{e}.{proj}.weight", t[e]
        else:
            yield r1lab_to_hf(name, cfg), t
    # Published checkpoints give each MTP module its own copy of the embedding and head.
    for k in range(len(model.mtp)):
        layer = cfg.num_hidden_layers + k
        yield f"model.layers.{layer}.embed_tokens.weight", sd["model.embed_tokens.weight"]
        yield f"model.layers.{layer}.shared_head.head.weight", sd["lm_head.weight"]


def save_pretrained(model: Transformer, path: str | os.PathLike, tokenizer=None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF-layout folder (config.json, safetensors shards + index, tokenizer files) atomically:
    everything goes to a temporary folder beside `path` that is renamed into place at the end.

    tokenizer: an r1lab Tokenizer to save alongside; None saves the DeepSeek-V3/R1 tokenizer when the vocab
    sizes match; False saves none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg = model.config.replace(torch_dtype=str(model.dtype).removeprefix("torch."), quantization_config=None)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
             "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")
        shards, cur, cur_bytes = [], {}, 0
        for name, t in hf_state_dict(model):
            nbytes = t.numel() * t.element_size()
            if cur and cur_bytes + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, cur_bytes = {}, 0
            cur[name] = t.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
            cur_bytes += nbytes
        shards.append(cur)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        if tokenizer is None and cfg.vocab_size == 129280:
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer()
        if tokenizer:
            tokenizer.save(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
