"""Training data: readers with file:line errors, packing into fixed-length rows, loss masks, batches.

Both trainers turn their files into the same thing, `Sequences`: N rows of seq_len + 1 tokens, and for every
token two flags, `starts` (it opens a document, a conversation or the padding) and `targets` (the loss predicts
it). A row gives the model seq_len inputs, and the labels are the row shifted by one. `make_batch` turns rows
into model inputs:

* labels: the next token, or IGNORE where that token is not a target or opens a new document, so the loss
  never asks a document to predict the start of the next one;
* attention "document": block-diagonal causal attention (an r1lab.model.attention.DocumentMask: each token's
  document number, never an (S, S) tensor; FlexAttention's block mask on CUDA), so packed documents do not see
  each other, and positions restart at 0 in every document (as if each had a row of its own). A document cut
  at a row boundary continues in the next row from position 0, seeing only its own part in that row.
* attention "causal": plain causal attention over the whole row and positions 0..S-1 (faster attention
  kernels; documents see their predecessors in the row, the loss still never crosses a boundary).

Pretraining (`pretrain_sequences`): .txt files (one document per file, or split at a separator) or JSONL rows
`{"text": str}` (tokenized, wrapped in BOS ... EOS) or `{"input_ids": [int, ...]}` (already tokenized, used
as given); all documents are concatenated and cut into rows (every token is predicted exactly once).

SFT (`sft_sequences`): JSONL rows `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}`
(optional "system"), rendered with the R1 chat template. The loss covers the final assistant turn only,
reasoning included: the template strips `<think>...</think>` from assistant turns, so the prompt part is
rendered by the template (with the generation prompt) and the final reply is appended verbatim + EOS. Earlier
assistant turns are context, rendered as the template renders history (without their reasoning), exactly what
the model sees at inference. Conversations are packed into rows, best fit, longest first.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model.attention import DocumentMask, document_mask

IGNORE = -100  # label of positions the loss skips (F.cross_entropy's default ignore_index)


@dataclass
class Sequences:
    """Fixed-length training rows. tokens (N, S+1) int32; starts, targets (N, S+1) bool (module docstring).
    `stats` counts what was read and skipped, for the run's log."""

    tokens: torch.Tensor
    starts: torch.Tensor
    targets: torch.Tensor
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def batch(self, rows: torch.Tensor | Sequence[int], device: torch.device | str = "cpu",
              attention: str = "document") -> "Batch":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return make_batch(self.tokens[rows].to(device), self.starts[rows].to(device),
                          self.targets[rows].to(device), attention)


@dataclass
class Batch:
    """Model inputs for one micro-batch. input_ids, labels (B, S) long; positions (B, S) or None (0..S-1);
    attn_mask: a DocumentMask (attention "document") or None (causal)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    attn_mask: DocumentMask | None = None

    def mtp_labels(self, depth: int) -> list[torch.Tensor]:
        """Labels of the multi-token-prediction depths 1..depth: depth k at position i predicts token i+1+k, and
        counts only where tokens i+1 .. i+1+k are all targets of the same document."""
        ok = self.labels != IGNORE
        out, chain = [], ok
        for k in range(1, depth + 1):
            lab = torch.full_like(self.labels, IGNORE)
            nxt = torch.zeros_like(ok)
            both = chain[:, :-k] & ok[:, k:]
            lab[:, :-k] = torch.where(both, self.labels[:, k:], IGNORE)
            nxt[:, :-k] = both
            out.append(lab)
            chain = nxt
        return out


def make_batch(tokens: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, attention: str = "document") -> Batch:
    """Rows (B, S+1) of tokens and flags -> a Batch (module docstring). Runs on the rows' device."""
    inputs = tokens[:, :-1].long()
    labels = torch.where(targets[:, 1:] & ~starts[:, 1:], tokens[:, 1:].long(), IGNORE)
    if attention == "causal":
        return Batch(inputs, labels)
    if attention != "document":
        raise ValueError(f"attention must be 'document' or 'causal', got {attention!r}")
    B, S = inputs.shape
    ar = torch.arange(S, device=tokens.device)
    st = starts[:, :-1]
    seg_start = torch.where(st, ar, 0).cummax(dim=1).values  # (B, S) index where each token's document begins
    doc = st.int().cumsum(dim=1, dtype=torch.int32)  # (B, S) document number in the row (continued one: 0)
    return Batch(inputs, labels, ar - seg_start, document_mask(doc))


class BatchOrder:
    """Which rows micro-batch k holds: rows are taken in a seeded permutation per epoch (or in order), and
    batches run on across epoch boundaries. A pure function of k, so the data position is one integer."""

    def __init__(self, n_rows: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n_rows, batch_size, seed, shuffle
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._epoch = epoch
        return self._perm

    def rows(self, k: int) -> list[int]:
        out = []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, i = divmod(j, self.n)
            out.append(int(self._order(epoch)[i]))
        return out


# ---------------------------------------------------------------------- reading
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    if path.suffix == ".json":
        raise ValueError(f"{path}: JSON files are not read; write one object per line as .jsonl")


def _decode(raw: bytes, where: str) -> str:
    """UTF-8 text, or ValueError naming `where` (file:line), the byte and its column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                         f"{e.start - line_start + 1}); save the file as UTF-8") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", object) for each non-blank line; a line that is not a JSON object is an error."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 is an error naming its line
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            line = _decode(raw, where)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def read_documents(path: str | Path, separator: str = "") -> Iterator[tuple[str, str | list[int]]]:
    """Pretraining documents of one file as ("file:line", text or token ids)."""
    path = Path(path)
    _check_file(path)
    if path.suffix != ".jsonl":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # name the line, as every other data error does
            line = raw.count(b"\n", 0, e.start) + 1
            _decode(raw[:e.end], f"{path}:{line}")  # raises, naming the column too
            raise
        for i, doc in enumerate(text.split(separator) if separator else [text]):
            yield f"{path}:document {i + 1}", doc
        return
    for where, row in read_jsonl(path):
        if "text" in row:
            if not isinstance(row["text"], str):
                raise ValueError(f"{where}: 'text' must be a string, got {type(row['text']).__name__}")
            yield where, row["text"]
        elif "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"{where}: 'input_ids' must be a list of integers")
            yield where, ids
        else:
            raise ValueError(f"{where}: expected a 'text' string or an 'input_ids' list, found keys "
                             f"{sorted(row)}")


# ---------------------------------------------------------------------- pretraining
def pretrain_sequences(paths: Sequence[str | Path], tokenizer, seq_len: int, vocab_size: int,
                       separator: str = "") -> Sequences:
    """Tokenize, concatenate and cut into rows of seq_len + 1 tokens (consecutive rows share one token, so each
    token is predicted once). Text documents become BOS + text + EOS. Raises ValueError naming file:line for
    bad rows and out-of-vocabulary ids, and when there is not one full row of data."""
    if not paths:
        raise ValueError("no training data: set data.train to one or more .txt / .jsonl files")
    chunks, n_docs, n_empty = [], 0, 0
    for path in paths:
        for where, doc in read_documents(path, separator):
            if isinstance(doc, str):
                if not doc.strip():
                    n_empty += 1
                    continue
                if tokenizer.vocab_size > vocab_size:
                    raise ValueError(f"{where}: text needs the tokenizer's {tokenizer.vocab_size} ids but the model's "
                                     f"vocabulary has {vocab_size}; give pre-tokenized 'input_ids' or a larger model")
                ids = [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]
            else:
                ids = doc
                if not ids:
                    n_empty += 1
                    continue
                bad = next((i for i in ids if not 0 <= i < vocab_size), None)
                if bad is not None:
                    raise ValueError(f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
            chunks.append(torch.tensor(ids, dtype=torch.int32))
            n_docs += 1
    n_tokens = sum(len(c) for c in chunks)
    n_rows = (n_tokens - 1) // seq_len if n_tokens else 0
    if n_rows == 0:
        raise ValueError(f"not enough pretraining data in {', '.join(map(str, paths))}: {n_tokens} tokens in {n_docs} "
                         f"documents ({n_empty} empty), fewer than seq_len + 1 = {seq_len + 1}; lower data.seq_len "
                         f"or add data")
    flat = torch.cat(chunks)
    starts = torch.zeros(n_tokens, dtype=torch.bool)
    starts[torch.tensor([len(c) for c in chunks]).cumsum(0)[:-1]] = True
    starts[0] = True
    used = n_rows * seq_len + 1
    # Rows are overlapping views (stride seq_len, length seq_len + 1) of the flat stream: no copy.
    tokens = flat[:used].unfold(0, seq_len + 1, seq_len)
    starts = starts[:used].unfold(0, seq_len + 1, seq_len)
    stats = {"documents": n_docs, "empty_documents": n_empty, "tokens": n_tokens, "rows": n_rows,
             "tokens_dropped_at_end": n_tokens - used}
    return Sequences(tokens, starts, torch.ones_like(starts), stats)


# ---------------------------------------------------------------------- SFT
def row_messages(row: dict) -> list[dict]:
    """The conversation of one SFT row, {"messages": [...]} or {"prompt", "response"} (+ optional "system")."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
        return msgs
    if "prompt" in row and "response" in row:
        for k in ("prompt", "response", "system"):
            if k in row and not isinstance(row[k], str):
                raise ValueError(f"{k!r} must be a string, got {type(row[k]).__name__}")
        sys_msg = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return sys_msg + [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise ValueError(f"expected 'messages' or 'prompt' + 'response', found keys {sorted(row)}")


def render_sft(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether the loss predicts it: exactly the final assistant
    turn's tokens (its reasoning, answer and EOS). Raises ValueError for conversations it cannot train on."""
    full = tokenizer.apply_chat_template(messages)  # validates every message first
    last = messages[-1]
    if last["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant reply to train on, got role {last['role']!r}")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    if "tool_calls" in last:
        # The template renders tool calls itself (and keeps their reasoning): train on its rendering.
        if not full.startswith(prompt):
            raise ValueError("the final assistant turn's tool calls render without the assistant marker (the "
                             "template does so after the conversation's first tool call); cannot train on it")
        reply = full[len(prompt):]
    else:
        reply = last["content"] + tokenizer.eos_token
        # The prompt part must be what the template renders; the template's own rendering of the reply drops the
        # reasoning (after tool outputs it keeps it), which is the one difference we allow.
        stripped = last["content"].split("</think>")[-1] + tokenizer.eos_token
        if full not in (prompt + stripped, prompt + reply):
            raise ValueError("the chat template renders this conversation differently from prompt + reply")
    # Ids as the template's tokenization has them: its markers as single tokens, message text as plain text, so a
    # row whose text spells "<｜end▁of▁sentence｜><｜User｜>" cannot end its turn or forge another.
    p_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    if "tool_calls" in last:
        full_ids = tokenizer.apply_chat_template(messages, tokenize=True)
        if full_ids[:len(p_ids)] != p_ids:
            raise ValueError("the final assistant turn's tool calls do not extend the prompt's tokens; cannot "
                             "train on it")
        r_ids = full_ids[len(p_ids):]
    else:
        r_ids = tokenizer.encode(last["content"], split_special_tokens=True) + [tokenizer.eos_id]
    return p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)


def longest_token_chars(tokenizer) -> int | None:
    """How many characters of text one token can stand for at most: the longest vocabulary entry (byte-level
    entries spell one character per byte, so no more characters than that). None if the tokenizer cannot say."""
    n, id_to_token = getattr(tokenizer, "num_tokens", None), getattr(tokenizer, "id_to_token", None)
    if not isinstance(n, int) or id_to_token is None:
        return None
    return max((len(id_to_token(i) or "") for i in range(n)), default=None)


def least_chars(messages: list) -> int:
    """Characters that the rendering of a conversation surely holds: the system and user messages and the final
    reply, which the template writes out verbatim (earlier assistant turns may lose their reasoning)."""
    last = len(messages) - 1
    return sum(len(m["content"]) for i, m in enumerate(messages)
               if isinstance(m, dict) and isinstance(m.get("content"), str)
               and (m.get("role") in ("system", "user") or (i == last and m.get("role") == "assistant")))


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of items per bin, each bin's total length <= capacity. Items
    are taken longest first; each goes into the open bin it fills most tightly. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            bins.append([i])
            space, b = capacity - lengths[i], len(bins) - 1
        else:
            space, b = free.pop(j)
            bins[b].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


def sft_sequences(paths: Sequence[str | Path], tokenizer, seq_len: int, too_long: str = "skip") -> Sequences:
    """Read, render and pack SFT conversations into rows of seq_len + 1 tokens (padding: EOS, never a target).
    Bad rows raise ValueError naming file:line; a conversation over seq_len + 1 tokens is skipped and counted
    (too_long="skip") or an error ("error")."""
    if not paths:
        raise ValueError("no training data: set data.train to one or more .jsonl files of conversations")
    convs, n_rows_read, skipped, longest = [], 0, 0, 0
    cap = seq_len + 1
    # Rows that surely cannot fit are skipped by their length in characters, before the template and the
    # tokenizer see them (a 50 MB row took 117 s and 12 GB to tokenize). Twice the longest token: a margin
    # for normalizers that drop characters.
    token_chars = longest_token_chars(tokenizer)
    max_chars = 2 * token_chars * cap if token_chars else None
    for path in paths:
        if Path(path).suffix != ".jsonl":
            raise ValueError(f"{path}: SFT data must be JSON Lines (.jsonl) of conversations")
        for where, row in read_jsonl(path):
            n_rows_read += 1
            try:
                messages = row_messages(row)
                chars = least_chars(messages) if max_chars else 0
                if max_chars and chars > max_chars:
                    if too_long == "error":
                        raise ValueError(f"conversation of at least {chars:,} characters cannot fit in seq_len + 1 = "
                                         f"{cap} tokens (no token spells more than {token_chars} characters); raise "
                                         f"data.seq_len or set data.too_long = \"skip\"")
                    skipped += 1
                    continue
                ids, tgt = render_sft(messages, tokenizer)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if len(ids) > cap:
                if too_long == "error":
                    raise ValueError(f"{where}: conversation of {len(ids)} tokens is longer than seq_len + 1 = {cap}; "
                                     f"raise data.seq_len or set data.too_long = \"skip\"")
                skipped += 1
                longest = max(longest, len(ids))
                continue
            convs.append((ids, tgt))
    if not convs:
        what = f"all {n_rows_read} conversations are longer than seq_len + 1 = {cap}" if n_rows_read else "no rows"
        raise ValueError(f"no SFT training data in {', '.join(map(str, paths))}: {what}")
    bins = pack([len(ids) for ids, _ in convs], cap)
    tokens = torch.full((len(bins), cap), tokenizer.eos_id, dtype=torch.int32)
    starts = torch.zeros(len(bins), cap, dtype=torch.bool)
    targets = torch.zeros(len(bins), cap, dtype=torch.bool)
    for r, items in enumerate(bins):
        pos = 0
        for i in sorted(items):  # file order within a row
            ids, tgt = convs[i]
            tokens[r, pos:pos + len(ids)] = torch.tensor(ids, dtype=torch.int32)
            targets[r, pos:pos + len(ids)] = torch.tensor(tgt)
            starts[r, pos] = True
            pos += len(ids)
        if pos < cap:
            starts[r, pos] = True  # the padding is a document of its own
    n_tok = sum(len(ids) for ids, _ in convs)
    stats = {"conversations": len(convs), "skipped_too_long": skipped, "longest_skipped": longest,
             "tokens": n_tok, "target_tokens": int(targets.sum()), "rows": len(bins),
             "padding_fraction": round(1 - n_tok / (len(bins) * cap), 4)}
    return Sequences(tokens, starts, targets, stats)
