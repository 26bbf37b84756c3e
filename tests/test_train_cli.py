"""Recipes and the `pretrain` / `sft` command line: every key documented, overrides, precedence, errors."""

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from r1lab.cli import main
from r1lab.train.recipe import SECTIONS, Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]


def printed(capsys, *args) -> dict:
    assert main(["pretrain", "--print-recipe", *args]) == 0
    return tomllib.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_help_documents_every_key(kind):
    out = subprocess.run([sys.executable, "-m", "r1lab.cli", kind, "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    keys = [f"--{sec}.{f.name.replace('_', '-')}" for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert len(keys) >= 35
    for key in keys:
        assert key in text, key
    assert "(default: 0.0003)" in text if kind == "pretrain" else "(default: 2e-05)" in text  # per-kind defaults
    assert "--resume" in text and "--recipe" in text


def test_overrides_types_and_precedence(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text('[optim]\nlr = 1e-3\nwarmup_steps = 7\n[data]\ntrain = "a.jsonl"\n'
                 '[model]\nconfig = {vocab_size = 96}\n')
    d = printed(capsys, "--recipe", str(f), "--optim.lr", "3e-4", "--train.batch-size", "5",
                "--train.activation_checkpointing", "true", "--data.train", "x.txt, y.jsonl",
                "--moe.bias-gamma", "0", "--log.tensorboard", "no")
    assert d["optim"]["lr"] == 3e-4 and d["optim"]["warmup_steps"] == 7  # command line > file > default
    assert d["train"]["batch_size"] == 5 and d["train"]["activation_checkpointing"] is True
    assert d["moe"]["bias_gamma"] == 0.0 and d["log"]["tensorboard"] is False
    assert d["data"]["train"] == [str(Path.cwd() / "x.txt"), str(Path.cwd() / "y.jsonl")]  # cwd-relative here
    assert d["model"]["config"] == {"vocab_size": 96}
    assert d["train"]["steps"] == Recipe().train.steps  # untouched keys keep their defaults
    d = printed(capsys, "--recipe", str(f))
    assert d["data"]["train"] == [str(tmp_path / "a.jsonl")]  # relative to the recipe file
    # the printed TOML is itself a recipe that reads back to the same thing
    g = tmp_path / "again.toml"
    g.write_text(Recipe.from_dict(d, "pretrain").to_toml())
    assert load_recipe(g, "pretrain").to_dict() == d


def test_a_null_model_field_round_trips_through_recipe_toml(tmp_path, capsys):
    """TOML has no null: model.config with a null field (no query compression, as DeepSeek-V2-Lite) is written
    as a JSON string, which reads back to the same dict."""
    assert main(["pretrain", "--print-recipe", "--model.config", '{"q_lora_rank": null, "vocab_size": 96}']) == 0
    text = capsys.readouterr().out
    assert 'config = "{\\"q_lora_rank\\": null, \\"vocab_size\\": 96}"' in text
    f = tmp_path / "r.toml"
    f.write_text(text)
    r = load_recipe(f, "pretrain")
    assert r.model.config == {"q_lora_rank": None, "vocab_size": 96}
    f.write_text(r.to_toml())
    assert load_recipe(f, "pretrain").to_dict() == r.to_dict()


@pytest.mark.parametrize("args, message", [
    (["--train.steps", "ten"], "command line: train.steps: cannot read 'ten' as int"),
    (["--train.compile", "maybe"], "cannot read 'maybe' as bool"),
    (["--optim.schedule", "linear"], "optim.schedule must be one of cosine, constant"),
    (["--train.batch-size", "0"], "train.batch_size must be > 0"),
    (["--model.config", "{bad json"], "model.config: cannot read"),
    (["--model.init", "x", "--model.config", '{"vocab_size": 8}'], "cannot apply to the loaded weights"),
    (["--recipe", "nope.toml"], "recipe 'nope.toml' not found"),
])
def test_bad_values_are_one_line_errors(capsys, args, message):
    assert main(["pretrain", "--print-recipe", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_keys(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text("[optim]\nlrr = 1\n")
    assert main(["pretrain", "--recipe", str(f)]) == 2
    assert f"{f}: unknown key 'optim.lrr'; known: lr, min_lr_ratio" in capsys.readouterr().err
    f.write_text("[optimizer]\nlr = 1\n")
    assert main(["pretrain", "--recipe", str(f)]) == 2
    assert "unknown table [optimizer]" in capsys.readouterr().err
    f.write_text("[optim]\nlr = 'fast'\n")
    assert main(["pretrain", "--recipe", str(f)]) == 2
    assert "optim.lr: cannot read 'fast' as float" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: an unknown option
        main(["pretrain", "--optim.lrr", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --optim.lrr" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["pretrain-tiny", "sft-tiny"])
def test_shipped_recipes_load_and_point_at_existing_data(name):
    kind = name.split("-")[0]
    r = load_recipe(REPO / "recipes" / f"{name}.toml", kind)
    assert r.data.train and all(Path(p).is_file() for p in r.data.train)
    assert all(Path(p).stat().st_size < 20_000 for p in r.data.train)  # a few KB


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["pretrain", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_add_parsers_registers_on_another_parser():
    import argparse

    from r1lab.train.cli import add_parsers
    p = argparse.ArgumentParser(prog="r1lab")
    sub = p.add_subparsers(dest="command")
    add_parsers(sub)
    args = p.parse_args(["sft", "--optim.lr", "1e-5", "--recipe", "x.toml"])
    assert args.kind == "sft" and args.recipe == "x.toml" and vars(args)["recipe:optim.lr"] == "1e-5"
    assert json.dumps(sorted(sub.choices)) == '["pretrain", "sft"]'
