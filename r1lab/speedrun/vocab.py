"""A small task vocabulary for the speedrun: characters, the R1 markers, and the corpus's frequent words.

The DeepSeek-V3/R1 tokenizer has 129,280 ids; a speedrun model with a 128-wide hidden state would spend most of
its parameters and time in that output layer. The speedrun therefore writes its own `tokenizer.json` (read by
the same Rust `tokenizers` library and the same `r1lab.Tokenizer` as the real one, so every command loads it):

  * ids 0-3: `<bos>`, `<eos>`, `<pad>`, `<unk>` (special: dropped by `decode(skip_special_tokens=True)`);
  * the chat markers `<｜User｜>`, `<｜Assistant｜>` and the tags `<think>`, `</think>`, `<answer>`, `</answer>`,
    one id each, so the R1 chat template renders as in the real tokenizer;
  * every word (a run of letters, with its leading space when it has one) seen at least `min_count` times in
    the corpus, one id each; digits are never merged (one id per digit, as DeepSeek-V3's tokenizer does too);
  * every character of the corpus, one id each.

Words are matched longest-first before anything else (they are "added tokens"), the remaining text falls into
characters, and decoding concatenates the pieces, so `decode(encode(text)) == text` for any text made of the
corpus's characters. A character outside them becomes `<unk>`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..tokenizer import (CONFIG_FILE, TOKENIZER_FILE, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN,
                         TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END,
                         TOOL_SEP, Tokenizer, load_tokenizer)

SPECIAL = ("<bos>", "<eos>", "<pad>", "<unk>")
MARKERS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<answer>", "</answer>")
# The chat template's tool-call and tool-output markers, for tasks that call tools (speedrun/calculator.py).
TOOL_MARKERS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUTS_BEGIN,
                TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)
_WORD = re.compile(r" ?[A-Za-z]+")


def build_task_tokenizer(folder: str | Path, texts: Iterable[str], min_count: int = 20,
                         markers: tuple[str, ...] = MARKERS) -> Tokenizer:
    """Write tokenizer.json and tokenizer_config.json for `texts` into `folder` and load them. `markers` become
    one id each (after the special tokens); a task with tool calls adds the template's tool markers
    (`TOOL_MARKERS`), while the default keeps the speedrun's ids as they were."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    from ..tokenizer import _shipped_folder

    chars: set[str] = set()
    words: Counter[str] = Counter()
    for text in texts:
        for m in markers:
            text = text.replace(m, " ")
        chars.update(text)
        words.update(w for w in _WORD.findall(text) if len(w.strip()) > 1)
    kept = sorted((w for w, c in words.items() if c >= min_count), key=lambda w: (-len(w), w))
    pieces = list(SPECIAL) + list(markers) + sorted(chars - set(markers)) + kept
    backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    backend.add_tokens([AddedToken(s, special=False, normalized=False, single_word=False) for s in (*markers, *kept)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / TOKENIZER_FILE))
    # The chat template is the DeepSeek one (r1lab renders it in Python; kept for transformers' sake).
    shipped = json.loads((_shipped_folder() / CONFIG_FILE).read_text(encoding="utf-8"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "chat_template": shipped.get("chat_template"), "model_max_length": 4096,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return load_tokenizer(folder)
