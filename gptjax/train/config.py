"""The training settings: TrainConfig (optimisation and run settings, checked when built) and the `key=value`
overrides `gptjax train` and `gptjax distill` take for the model or the training settings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gptjax import precision as registry
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings; validated at construction (names match `key=value` overrides)."""

    batch_size: int = 32  # windows per micro-batch, across all processes
    seq_len: int | None = None  # window length T; None: the model's context
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # the learning rate after warm-up
    min_lr: float = 3e-4  # where the cosine decay ends
    warmup_steps: int = 30  # linear warm-up from 0
    max_steps: int = 300  # optimizer steps: the schedule's length
    weight_decay: float = 0.1  # AdamW's, on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient-norm limit (0: none)
    dropout: float = 0.0
    compute_dtype: str = "fp32"  # what forward and backward compute in (a training mode of gptjax.precision)
    eval_every: int = 100  # steps between evaluations
    eval_batches: int = 8  # batches per evaluation
    checkpoint_every: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2  # how many of the newest stay
    log_every: int = 10  # steps between training logs
    seed: int = 0  # of the initialisation, the batches and dropout
    val_fraction: float = 0.05  # of the documents, held out for validation
    tokenizer: str = "byte"  # "byte", "bpe:N" (trained on the training split) or a directory of tokenizer files
    scan_layers: bool = False  # True: lax.scan over stacked layers (flat compile time; 14% slower here)

    def __post_init__(self) -> None:
        for names, ok, rule in _RULES:
            for name in names:
                _require(name, getattr(self, name), ok, rule)
        modes = registry.training_modes()
        _require("compute_dtype", self.compute_dtype, lambda v: v in modes, " or ".join(map(repr, modes)))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (fields, the check each value passes, the rule the error states); booleans never pass a number's check
_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
      "log_every"), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    (("seq_len",), lambda v: v is None or (isinstance(v, int) and v >= 1),
     "an integer >= 1 (or unset: the model's context)"),
    (("warmup_steps", "seed"), lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    (("lr", "min_lr", "weight_decay", "grad_clip"), lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    (("beta1", "beta2", "dropout"), lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    (("val_fraction",), lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
)


def _require(name: str, value: Any, ok: Callable[[Any], bool], rule: str) -> None:
    if isinstance(value, bool) or not ok(value):
        raise GptjaxError(f"{name}={value!r} must be {rule}")


def config_from_overrides(config: GPTConfig, tc: TrainConfig, overrides: list[str]
                          ) -> tuple[GPTConfig, TrainConfig]:
    """Apply `key=value` overrides to the model or training config, parsing each value as its field's type."""
    model_fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_changes, train_changes = {}, {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GptjaxError(f"override {item!r} must look like key=value")
        if key in model_fields:
            model_changes[key] = _parse(key, raw, model_fields[key].type)
        elif key in train_fields:
            train_changes[key] = _parse(key, raw, train_fields[key].type)
        else:
            raise GptjaxError(f"unknown override key {key!r}; model keys: {sorted(model_fields)}; "
                              f"training keys: {sorted(train_fields)}")
    return config.replace(**model_changes), dataclasses.replace(tc, **train_changes)


def _parse(key: str, raw: str, annotation: Any) -> Any:
    """raw as the field's annotated type (bool, int, float or str; 'none' for an optional field)."""
    kinds = str(annotation)
    if raw.lower() in ("none", "null") and "None" in kinds:
        return None
    for kind, parse in (("bool", _parse_bool), ("int", int), ("float", float), ("str", str)):
        if kinds.startswith(kind):
            try:
                return parse(raw)
            except ValueError:
                raise GptjaxError(f"override {key}={raw!r}: expected {kind}") from None
    return raw


def _parse_bool(raw: str) -> bool:
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ValueError(raw)
