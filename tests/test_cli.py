"""`r1lab info` numbers, asserted against a hand derivation from the DeepSeek-V3 architecture."""

import json
import subprocess
import sys

import pytest

from r1lab import load_pretrained


def r1lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1lab.cli", *args], capture_output=True, text=True, timeout=120)


def test_deepseek_v3_counts_by_hand():
    # Per layer, MLA: q_a 7168*1536 + norm 1536 + q_b 1536*128*192 + kv_a 7168*576 + norm 512
    #                 + kv_b 512*128*256 + o 128*128*7168                                        = 187,107,328
    attn = 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168
    norms = 2 * 7168
    expert = 3 * 7168 * 2048
    dense = attn + norms + 3 * 7168 * 18432
    router = 256 * 7168 + 256  # gate weight + correction bias
    moe_total = attn + norms + 257 * expert + router  # 256 routed + 1 shared
    moe_active = attn + norms + 9 * expert + router  # 8 routed + 1 shared
    emb = 2 * 129280 * 7168  # embedding + output head (untied)
    total = 3 * dense + 58 * moe_total + 7168 + emb
    active = 3 * dense + 58 * moe_active + 7168 + emb
    assert (total, active) == (671_026_419_200, 37_552_297_472)

    out = r1lab("info", "--preset", "deepseek-v3", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["params_total"] == total and s["params_active"] == active
    assert s["params_total_no_embeddings"] == total - emb and s["params_active_no_embeddings"] == active - emb
    assert s["layers"] == 61 and s["max_positions"] == 163_840
    assert s["kv_cache_bytes_per_token_mla_bf16"] == 61 * 576 * 2 == 70_272
    assert s["kv_cache_bytes_per_token_mha_bf16"] == 61 * 128 * (192 + 128) * 2


def test_info_text_for_v3_r1_and_v2_lite():
    for preset in ("deepseek-v3", "deepseek-r1"):
        out = r1lab("info", "--preset", preset)
        assert out.returncode == 0, out.stderr
        for text in ("671.03B total", "37.55B active", "669.17B total", "35.70B active", "61 (3 dense + 58 MoE)",
                     "163,840 positions", "70,272 B MLA latent", "4,997,120 B"):
            assert text in out.stdout, text
    out = r1lab("info", "--preset", "deepseek-v2-lite")
    assert "15.71B total" in out.stdout and "2.66B active" in out.stdout


def test_info_reads_a_model_folder(tmp_path):
    out = r1lab("init", "--preset", "tiny", "--out", str(tmp_path / "tiny"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tiny" / "tokenizer.json").is_file()
    model = load_pretrained(tmp_path / "tiny")
    s = json.loads(r1lab("info", "--model", str(tmp_path / "tiny"), "--json").stdout)
    main = sum(p.numel() for p in model.model.parameters()) + model.lm_head.weight.numel()
    assert s["params_total"] == main + 2 * 8  # + the two MoE layers' 8 correction-bias entries
    assert s["params_mtp"] == sum(p.numel() for p in model.mtp.parameters()) + 8


@pytest.mark.parametrize("args, message", [
    (("info", "--model", "/no/such/folder"), "no config.json"),
    (("info", "--preset", "nope"), "invalid choice"),
    (("init", "--preset", "deepseek-v3", "--out", "/tmp/x"), "too large"),
])
def test_errors_are_one_line_and_nonzero(args, message):
    out = r1lab(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_generate_streams_the_engine_output(tmp_path):
    import torch

    from r1lab import Engine, SamplingParams, load_tokenizer

    assert r1lab("init", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--seed", "3").returncode == 0
    args = ("generate", "--model", str(tmp_path / "ck"), "--prompt", "Hello", "--max-tokens", "12",
            "--temperature", "0", "--device", "cpu")
    out = r1lab(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout == r1lab(*args).stdout  # greedy: the same text twice
    tok = load_tokenizer(tmp_path / "ck")
    model = load_pretrained(tmp_path / "ck", dtype=torch.float32)
    ref = Engine(model, tok, max_batch=1, max_seq_len=64).generate(
        [tok.encode("Hello")], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.stdout.startswith(tok.decode(ref.token_ids, skip_special_tokens=True))
    assert f"[{ref.finish_reason}, {len(ref.token_ids)} tokens]" in out.stdout


def test_chat_keeps_history_and_exits_on_eof(tmp_path):
    assert r1lab("init", "--preset", "tiny", "--out", str(tmp_path / "ck")).returncode == 0
    out = subprocess.run([sys.executable, "-m", "r1lab.cli", "chat", "--model", str(tmp_path / "ck"), "--max-tokens",
                          "4", "--device", "cpu"], input="hi\n/reset\nagain\n", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") == 4  # three inputs answered or handled, then EOF at the fourth prompt
