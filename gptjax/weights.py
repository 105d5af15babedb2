"""Canonical params (a dict of NumPy arrays with Hugging Face GPT-2 names and shapes), GPT-2 init, checkpoints.

A checkpoint is a directory with `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`), exactly as transformers' `save_pretrained` writes a GPT2LMHeadModel.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError, read_json
from gptjax.precision import STORAGES
from gptjax.quantize import SCALE_SUFFIX, Params, check_quantized, precision_of, stored_shape
from gptjax.safetensors_io import Header, iter_tensors, read_header, write_safetensors

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older transformers saved
PRECISION_KEY = "gptjax.precision"  # safetensors metadata of a reduced-precision checkpoint
_SCALED_VALUES = " / ".join(f"{s.name} {s.dtype}" for s in STORAGES.values() if s.scaled)  # "int8 int8 / int4 uint8"


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Canonical key → shape, in canonical order (Conv1D kernels are [in, out])."""
    V, P, D, F = config.vocab_size, config.n_positions, config.n_embd, config.mlp_width
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, D), "wpe.weight": (P, D)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes |= {
            h + "ln_1.weight": (D,), h + "ln_1.bias": (D,),
            h + "attn.c_attn.weight": (D, 3 * D), h + "attn.c_attn.bias": (3 * D,),
            h + "attn.c_proj.weight": (D, D), h + "attn.c_proj.bias": (D,),
            h + "ln_2.weight": (D,), h + "ln_2.bias": (D,),
            h + "mlp.c_fc.weight": (D, F), h + "mlp.c_fc.bias": (F,),
            h + "mlp.c_proj.weight": (F, D), h + "mlp.c_proj.bias": (D,),
        }
    shapes |= {"ln_f.weight": (D,), "ln_f.bias": (D,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def init_params(config: GPTConfig, seed: int = 0) -> Params:
    """GPT-2's initialisation: N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2L)), zero biases,
    unit LayerNorm gains. Drawn in canonical order from one NumPy PCG64 stream, so a seed means the same
    weights on every backend and machine."""
    rng = np.random.default_rng(seed)
    std = {"weight": np.float32(0.02), "residual": np.float32(0.02 / np.sqrt(2 * config.n_layer))}
    params: Params = {}
    for key, shape in param_shapes(config).items():
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            params[key] = np.ones(shape, np.float32)
        elif key.endswith(".bias"):
            params[key] = np.zeros(shape, np.float32)
        else:
            kind = "residual" if key.endswith("c_proj.weight") else "weight"
            params[key] = rng.standard_normal(shape, dtype=np.float32) * std[kind]
    return params


def validate_params(config: GPTConfig, params: Params) -> None:
    """Raise naming the first missing/unexpected key or wrong shape/dtype of params against config. Params are
    floating point, or quantised by gptjax.quantize (int8 matmul weights, each with a float32 `<key>_scale`)."""
    if not isinstance(params, dict):
        raise GptjaxError(f"params must be a dict of arrays (canonical GPT-2 names), got {type(params).__name__}")
    shapes = param_shapes(config)
    missing = [k for k in shapes if k not in params]
    unexpected = sorted(k for k in set(params) - set(shapes) if k.removesuffix(SCALE_SUFFIX) not in shapes)
    if missing or unexpected:
        raise GptjaxError(f"params do not match the config: missing keys {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}")
    for key, shape in shapes.items():
        dtype = np.asarray(params[key]).dtype
        shape = stored_shape(config, key, shape, dtype)  # packed int4: the contracted axis halves
        if tuple(np.shape(params[key])) != shape:
            raise GptjaxError(f"param {key!r} has shape {tuple(np.shape(params[key]))}, expected {shape}")
        if dtype.kind != "f" and dtype.name not in {s.dtype for s in STORAGES.values()}:
            raise GptjaxError(f"param {key!r} has dtype {dtype}; params must be floating point (or the values of a "
                              f"scaled storage, {_SCALED_VALUES}, for matmul weights with scales)")
    check_quantized(config, params, shapes)


# ---- loading ------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> tuple[GPTConfig, Params]:
    """Read a GPT-2 checkpoint directory (transformers layout, safetensors only) into (config, params).

    Params are float32, except in a checkpoint `gptjax quantize` wrote (its safetensors metadata records
    gptjax.precision): those load as stored, bfloat16 or scaled (int8, ...) weights with `<key>_scale` float32
    scales, and are never quantised again. Tensors are copied one by one out of a memory map, so peak memory stays near
    the checkpoint's size.
    """
    directory = _checkpoint_dir(Path(path))
    config = load_config(directory)
    headers = {file: read_header(str(file)) for file in _weight_files(directory)}  # each parsed once
    _check_size(directory, config, headers)
    shapes = param_shapes(config)
    precision = _precision(directory, next(iter(headers.values()))[1])
    params: Params = {}
    head = None
    for file, header in headers.items():
        convert = _as_stored if precision != "fp32" else (lambda k, a, file=file: _to_float32(file, k, a))
        for raw_key, array in iter_tensors(str(file), convert, header):
            key = _canonical_key(raw_key)
            if key is None:
                continue
            _check_finite(file, raw_key, array)
            if key == "lm_head.weight" and config.tie_word_embeddings:
                head = (file, array)
                continue
            if key in params:
                raise GptjaxError(f"{file}: tensor {raw_key!r} appears twice (as {key!r})")
            if key not in shapes and not (STORAGES[precision].scaled and key.removesuffix(SCALE_SUFFIX) in shapes):
                raise GptjaxError(f"{file}: unexpected tensor {raw_key!r} for a {config.n_layer}-layer GPT-2")
            if key in shapes and array.shape != (expected := stored_shape(config, key, shapes[key], array.dtype)):
                raise GptjaxError(f"{file}: tensor {raw_key!r} has shape {array.shape}, "
                                  f"expected {expected} from config.json")
            params[key] = array
    missing = [k for k in shapes if k not in params]
    if missing:
        raise GptjaxError(f"{directory}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if head is not None and not np.array_equal(head[1], params["wte.weight"]):
        raise GptjaxError(f"{head[0]}: lm_head.weight differs from wte.weight, but config.json ties them "
                          "(tie_word_embeddings=true)")
    if precision != "fp32":
        try:
            validate_params(config, params)
        except GptjaxError as e:
            raise GptjaxError(f"{directory} ({precision} checkpoint): {e}") from None
    return config, params


def _check_finite(file: Path, raw_key: str, array: np.ndarray) -> None:
    """Refuse a float tensor holding NaN or Inf: a backend would run it into garbage (token 0 forever) without
    a word. Integer tensors (int8 weights) are finite by construction; their float32 scales are checked here."""
    if array.dtype.kind in "iub":
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise GptjaxError(f"{file}: tensor {raw_key!r} has {bad} non-finite value(s) (NaN or Inf) of {array.size}")


def _check_size(directory: Path, config: GPTConfig, headers: dict[Path, Header]) -> None:
    """Refuse a config.json whose n_layer the files cannot match before param_shapes builds anything in
    proportion to it: the blocks the (capped) headers name bound it. A checkpoint short of a few tensors
    passes, to be named tensor by tensor."""
    layers = {key.split(".")[1] for entries, _, _ in headers.values() for name in entries
              if (key := name.removeprefix("transformer.")).startswith("h.")}
    if config.n_layer > len(layers):
        raise GptjaxError(f"{directory}: config.json has n_layer={config.n_layer}, but the weight files hold "
                          f"{len(layers)} transformer block(s)")


def stored_precision(path: str | os.PathLike) -> str:
    """The precision a checkpoint's weights are stored in: what `gptjax quantize` recorded in the safetensors
    metadata (a storage of gptjax.precision), else fp32 (a float checkpoint, loaded as float32 whatever its dtypes)."""
    directory = _checkpoint_dir(Path(path))
    return _precision(directory, read_header(str(_weight_files(directory)[0]))[1])


def _precision(directory: Path, metadata: dict[str, str]) -> str:
    recorded = metadata.get(PRECISION_KEY, "fp32")
    if recorded not in STORAGES:
        raise GptjaxError(f"{directory}: metadata {PRECISION_KEY}={recorded!r}; allowed: {', '.join(STORAGES)}")
    return recorded


def run_options(path: str | os.PathLike, precision: str | None = None, kv_cache: str | None = None
                ) -> dict[str, Any]:
    """Backend options for running a checkpoint: its stored precision unless `precision` says otherwise (no
    option at all for a float checkpoint run as stored, since plugin backends may lack it), and kv_cache."""
    chosen = precision or stored_precision(path)
    options: dict[str, Any] = {"precision": chosen} if chosen != "fp32" or precision else {}
    return options | ({"kv_cache": kv_cache} if kv_cache else {})


def _as_stored(key: str, a: np.ndarray) -> np.ndarray:
    return np.array(a)  # a copy in the stored dtype: the view dies with the memory map


def load_config(path: str | os.PathLike) -> GPTConfig:
    """Only the config of a checkpoint directory (no weights read)."""
    return GPTConfig.from_json_file(str(_checkpoint_dir(Path(path)) / CONFIG_NAME))


def _checkpoint_dir(path: Path) -> Path:
    if path.is_file() and path.suffix == ".safetensors" and path.name == WEIGHTS_NAME:
        path = path.parent
    if not path.exists():
        raise GptjaxError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        raise GptjaxError(f"checkpoint {str(path)!r} must be a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not (path / CONFIG_NAME).is_file():
        raise GptjaxError(f"checkpoint {str(path)!r} has no {CONFIG_NAME}")
    _check_inside(path, path / CONFIG_NAME)
    return path


def _check_inside(directory: Path, file: Path) -> None:
    """Refuse a file whose links lead out of the checkpoint directory (it could be any file the process can
    read). A Hugging Face hub cache snapshot (snapshots/<revision>/ linking to ../../blobs/) may link within
    its cached repository."""
    root = directory.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    target = file.resolve()
    if root not in target.parents:
        raise GptjaxError(f"{file} links outside the checkpoint directory (to {target}); copy the file in instead")


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX_NAME).is_file():
        _check_inside(directory, directory / INDEX_NAME)
        files = _index_files(directory / INDEX_NAME)
        for file in files:
            _check_inside(directory, file)
        return files
    if (directory / WEIGHTS_NAME).is_file():
        _check_inside(directory, directory / WEIGHTS_NAME)
        return [directory / WEIGHTS_NAME]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise GptjaxError(f"{directory} holds {pickles} but no {WEIGHTS_NAME}: gptjax reads safetensors only "
                          "and never unpickles; convert with transformers' save_pretrained(safe_serialization=True)")
    raise GptjaxError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = read_json(index)["weight_map"]  # a tensor mapped twice is refused, not resolved silently
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        detail = f": {e}" if isinstance(e, GptjaxError) else ""
        raise GptjaxError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'){detail}") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise GptjaxError(f"{index}: shard name {name!r} must be a plain *.safetensors file name")
        if not (index.parent / name).is_file():
            raise GptjaxError(f"{index}: shard {name!r} does not exist")
    return [index.parent / n for n in names]


def _canonical_key(raw: str) -> str | None:
    """Strip GPT2LMHeadModel's `transformer.` prefix; None for buffers that are not parameters."""
    key = raw.removeprefix("transformer.")
    return None if key.endswith(_BUFFERS) else key


def _to_float32(file: Path, key: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        if key.endswith(_BUFFERS):
            return a[:0]  # a mask buffer, about to be dropped: copy nothing
        raise GptjaxError(f"{file}: tensor {key!r} has dtype {a.dtype}; a float checkpoint was expected")
    return np.array(a, dtype=np.float32)  # always a copy: the view dies with the memory map


# ---- saving -------------------------------------------------------------------------------------
def save_checkpoint(config: GPTConfig, params: Params, path: str | os.PathLike,
                    metadata: dict[str, str] | None = None, extra_files_from: str | os.PathLike | None = None) -> Path:
    """Write config.json + model.safetensors atomically (temp dir + rename) in the layout transformers'
    GPT2LMHeadModel.save_pretrained writes, so from_pretrained loads it unchanged (float params). Reduced-
    precision params (gptjax.quantize) are written as stored, with their precision in the metadata (plus any
    `metadata` given). Other files already in the directory (tokenizer files, a README) are kept, and those
    of `extra_files_from` (another checkpoint) copied in the same swap; old weight files are replaced."""
    validate_params(config, params)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise GptjaxError(f"metadata {key!r}: {value!r}; safetensors metadata maps strings to strings")
        if key in ("format", PRECISION_KEY):
            raise GptjaxError(f"metadata {key!r} is written by save_checkpoint itself (from the params)")
    precision = precision_of(params)
    metadata = {"format": "pt", **(metadata or {})} | ({PRECISION_KEY: precision} if precision != "fp32" else {})
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tensors = {_hf_key(k): np.asarray(v) for k, v in params.items()}
        with open(tmp / WEIGHTS_NAME, "wb") as f:
            write_safetensors(f, tensors, metadata)
            _fsync(f)
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config.to_hf_dict(), f, indent=2)
            _fsync(f)
        _carry_over(target, tmp)
        if extra_files_from is not None:
            _carry_over(Path(extra_files_from), tmp, skip=(target, tmp.resolve()), weights_too=False)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a checkpoint is shared like any directory
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _hf_key(key: str) -> str:
    return key if key == "lm_head.weight" else "transformer." + key


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _carry_over(old: Path, new: Path, skip: tuple[Path, ...] = (), weights_too: bool = True) -> None:
    """Copy what an existing checkpoint directory holds besides its config and weights into the new one
    (without weights_too: only plain files that are not weights in any format, e.g. tokenizer files)."""
    if not old.is_dir():
        return
    for item in old.iterdir():
        if item.name in (CONFIG_NAME, INDEX_NAME) or item.suffix == ".safetensors" or (new / item.name).exists():
            continue
        if item.resolve() in skip:
            continue
        if not weights_too and (item.suffix in _PICKLE_SUFFIXES or not item.is_file() or item.name.startswith(".")):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, new / item.name, symlinks=True)
        else:
            shutil.copy2(item, new / item.name, follow_symlinks=False)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; at every instant a complete checkpoint exists at target or at its backup name,
    and a failed swap puts the old one back."""
    if target.exists() and not target.is_dir():
        raise GptjaxError(f"cannot save a checkpoint over {str(target)!r}: it is a file, not a directory")
    if not target.exists():
        os.replace(new, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, backup / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(backup / target.name, target)  # if this fails too, the backup stays where it is
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def checkpoint_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name → safetensors dtype code of a checkpoint, read from headers only (for `gptjax info`)."""
    directory = _checkpoint_dir(Path(path))
    return {k: e["dtype"] for f in _weight_files(directory) for k, e in read_header(str(f))[0].items()}
