"""`r1lab sft`: supervised fine-tuning on chat data, loss on the final assistant turn only
(r1lab.data.sft_sequences), conversations packed under the document mask."""

from __future__ import annotations

from ..data import sft_sequences
from .loop import run_recipe
from .pretrain import load_data_tokenizer
from .recipe import Recipe


def build_data(recipe: Recipe, model):
    tok = load_data_tokenizer(recipe)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary only "
                         f"{model.config.vocab_size}: SFT renders text, so they must match")
    return sft_sequences(recipe.data.train, tok, recipe.data.seq_len, recipe.data.too_long), tok


def run(recipe: Recipe, resume=None, quiet: bool = False) -> dict:
    return run_recipe(recipe, "sft", build_data, resume, quiet)
