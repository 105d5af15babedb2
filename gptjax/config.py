"""GPTConfig, the presets, and the size calculator: parameters, FLOPs and bytes of a GPT-2 shape.

Letter legend used throughout gptjax: B batch, T time, D model width (n_embd), H heads, K head dim (D/H),
F MLP width (4D unless n_inner says otherwise), V vocab, L layers, P positions (context), S cache length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gptjax import precision as registry
from gptjax.errors import GptjaxError, read_json


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model; validated at construction, immutable afterwards."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        if self.n_inner is not None:
            _check_positive_int("n_inner", self.n_inner)
        if self.n_embd % self.n_head:
            raise GptjaxError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(head dim = n_embd / n_head); try n_head in {_divisors(self.n_embd)}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise GptjaxError(f"layer_norm_epsilon={eps!r} must be a float in (0, 1)")
        if not isinstance(self.tie_word_embeddings, bool):
            raise GptjaxError(f"tie_word_embeddings={self.tie_word_embeddings!r} must be true or false")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """K = D / H."""
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """F: the MLP hidden width (4D for GPT-2)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed (validated); unknown field names are an error."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise GptjaxError(f"unknown config field(s) {unknown}; fields are {field_names()}")
        return dataclasses.replace(self, **changes)

    # ---- the size calculator --------------------------------------------------------------------
    def num_params(self) -> int:
        """Exact parameter count (a tied head counted once), as GPT-2 counts it."""
        return self.embedding_params() + self.n_layer * self.layer_params() + 2 * self.n_embd

    def embedding_params(self) -> int:
        """wte + wpe (+ an untied lm_head)."""
        V, P, D = self.vocab_size, self.n_positions, self.n_embd
        return V * D + P * D + (0 if self.tie_word_embeddings else V * D)

    def layer_params(self) -> int:
        """Parameters of one transformer block: two LayerNorms, attention and MLP with biases."""
        D, F = self.n_embd, self.mlp_width
        return 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)

    def matmul_params(self, include_head: bool = True) -> int:
        """Weights that take part in a matmul per token: the block kernels (+ the [D, V] head)."""
        D, F = self.n_embd, self.mlp_width
        per_layer = D * 3 * D + D * D + D * F + F * D
        return self.n_layer * per_layer + (self.vocab_size * D if include_head else 0)

    def forward_flops(self, batch: int, seq_len: int, *, last_only: bool = False) -> int:
        """Exact FLOPs (2 per multiply-add) of one forward pass over [batch, seq_len] tokens.

        matmuls: 2·N_mm per token (N_mm = L·(4D² + 2DF) block kernels) plus 2·D·V for each position whose
        logits are computed; causal attention counted explicitly: position t (1-based) reads t keys, QKᵀ and
        AV cost 4·D·t per layer, so a sequence costs 2·L·D·T·(T+1). LayerNorm, GELU, softmax are ignored.
        """
        _check_positive_int("batch", batch)
        _check_positive_int("seq_len", seq_len)
        D, L, T = self.n_embd, self.n_layer, seq_len
        body = 2 * self.matmul_params(include_head=False) * T
        head = 2 * D * self.vocab_size * (1 if last_only else T)
        attention = 2 * L * D * T * (T + 1)
        return batch * (body + head + attention)

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token averaged over a causal sequence of seq_len: 2·N_mm + 2·D·V + 2·L·D·(T+1)."""
        T = self.n_positions if seq_len is None else seq_len
        return self.forward_flops(1, T) / T

    def train_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token = 3 × forward (backward costs twice the forward).

        This is 6·N + 6·L·D·(T+1): PaLM's 6N + 12·L·H·K·T with the causal mask halving the attention term.
        """
        return 3 * self.forward_flops_per_token(seq_len)

    def weight_bytes(self, precision: str = "fp32") -> int:
        """Bytes of the weights in a storage or run mode (gptjax.precision): fp32 4/param, bf16 2/param, int8
        = int8 matmul weights (incl. wte) + one float32 scale per output channel, the rest float32."""
        return registry.weight_bytes(self, precision)

    def kv_cache_bytes_per_token(self, precision: str = "fp32") -> int:
        """K and V of one token in every layer: 2·L·D values (+ a float32 scale per head for int8)."""
        return registry.kv_cache_bytes_per_token(self, precision)

    # ---- (de)serialisation in the Hugging Face GPT2Config layout --------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers' GPT2LMHeadModel reads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function="gelu_new",
                 n_ctx=self.n_positions, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> GPTConfig:
        """Read a transformers GPT2Config dict; refuse variants gptjax does not compute."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise GptjaxError(f"{source}: model_type={d['model_type']!r}; only 'gpt2' is supported")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GptjaxError(f"{source}: activation_function={act!r}; only tanh GELU "
                              "('gelu_new' or 'gelu_pytorch_tanh') is supported")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if d.get(key, want) != want:
                raise GptjaxError(f"{source}: {key}={d[key]!r} is not supported (GPT-2 uses {want})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str) -> GPTConfig:
        """Load a config.json (transformers layout)."""
        d = read_json(path)  # a key given twice is refused, not resolved silently (the last would win)
        if not isinstance(d, dict):
            raise GptjaxError(f"{path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=str(path))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GptjaxError(f"{name}={value!r} must be a positive integer (>= 1)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # byte-level models (256 symbols) that train in minutes on a 2-core CPU
    "byte-small": GPTConfig(vocab_size=256, n_positions=256, n_layer=6, n_head=6, n_embd=384),
    "byte-mini": GPTConfig(vocab_size=256, n_positions=128, n_layer=4, n_head=4, n_embd=256),
    # the smallest sensible shape, for tests
    "tiny": GPTConfig(vocab_size=256, n_positions=64, n_layer=2, n_head=2, n_embd=32),
}


def get_preset(name: str) -> GPTConfig:
    """The preset config of that name; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise GptjaxError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}") from None


def field_names() -> list[str]:
    """Names of GPTConfig's fields, in order."""
    return [f.name for f in dataclasses.fields(GPTConfig)]
