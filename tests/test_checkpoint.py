"""Checkpoint folders: FP8 block scales, shards + index, MTP layer names, config dialects, and the errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from r1lab import CheckpointError, ModelConfig, Transformer, get_preset, load_pretrained, save_pretrained
from r1lab.checkpoint import dequantize_fp8, quantize_fp8

VOCAB = 320


def small_model(seed=0, **kw):
    cfg = get_preset("tiny").replace(**{"vocab_size": VOCAB, **kw})
    torch.manual_seed(seed)
    return Transformer(cfg).init_weights(seed=seed).eval()


def test_fp8_dequantisation_round_trip_on_odd_shape():
    """(300, 200) is not a multiple of 128: the scale grid is (3, 2) and edge blocks are partial."""
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.linspace(0.01, 3.0, 200)  # blocks with very different ranges
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = dequantize_fp8(q, s, dtype=torch.float32)
    # Independent reference: multiply every element by its own block's scale (w = q * s, block by block).
    ref = torch.empty(300, 200)
    for i in range(0, 300, 128):
        for j in range(0, 200, 128):
            ref[i:i + 128, j:j + 128] = q[i:i + 128, j:j + 128].float() * s[i // 128, j // 128]
    assert torch.equal(back, ref)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 per element, plus subnormals near zero whose
    # absolute error is at most 2^-10 of the block's max; bound each block by both.
    for bi in range(3):
        for bj in range(2):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            err = (back[blk] - w[blk]).abs()
            bound = w[blk].abs() * 2 ** -4 + w[blk].abs().max() * 2 ** -9
            assert (err <= bound).all()


def test_fp8_scale_shape_is_checked():
    q, s = quantize_fp8(torch.randn(130, 10))
    with pytest.raises(CheckpointError, match="expected \\(2, 1\\)"):
        dequantize_fp8(q, s[:1])


def test_fp8_checkpoint_loads_like_its_dequantised_weights(tmp_path):
    m = small_model()
    save_pretrained(m, tmp_path / "bf", tokenizer=False)
    tensors = load_file(tmp_path / "bf" / "model.safetensors")
    fp8, dense = {}, {}
    for k, t in tensors.items():  # quantise every projection matrix as DeepSeek's FP8 release does
        if t.dim() == 2 and "proj" in k:
            q, s = quantize_fp8(t, (16, 16))
            fp8[k], fp8[k + "_scale_inv"] = q, s
            dense[k] = dequantize_fp8(q, s, (16, 16), torch.float32)
        else:
            fp8[k] = dense[k] = t
    for name, tens in (("fp8", fp8), ("dense", dense)):
        (tmp_path / name).mkdir()
        cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
        if name == "fp8":
            cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [16, 16]}
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file(tens, tmp_path / name / "model.safetensors")
    a = load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    b = load_pretrained(tmp_path / "dense")
    assert a.config.quantization_config is None
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # FP8 without an explicit dtype loads as bfloat16
    assert load_pretrained(tmp_path / "fp8").model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16


def test_sharded_save_writes_index_and_published_names(tmp_path):
    m = small_model()
    save_pretrained(m, tmp_path / "ck", tokenizer=False, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3
    names = set(index["weight_map"])
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    # MTP module at layer index num_hidden_layers (3), with its own copies of embedding and head
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.0.down_proj.weight"):
        assert f"model.layers.3.{k}" in names
    with safe_open(tmp_path / "ck" / index["weight_map"]["model.layers.1.mlp.experts.7.gate_proj.weight"], "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.1.mlp.experts.7.gate_proj.weight"),
                           m.model.layers[1].mlp.experts.gate_proj[7])
    back = load_pretrained(tmp_path / "ck")
    assert len(back.mtp) == 1
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_checkpoint_without_mtp_loads_for_plain_inference(tmp_path):
    m = small_model()
    save_pretrained(m, tmp_path / "ck", tokenizer=False)
    t = load_file(tmp_path / "ck" / "model.safetensors")
    save_file({k: v for k, v in t.items() if not k.startswith("model.layers.3.")}, tmp_path / "ck" / "model.safetensors")
    back = load_pretrained(tmp_path / "ck")
    assert len(back.mtp) == 0
    x = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_saved_folder_carries_the_tokenizer(tmp_path):
    m = small_model(vocab_size=129280)
    save_pretrained(m, tmp_path / "ck")
    assert (tmp_path / "ck" / "tokenizer.json").is_file() and (tmp_path / "ck" / "tokenizer_config.json").is_file()


def test_save_is_atomic_and_leaves_no_temporary_folders(tmp_path):
    m = small_model()
    save_pretrained(m, tmp_path / "ck", tokenizer=False)
    save_pretrained(m, tmp_path / "ck", tokenizer=False)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---------------------------------------------------------------------- config dialects
PUBLISHED_V3 = {  # DeepSeek-V3/R1's config.json as published (abridged to the fields that matter)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "bos_token_id": 0, "eos_token_id": 1, "aux_loss_alpha": 0.001, "ep_size": 1, "seq_aux": True,
}
PUBLISHED_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
}


def test_published_v3_config_reads_as_the_preset():
    cfg = ModelConfig.from_hf_dict(PUBLISHED_V3)
    preset = get_preset("deepseek-v3")
    for f in ("hidden_size", "num_hidden_layers", "n_routed_experts", "topk_group", "q_lora_rank",
              "max_position_embeddings", "num_nextn_predict_layers"):
        assert getattr(cfg, f) == getattr(preset, f)
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_scaling["type"] == "yarn"
    assert cfg.quantization_config["weight_block_size"] == [128, 128]
    assert cfg.num_params() == preset.num_params()


def test_transformers5_config_dialect_reads_the_same():
    cfg = ModelConfig.from_hf_dict(PUBLISHED_V3)
    d = cfg.to_hf_dict()
    d.pop("rope_scaling"), d.pop("rope_theta")  # transformers 5 keeps only rope_parameters
    assert d["rope_parameters"]["rope_type"] == "yarn"
    back = ModelConfig.from_hf_dict(d)
    assert back.rope_scaling == cfg.rope_scaling and back.rope_theta == cfg.rope_theta


def test_v2_lite_config_reads_v2_semantics():
    cfg = ModelConfig.from_hf_dict(PUBLISHED_V2_LITE)
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob, cfg.q_lora_rank) == ("softmax", "greedy", False, None)
    assert cfg.num_params() == get_preset("deepseek-v2-lite").num_params()
    # a V2 config without scoring_func still means softmax (V2 predates sigmoid gating)
    assert ModelConfig.from_hf_dict({k: v for k, v in PUBLISHED_V2_LITE.items() if k != "scoring_func"}
                                    ).scoring_func == "softmax"


# ---------------------------------------------------------------------- errors
def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**PUBLISHED_V3, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        load_pretrained(tmp_path)


def test_bad_config_field_is_named():
    with pytest.raises(ValueError, match="topk_group"):
        ModelConfig.from_hf_dict({**PUBLISHED_V3, "topk_group": 9})


def test_missing_tensors_are_listed(tmp_path):
    save_pretrained(small_model(), tmp_path / "ck", tokenizer=False)
    t = load_file(tmp_path / "ck" / "model.safetensors")
    del t["model.layers.2.self_attn.kv_b_proj.weight"], t["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(t, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.kv_b_proj.weight"):
        load_pretrained(tmp_path / "ck")
    t["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(4 * 32, 32)
    save_file(t, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts \[3\] missing"):
        load_pretrained(tmp_path / "ck")


def test_shape_mismatch_names_tensor_expected_and_found(tmp_path):
    save_pretrained(small_model(), tmp_path / "ck", tokenizer=False)
    t = load_file(tmp_path / "ck" / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    save_file(t, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj.weight has shape \(64, 60\), expected \(64, 64\)"):
        load_pretrained(tmp_path / "ck")


def test_truncated_file_is_reported(tmp_path):
    save_pretrained(small_model(), tmp_path / "ck", tokenizer=False)
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(tmp_path / "ck")
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path / "ck")


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_V3))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle files are never read"):
        load_pretrained(tmp_path)


def test_unknown_tensors_are_refused(tmp_path):
    save_pretrained(small_model(), tmp_path / "ck", tokenizer=False)
    t = load_file(tmp_path / "ck" / "model.safetensors")
    t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(4)
    save_file(t, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_norm"):
        load_pretrained(tmp_path / "ck")
