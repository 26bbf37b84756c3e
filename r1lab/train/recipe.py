"""Recipes: every setting of a training run, read from a TOML file, overridable from the command line.

A recipe is ten TOML tables (`[run]`, `[model]`, `[data]`, `[optim]`, `[train]`, `[moe]`, `[parallel]`, `[lora]`,
`[ckpt]`, `[log]`);
every key below can be given in the file or on the command line as `--table.key value` (`--optim.lr 3e-4`,
`--train.batch-size 8`; snake_case works too). Precedence: built-in default < recipe file < command line.
Paths (data.train, data.tokenizer, model.init) in a recipe file are relative to the file; on the command line,
and run.out everywhere, relative to the working directory.
`--help` of `r1lab pretrain` / `r1lab sft` lists every key with its default.
A key that is a Python keyword (`grpo.async`) is a field with a trailing underscore (`GRPO.async_`); `key_name`
maps one to the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..lora import expand_targets

KINDS = ("pretrain", "sft")


def key_name(field_name: str) -> str:
    """The recipe key of a table's field: its name, less the trailing underscore of a keyword (`async_`)."""
    return field_name.removesuffix("_")


def _key(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Run:
    out: str = _key("runs/run", "run folder: checkpoints/, metrics.jsonl, recipe.toml, final/ (the exported model)")
    seed: int = _key(0, "seed of the initialisation, the data order and every other random choice")
    device: str = _key("auto", "cpu, cuda or cuda:N; auto = cuda when available")
    dtype: str = _key("auto", "dtype of the weights the matmuls read; master weights and optimizer state are always "
                      "float32; auto = bfloat16 on CUDA, float32 on CPU", ("auto", "float32", "bfloat16"))


@dataclass
class Model:
    preset: str = _key("tiny", "named configuration to initialise randomly (r1lab info lists them)")
    init: str = _key("", "HF-layout folder of weights to start from (fine-tuning); overrides preset")
    config: dict = _key({}, "ModelConfig fields that replace the preset's, e.g. {vocab_size = 512} "
                        "(on the command line, or in the file when a field is null, a JSON object: "
                        "'{\"q_lora_rank\": null}'; it replaces the whole table)")


@dataclass
class Data:
    train: list = _key([], "training files: .txt (plain text) or .jsonl; several as a TOML list or comma-separated")
    seq_len: int = _key(256, "tokens per training sequence (positions; the model sees seq_len inputs)")
    attention: str = _key("document", "document: packed documents / conversations neither attend to each other "
                          "nor share positions (block-diagonal causal mask); causal: plain causal attention over "
                          "the packed row (faster kernels), loss still never crosses a boundary",
                          ("document", "causal"))
    text_separator: str = _key("", "pretraining .txt files: split into documents at this string (e.g. \"\\n\\n\"); "
                               "empty = one document per file")
    too_long: str = _key("skip", "SFT: a conversation longer than seq_len + 1 tokens is skipped (and counted) "
                         "or an error", ("skip", "error"))
    shuffle: bool = _key(True, "shuffle the sequences every epoch (seeded by run.seed)")
    tokenizer: str = _key("", "tokenizer folder; empty = model.init's if it has one, else the DeepSeek-V3/R1 one")


@dataclass
class Optim:
    lr: float = _key(3e-4, "peak learning rate of AdamW")
    min_lr_ratio: float = _key(0.1, "cosine schedule: final learning rate as a fraction of lr")
    schedule: str = _key("cosine", "learning-rate schedule after warmup", ("cosine", "constant"))
    warmup_steps: int = _key(10, "optimizer steps of linear warmup from lr/warmup_steps to lr")
    weight_decay: float = _key(0.1, "AdamW decoupled weight decay on matrices (not on norms or biases)")
    beta1: float = _key(0.9, "AdamW beta1")
    beta2: float = _key(0.95, "AdamW beta2")
    eps: float = _key(1e-8, "AdamW epsilon")
    grad_clip: float = _key(1.0, "clip the global gradient norm to this value; 0 disables clipping")


@dataclass
class Train:
    steps: int = _key(100, "optimizer steps of the run")
    batch_size: int = _key(8, "sequences per micro-batch (under torchrun: over all ranks, each taking an equal share)")
    grad_accum: int = _key(1, "micro-batches per optimizer step (tokens per step = batch_size x grad_accum x "
                           "seq_len)")
    activation_checkpointing: bool = _key(False, "recompute each block's activations in the backward pass "
                                          "(less memory, ~1/3 more compute)")
    compile: bool = _key(False, "torch.compile each decoder block (regional: one graph for all blocks of a kind; "
                         "GPU; the first step compiles)")
    head_chunk: int = _key(2048, "tokens per chunk of the output head and its fp32 loss / log-probs, so the fp32 "
                           "(tokens x vocab) logits are never held whole (2048 x V3's 129,280 vocabulary: 1.06 GB); "
                           "0 = all tokens at once")
    on_nonfinite: str = _key("stop", "a NaN/inf loss or gradient norm: stop (keeping the last good checkpoint) "
                             "or skip the step (no update)", ("stop", "skip"))


@dataclass
class MoE:
    bias_gamma: float = _key(1e-3, "auxiliary-loss-free balancing: router bias update speed per optimizer step "
                             "(V3 paper: 0.001); 0 disables")
    balance_alpha: float = _key(0.0, "weight of the sequence-wise balance loss (V3 paper: 0.0001); 0 disables")
    mtp_weight: float = _key(0.3, "weight lambda of the multi-token-prediction loss (V3 paper: 0.3, later 0.1); "
                             "0 disables; needs a model with an MTP module")


@dataclass
class Parallel:
    ep: int = _key(1, "under torchrun: expert-parallel size, the routed experts of each MoE layer split over groups "
                   "of this many ranks that exchange tokens by all-to-all (must divide the number of ranks and of "
                   "routed experts); 1 = FSDP shards the experts with everything else; ignored on one process")
    reshard_after_forward: bool = _key(True, "under torchrun: FSDP frees each block's gathered weights after its "
                                       "forward and gathers them again for the backward (least memory); false "
                                       "keeps them until the backward (one all-gather less per block)")


@dataclass
class LoRA:
    rank: int = _key(0, "rank of low-rank adapters (r1lab.lora) trained on a frozen base, which keeps no fp32 master "
                     "copy or optimizer state; 0 = train every weight")
    alpha: float = _key(16.0, "adapter scaling numerator: the update is alpha / rank x B A")
    dropout: float = _key(0.0, "dropout on the adapters' input (linear targets; not routed experts)")
    targets: list = _key(["attention", "mlp", "shared"], "what gets adapters: q_a, q_b, q, kv_a, kv_b, o (attention "
                         "= all of them), mlp (dense layers), shared (shared experts), experts (routed experts), all")
    merge: bool = _key(False, "at the end also export base + adapters merged, as an HF-layout folder run.out/final "
                       "(the adapters alone always go to run.out/adapter, in PEFT's format)")


@dataclass
class Ckpt:
    every: int = _key(50, "write a checkpoint every this many optimizer steps (and always at the end); 0 = only "
                      "at the end")
    keep: int = _key(2, "checkpoints to keep (the oldest are deleted)")
    export: bool = _key(True, "at the end also write the model as an HF-layout folder run.out/final")


@dataclass
class Log:
    every: int = _key(10, "print a line every this many steps (metrics.jsonl gets every step)")
    tensorboard: bool = _key(True, "also log to run.out/tensorboard when TensorBoard is installed")
    peak_tflops: float = _key(0.0, "accelerator peak dense bf16 TFLOP/s for MFU; 0 = known GPUs (H100/H200 989, "
                              "A100 312), else no MFU")


PATH_KEYS = ("data.train", "data.tokenizer", "model.init")  # resolved against the recipe file's folder


def _resolve(p: str, base: Path) -> str:
    return str(base / p) if p and not Path(p).is_absolute() else p


SECTIONS = {"run": Run, "model": Model, "data": Data, "optim": Optim, "train": Train, "moe": MoE,
            "parallel": Parallel, "lora": LoRA, "ckpt": Ckpt, "log": Log}

# Defaults that differ between the two trainers.
KIND_DEFAULTS = {
    "pretrain": {("run", "out"): "runs/pretrain"},
    "sft": {("run", "out"): "runs/sft", ("moe", "mtp_weight"): 0.0, ("optim", "lr"): 2e-5,
            ("optim", "weight_decay"): 0.0, ("data", "seq_len"): 1024},
}


@dataclass
class Recipe:
    # Tables a recipe has; a trainer with its own table (GRPO) subclasses and extends this.
    sections: ClassVar[dict[str, type]] = SECTIONS
    # Per-trainer defaults that differ from the tables' own, {kind: {(table, key): value}}.
    kind_defaults: ClassVar[dict[str, dict]] = KIND_DEFAULTS
    default_kind: ClassVar[str | None] = None

    run: Run = field(default_factory=Run)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    moe: MoE = field(default_factory=MoE)
    parallel: Parallel = field(default_factory=Parallel)
    lora: LoRA = field(default_factory=LoRA)
    ckpt: Ckpt = field(default_factory=Ckpt)
    log: Log = field(default_factory=Log)

    @classmethod
    def defaults(cls, kind: str | None = None) -> "Recipe":
        r = cls()
        for (sec, key), value in cls.kind_defaults[kind or cls.default_kind].items():
            setattr(getattr(r, sec), key, value)
        return r

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {sec: {key_name(k): v for k, v in table.items()} for sec, table in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, kind: str, where: str = "recipe") -> "Recipe":
        r = cls.defaults(kind)
        r.update(d, where)
        return r

    def update(self, d: dict, where: str = "recipe", base: Path | None = None) -> None:
        """Set keys from a nested dict {table: {key: value}}; `where` names the source in errors. Relative data
        paths are resolved against `base` when given."""
        for sec, table in d.items():
            if sec not in self.sections:
                raise ValueError(f"{where}: unknown table [{sec}]; tables are {', '.join(self.sections)}")
            if not isinstance(table, dict):
                raise ValueError(f"{where}: [{sec}] must be a table of keys, got {table!r}")
            for key, value in table.items():
                self.set(f"{sec}.{key}", value, where, base)

    def set(self, dotted: str, value: Any, where: str = "recipe", base: Path | None = None) -> None:
        sec, _, key = dotted.partition(".")
        obj = getattr(self, sec, None) if sec in self.sections else None
        names = {key_name(f.name): f for f in dataclasses.fields(self.sections[sec])} if obj is not None else {}
        if key not in names:
            known = ", ".join(names) if names else ", ".join(self.sections)
            raise ValueError(f"{where}: unknown key {dotted!r}; known: {known}")
        f = names[key]
        value = _coerce(value, type(f.default) if f.default is not dataclasses.MISSING else type(f.default_factory()),
                        f"{where}: {dotted}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{where}: {dotted} must be one of {', '.join(choices)} (got {value!r})")
        if dotted in PATH_KEYS and base is not None:
            value = [_resolve(p, base) for p in value] if isinstance(value, list) else _resolve(value, base)
        setattr(obj, f.name, value)

    def validate(self) -> None:
        """Range checks that need more than one key or a number's sign."""
        positive = ["data.seq_len", "train.steps", "train.batch_size", "train.grad_accum", "parallel.ep", "ckpt.keep"]
        nonneg = ["optim.lr", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "moe.bias_gamma",
                  "moe.balance_alpha", "moe.mtp_weight", "ckpt.every", "log.every", "log.peak_tflops",
                  "train.head_chunk"]
        for k in positive + nonneg:
            v = getattr(getattr(self, k.split(".")[0]), k.split(".")[1])
            if v < 0 or (k in positive and v == 0) or (isinstance(v, float) and not math.isfinite(v)):
                raise ValueError(f"recipe: {k} must be {'> 0' if k in positive else '>= 0'} (got {v!r})")
        if self.lora.rank < 0 or self.lora.alpha <= 0 or not 0 <= self.lora.dropout < 1:
            raise ValueError(f"recipe: lora.rank must be >= 0, lora.alpha > 0 and lora.dropout in [0, 1) (got rank "
                             f"{self.lora.rank}, alpha {self.lora.alpha}, dropout {self.lora.dropout})")
        if self.lora.rank:
            expand_targets(self.lora.targets)  # unknown names fail now, not after the model is built
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ValueError(f"recipe: optim.min_lr_ratio must be in [0, 1] (got {self.optim.min_lr_ratio})")
        if self.model.init and self.model.config:
            raise ValueError("recipe: model.config changes a preset's architecture; it cannot apply to the loaded "
                             f"weights of model.init={self.model.init!r}")

    def to_toml(self) -> str:
        """The recipe as TOML that `load_recipe` reads back (every key, resolved)."""
        lines = []
        for sec, table in self.to_dict().items():
            lines.append(f"[{sec}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            lines.append("")
        return "\n".join(lines)


def _coerce(value: Any, want: type, where: str) -> Any:
    """Check (and, from command-line strings, convert) a value to the key's type."""
    if isinstance(value, str) and want is not str:  # command-line text
        text = value
        try:
            if want is bool:
                low = text.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if want is int:
                return int(text)
            if want is float:
                return float(text)
            if want is list:
                return [p.strip() for p in text.split(",") if p.strip()]
            if want is dict:
                value = json.loads(text)
        except (ValueError, json.JSONDecodeError):
            raise ValueError(f"{where}: cannot read {text!r} as {want.__name__}") from None
    if want is list and isinstance(value, str):
        value = [value]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {want.__name__}, got {value!r}")
    if want is list and not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of strings, got {value!r}")
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if _holds_none(v):  # TOML has no null: the table goes as a JSON string, which the loader parses back
            return json.dumps(json.dumps(v))
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _holds_none(v: Any) -> bool:
    if isinstance(v, dict):
        return any(_holds_none(x) for x in v.values())
    if isinstance(v, list):
        return any(_holds_none(x) for x in v)
    return v is None


def load_recipe(path: str | Path | None, kind: str, overrides: dict[str, Any] | None = None,
                recipe_cls: type[Recipe] = Recipe) -> Recipe:
    """Defaults for `kind`, then the TOML file (if any), then `overrides` {"optim.lr": "3e-4", ...}.
    recipe_cls: a Recipe subclass with more tables (GRPO's, the reward model's)."""
    r = recipe_cls.defaults(kind)
    if path is not None:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"recipe {str(path)!r} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        r.update(d, str(path), base=path.resolve().parent)
    for k, v in (overrides or {}).items():
        r.set(k, v, "command line", base=Path.cwd())
    r.validate()
    return r


# ---------------------------------------------------------------------- command line
def add_recipe_arguments(p: argparse.ArgumentParser, kind: str, recipe_cls: type[Recipe] = Recipe) -> None:
    """One `--table.key` option per recipe key (kebab-case; the snake_case spelling is accepted too), documented
    with its default for `kind`. Unset options stay absent from the namespace (argparse.SUPPRESS)."""
    defaults = recipe_cls.defaults(kind)
    for sec, cls in recipe_cls.sections.items():
        g = p.add_argument_group(f"[{sec}]")
        for f in dataclasses.fields(cls):
            dflt = getattr(getattr(defaults, sec), f.name)
            shown = _toml_value(dflt) if not isinstance(dflt, str) else repr(dflt)
            choices = f.metadata.get("choices")
            help_text = f.metadata["help"] + (f" ({' | '.join(choices)})" if choices else "") + f" (default: {shown})"
            metavar = {bool: "BOOL", int: "N", float: "X", list: "LIST", dict: "JSON"}.get(type(dflt), "TEXT")
            key = key_name(f.name)
            dest = f"recipe:{sec}.{key}"
            g.add_argument(f"--{sec}.{key.replace('_', '-')}", dest=dest, default=argparse.SUPPRESS,
                           metavar=metavar, help=help_text.replace("%", "%%"))
            if "_" in key:
                g.add_argument(f"--{sec}.{key}", dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    return {k.removeprefix("recipe:"): v for k, v in vars(args).items() if k.startswith("recipe:")}
