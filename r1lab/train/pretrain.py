"""`r1lab pretrain`: next-token prediction on packed text documents (r1lab.data.pretrain_sequences)."""

from __future__ import annotations

from pathlib import Path

from ..data import pretrain_sequences
from .loop import run_recipe
from .recipe import Recipe


def load_data_tokenizer(recipe: Recipe):
    """data.tokenizer, else model.init's tokenizer files if it has them, else the DeepSeek-V3/R1 tokenizer."""
    from ..tokenizer import load_tokenizer

    folder = recipe.data.tokenizer or (recipe.model.init if recipe.model.init and
                                       (Path(recipe.model.init) / "tokenizer.json").is_file() else None)
    return load_tokenizer(folder)


def build_data(recipe: Recipe, model):
    tok = load_data_tokenizer(recipe)
    data = pretrain_sequences(recipe.data.train, tok, recipe.data.seq_len, model.config.vocab_size,
                              recipe.data.text_separator)
    # Pre-tokenized data for a model whose vocabulary is not the tokenizer's: export without tokenizer files.
    return data, tok if tok.vocab_size == model.config.vocab_size else False


def run(recipe: Recipe, resume=None, quiet: bool = False) -> dict:
    return run_recipe(recipe, "pretrain", build_data, resume, quiet)
