"""The Triton decode kernels (r1lab/model/kernels.py) against their slow twin, the torch MoE path.

On a GPU they run natively (bf16, and inside a compiled, CUDA-graphed engine). On the CPU they run through
Triton's interpreter, which the test suite switches on in conftest.py before triton is first imported."""

import os

import pytest
import torch

from r1lab import Engine, SamplingParams, Transformer, get_preset
from r1lab.model import kernels
from r1lab.model.config import ModelConfig
from r1lab.model.attention import MLA
from r1lab.model.layers import rope_cos_sin, rope_inv_freq
from r1lab.model.moe import MoE

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"

# (E, G, topk_group, K, norm, scale): V3's shape, the bench preset's, no groups kept out, K a power of two
ROUTINGS = [(64, 8, 4, 6, True, 2.5), (256, 8, 4, 8, True, 2.5), (16, 4, 4, 3, False, 1.0), (16, 8, 3, 4, False, 1.7)]


def moe_config(E=16, G=4, TG=2, K=4, shared=2, norm=True, scale=2.5, D=128, I=64) -> ModelConfig:
    return get_preset("tiny").replace(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, n_group=G,
                                      topk_group=TG, num_experts_per_tok=K, n_shared_experts=shared,
                                      norm_topk_prob=norm, routed_scaling_factor=scale)


def device_and_dtype():
    if CUDA:
        return "cuda", torch.bfloat16
    if not INTERP:
        pytest.skip("no GPU, and Triton's interpreter is off (TRITON_INTERPRET=1 before importing triton)")
    return "cpu", torch.float32


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "CPU_INTERPRET", INTERP and not CUDA)


def random_moe(cfg, device, dtype, seed=0):
    torch.manual_seed(seed)
    m = MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)  # larger than the init's 0.02, so the output is not all rounding
        m.gate.e_score_correction_bias.normal_(0, 0.05)  # selection and gating weights then differ
    return m.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("split", [False, True], ids=["one-kernel", "logits-kernel"])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("T", [1, 5, 70])
def test_router_kernel_equals_gate(routing, T, split, monkeypatch):
    """Same experts in the same order (best biased score first), same gating weights. fp32 scores in both;
    the sums run in a different order, so weights agree to fp32 rounding (1e-6), and the chosen experts
    exactly (random scores are never that close to a tie). Both launch modes: logits inside the selection
    kernel, or from a kernel of their own."""
    device, dtype = device_and_dtype()
    if split:
        monkeypatch.setattr(kernels, "ROUTER_TILES", lambda T, E, D: dict(BD=64, num_warps=2, BE=8, select_warps=1))
    E, G, TG, K, norm, scale = routing
    gate = random_moe(moe_config(E, G, TG, K, norm=norm, scale=scale), device, dtype).gate
    x = torch.randn(T, 128, device=device).to(dtype)
    assert kernels.router_supported(gate)
    with torch.no_grad():
        w_ref, idx_ref, _ = gate(x)
        w, idx = kernels.route(x, gate)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_router_ties_go_to_the_lower_group():
    """Every score equal: the kept groups are the first topk_group ones (Gate.forward's tie rule)."""
    device, dtype = device_and_dtype()
    gate = random_moe(moe_config(16, 4, 2, 4), device, dtype).gate
    gate.e_score_correction_bias.zero_()
    x = torch.zeros(3, 128, device=device, dtype=dtype)
    with torch.no_grad():
        w, idx = kernels.route(x, gate)
    assert (idx < 8).all()  # groups 0 and 1 hold experts 0..7
    torch.testing.assert_close(w, torch.full_like(w, 2.5 / 4))


@pytest.mark.parametrize("shared", [0, 1, 2])
@pytest.mark.parametrize("T", [1, 2, 9, 130])
def test_fused_experts_equal_torch_path(shared, T, monkeypatch):
    """The layer's output and expert-load counts with the kernels and with torch's path (grouped GEMMs or the
    gathered matmuls). fp32 on the interpreter: 1e-5; bf16 on a GPU, where the torch path rounds the gate, up,
    SwiGLU and each expert's output to bf16 and the kernels keep fp32 until the end: 2e-2 relative."""
    device, dtype = device_and_dtype()
    m = random_moe(moe_config(shared=shared), device, dtype)
    x = torch.randn(1, T, 128, device=device).to(dtype)
    with torch.no_grad():
        assert m._use_kernels(x.view(T, -1))
        out = m(x)
        load = m.expert_load.clone()
        m.expert_load.zero_()
        monkeypatch.setenv("R1LAB_KERNELS", "0")
        assert not m._use_kernels(x.view(T, -1))
        ref = m(x)
    assert torch.equal(load, m.expert_load)
    assert load.sum() == T * m.top_k
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < tol


def test_kernels_stay_out_of_training(monkeypatch):
    """With a gradient wanted (training, GRPO's update) the torch path runs, whatever the device."""
    device, dtype = device_and_dtype()
    m = random_moe(moe_config(), device, dtype)
    x = torch.randn(4, 128, device=device, dtype=dtype)
    assert not m._use_kernels(x)
    with torch.no_grad():
        assert m._use_kernels(x)
    monkeypatch.setenv("R1LAB_KERNELS", "0")
    with torch.no_grad():
        assert not m._use_kernels(x)


@pytest.mark.skipif(not CUDA, reason="compiled, CUDA-graphed decode needs a GPU")
def test_compiled_engine_with_kernels_is_as_accurate_as_the_torch_path(monkeypatch):
    """The engine's compiled, graphed decode step (kernels inside) and the eager torch path, both bf16, against
    the fp32 model: each run's log-probs are recomputed by a full fp32 forward over its own tokens. The kernels
    keep the experts in fp32 longer, so their error may not exceed the torch path's (x2 + 0.01 for the noise of
    where bf16 rounding lands). Greedy tokens may part only at a near-tie."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=512, hidden_size=128, moe_intermediate_size=64, eos_token_id=511)
    m32 = Transformer(cfg).init_weights(seed=0).to("cuda").eval()
    with torch.no_grad():
        m32.lm_head.weight.mul_(8)  # a peakier next-token distribution than the init gives
    m = Transformer(cfg).to("cuda")
    m.load_state_dict(m32.state_dict())
    m = m.to(torch.bfloat16).eval()
    prompts = [[1, 2, 3, 4, 5], [7] * 11, list(range(20, 40))]
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=True, ignore_eos=True)
    fast = Engine(m, max_batch=4, max_seq_len=64).generate(prompts, params)
    monkeypatch.setenv("R1LAB_KERNELS", "0")
    slow = Engine(m, max_batch=4, max_seq_len=64, cuda_graph=False, compile=False).generate(prompts, params)

    def error(completions):
        worst = 0.0
        for p, c in zip(prompts, completions):
            with torch.no_grad():
                lp = m32(torch.tensor([p + c.token_ids], device="cuda")).float().log_softmax(-1)[0, len(p) - 1:-1]
            ref = lp.gather(1, torch.tensor(c.token_ids, device="cuda")[:, None])[:, 0].cpu()
            worst = max(worst, (torch.tensor(c.logprobs) - ref).abs().max().item())
        return worst

    assert error(fast) <= 2 * error(slow) + 0.01
    # Greedy tokens agree until a near-tie: where they first differ, the fp32 model's top two log-probs (after the
    # shared prefix) lie within the two runs' own bf16 error of each other. (On an H200 the attention kernel
    # flipped one token whose fp32 top two were 0.019 apart; the errors were 0.030 and 0.054.)
    noise = 2 * (error(fast) + error(slow))
    for p, f, s in zip(prompts, fast, slow):
        d = next((i for i, (a, b) in enumerate(zip(f.token_ids, s.token_ids)) if a != b), None)
        if d is not None:
            with torch.no_grad():
                top2 = m32(torch.tensor([p + s.token_ids[:d]], device="cuda"))[0, -1].float().log_softmax(-1).topk(2)
            gap = (top2.values[0] - top2.values[1]).item()
            assert gap <= noise, f"greedy tokens differ at {d}, where fp32's top two are {gap:.3f} apart"


@pytest.mark.parametrize("B,H,C,R,T", [(3, 4, 32, 8, 100), (2, 16, 64, 32, 300), (1, 16, 256, 32, 40), (2, 20, 64, 32, 70)])
def test_latent_attention_kernel_equals_softmax_attention(B, H, C, R, T):
    """Against plain masked softmax attention in fp32 (one shared key/value head: key = the whole row, value =
    its first C numbers), with rows of different live lengths, one that sees slot 0 only, and caches split
    across programs. fp32 on the interpreter: 1e-5; bf16 on a GPU (probabilities rounded to bf16 before the
    value product, as the torch path does): 2e-2 relative."""
    device, dtype = device_and_dtype()
    torch.manual_seed(0)
    q = torch.randn(B, H, C + R, device=device).to(dtype)
    kv = torch.randn(B, T, C + R, device=device).to(dtype)
    lengths = torch.tensor([T, 1, T // 3][:B], device=device)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]
    scale = (C + R) ** -0.5
    ref = ((q.float() @ kv.float().transpose(1, 2)) * scale).masked_fill(~mask[:, None], float("-inf"))
    ref = ref.softmax(-1) @ kv.float()[..., :C]  # (B, H, C)
    with torch.no_grad():
        out = kernels.latent_attention(q, kv, mask, scale, C)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out - ref).norm() / ref.norm()) < tol


def test_latent_attention_kernel_under_torch_compile():
    """The op inside a torch.compile'd graph (as in the engine's compiled decode step), whole-graph: the same
    numbers as called eagerly."""
    device, dtype = device_and_dtype()
    torch.manual_seed(0)
    B, H, C, R, T = 2, 16, 64, 32, 90
    q = torch.randn(B, H, C + R, device=device).to(dtype)
    kv = torch.randn(B, T, C + R, device=device).to(dtype)
    mask = torch.arange(T, device=device)[None] < torch.tensor([T, 17], device=device)[:, None]
    torch._dynamo.reset()
    fn = torch.compile(lambda q, kv, mask: kernels.latent_attention(q * 1, kv, mask, 0.1, C) + 0, fullgraph=True)
    with torch.no_grad():
        eager = kernels.latent_attention(q, kv, mask, 0.1, C)
        compiled = fn(q, kv, mask)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_mla_decode_with_the_attention_kernel_equals_torch(monkeypatch):
    """MLA's absorbed decode step (one token per sequence over a latent cache, engine-style mask) with
    R1LAB_ATTN_KERNEL=1 and without: same output (fp32 interpreter 1e-5; bf16 GPU 2e-2)."""
    device, dtype = device_and_dtype()
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    mla = MLA(cfg).to(device=device, dtype=dtype).eval()
    B, T = 3, 50
    cache = torch.randn(B, T, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=device).to(dtype)
    pos = torch.tensor([[7], [0], [33]], device=device)
    inv_freq, att = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq.to(device), pos, att)
    x = torch.randn(B, 1, cfg.hidden_size, device=device).to(dtype)
    mask = (torch.arange(T, device=device) <= pos[..., None])[:, None]  # (B, 1, 1, T)
    outs = []
    for on in ("0", "1"):
        monkeypatch.setenv("R1LAB_ATTN_KERNEL", on)
        c = cache.clone()
        with torch.no_grad():
            assert kernels.attention_enabled(x) == (on == "1")
            outs.append(mla(x, cos, sin, mask, c, pos).float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()) < tol
