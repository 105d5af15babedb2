"""The ONNX Runtime peer (runs in its worker process): GPT-2 with a KV cache written as an ONNX graph (opset 20,
attention as ORT's fused MultiHeadAttention) straight from the checkpoint's arrays, so neither torch nor an
exporter is needed; ORT optimises the rest at load (ORT_ENABLE_ALL: its LayerNorm, GELU and bias fusions).
Variants: fp32, and int8 = ORT's dynamic quantisation (quantize_dynamic, int8 weights per tensor, activations
quantised per call: W8A8 dynamic).

The graph: inputs input_ids [B, T] int64, logits_from [1] int64 (the first position whose logits are returned: 0
for the check, T-1 for prefill and decode) and per layer past_k/past_v [B, H, S, K]; outputs logits
[B, T - logits_from, V] and present_k/present_v [B, H, S + T, K]. Positions start at S (the cache's length)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig
from gptjax.weights import load_checkpoint

OPSET = 20  # Gelu(approximate="tanh") is an opset-20 operator


def about() -> dict[str, Any]:
    """onnxruntime's version, its execution providers and the graph's opset."""
    import onnxruntime as ort  # the peers extra

    graph = "ONNX ops + com.microsoft MultiHeadAttention, ORT_ENABLE_ALL"
    return {"version": ort.__version__, "build": {"providers": providers(), "opset": OPSET, "graph": graph}}


def load(checkpoint: str, variant: str, threads: int, workdir: str) -> Engine:
    """The graph written once per variant into WORKDIR, in a session with `threads` intra-op threads."""
    import onnxruntime as ort  # the peers extra

    config, path = export(checkpoint, variant, Path(workdir))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return Engine(ort.InferenceSession(str(path), options, providers=providers()), config)


def providers() -> list[str]:
    """CUDA first where this onnxruntime build has it (onnxruntime-gpu on a GPU: --device-check), then the CPU."""
    import onnxruntime as ort  # the peers extra

    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]


def export(checkpoint: str, variant: str, workdir: Path) -> tuple[GPTConfig, Path]:
    """(config, WORKDIR/ort-VARIANT.onnx), written if missing: the fp32 graph, or its dynamic int8 quantisation."""
    import onnx  # the peers extra

    config, params = load_checkpoint(checkpoint)
    fp32 = workdir / "ort-fp32.onnx"
    if not fp32.is_file():
        onnx.save(gpt2_graph(config, params), str(fp32))
    if variant == "fp32":
        return config, fp32
    out = workdir / f"ort-{variant}.onnx"
    if not out.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic  # the peers extra

        # the contrib attention op has no ONNX shape inference: its outputs are float32
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return config, out


def gpt2_graph(config: GPTConfig, params: dict[str, np.ndarray]) -> Any:
    """The ONNX model of GPT-2 with a KV cache holding params (see the module docstring for its signature)."""
    from onnx import TensorProto, helper  # the peers extra

    g = _Graph(params)
    H, K = config.n_head, config.head_dim
    x = g.op("Add", g.op("Gather", g.weight("wte.weight"), "input_ids"), g.op("Gather", g.weight("wpe.weight"),
                                                                                _positions(g)))  # [B, T, D]
    cache = [helper.make_tensor_value_info(f"{kind}_{i}", TensorProto.FLOAT, ["B", H, "S", K])
             for i in range(config.n_layer) for kind in ("past_k", "past_v")]
    presents = []
    for i in range(config.n_layer):
        x, present = _block(g, config, x, f"h.{i}.", i)
        presents += present
    h = g.op("Slice", g.norm(x, "ln_f", config), "logits_from", g.const([2**62]), g.const([1]))  # [B, T', D]
    logits = g.op("MatMul", h, g.weight("wte.weight", transpose=True), name="logits")  # [B, T', V]
    ints = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
            helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in [logits, *presents]]
    graph = helper.make_graph(g.nodes, "gpt2", ints + cache, outputs, initializer=g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _positions(g: _Graph) -> str:
    """S .. S+T-1 as [T] int64, S the past cache's length."""
    start = g.op("Gather", g.op("Shape", "past_k_0"), g.const(2))
    length = g.op("Gather", g.op("Shape", "input_ids"), g.const(1))
    return g.op("Range", start, g.op("Add", start, length), g.const(1))


def _block(g: _Graph, config: GPTConfig, x: str, h: str, i: int) -> tuple[str, list[str]]:
    """One pre-norm block; (x, [present_k, present_v]). Attention is ORT's fused MultiHeadAttention (causal with
    unidirectional=1, the cache appended inside), what ORT's GPT-2 optimiser fuses HF's exported graph into."""
    D = config.n_embd
    qkv = g.dense(g.norm(x, h + "ln_1", config), h + "attn.c_attn")  # [B, T, 3D]
    q, k, v = g.ops("Split", qkv, g.const([D, D, D]), outputs=3, axis=-1)  # [B, T, D] each
    present = [f"present_k_{i}", f"present_v_{i}"]
    a = g.ops("MultiHeadAttention", q, k, v, "", "", "", f"past_k_{i}", f"past_v_{i}",
              outputs=[g.fresh("attention"), *present], domain="com.microsoft", num_heads=config.n_head,
              unidirectional=1)[0]  # [B, T, D]; present [B, H, S+T, K]
    x = g.op("Add", x, g.dense(a, h + "attn.c_proj"))
    m = g.op("Gelu", g.dense(g.norm(x, h + "ln_2", config), h + "mlp.c_fc"), approximate="tanh")  # [B, T, F]
    return g.op("Add", x, g.dense(m, h + "mlp.c_proj")), present


class _Graph:
    """Nodes and initializers being collected, with fresh names."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.params, self.nodes, self.initializers, self.count = params, [], [], 0

    def fresh(self, stem: str) -> str:
        """A new tensor name."""
        self.count += 1
        return f"{stem}_{self.count}"

    def op(self, kind: str, *inputs: str, name: str | None = None, **attrs: Any) -> str:
        """One node with one output; its output's name."""
        return self.ops(kind, *inputs, outputs=[name or self.fresh(kind.lower())], **attrs)[0]

    def ops(self, kind: str, *inputs: str, outputs: int | list[str], **attrs: Any) -> list[str]:
        """One node with several outputs (a count, or their names); their names."""
        from onnx import helper  # the peers extra

        names = outputs if isinstance(outputs, list) else [self.fresh(kind.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(kind, list(inputs), names, **attrs))
        return names

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        return self._tensor(self.fresh("const"), np.asarray(value, dtype))

    def weight(self, key: str, transpose: bool = False) -> str:
        a = np.asarray(self.params[key], np.float32)
        return self._tensor(key + (".T" if transpose else ""), np.ascontiguousarray(a.T) if transpose else a)

    def _tensor(self, name: str, a: np.ndarray) -> str:
        from onnx import numpy_helper  # the peers extra

        self.initializers.append(numpy_helper.from_array(a, name))
        return name

    def norm(self, x: str, key: str, config: GPTConfig) -> str:
        return self.op("LayerNormalization", x, self.weight(key + ".weight"), self.weight(key + ".bias"),
                       axis=-1, epsilon=config.layer_norm_epsilon)

    def dense(self, x: str, key: str) -> str:
        """x @ W + b with HF's Conv1D kernel W [in, out]."""
        return self.op("Add", self.op("MatMul", x, self.weight(key + ".weight")), self.weight(key + ".bias"))


class Engine:
    """An ORT session of the graph behind the worker's engine interface; the cache goes out and back in."""

    def __init__(self, session: Any, config: GPTConfig) -> None:
        self.session, self.config = session, config

    def _run(self, ids: np.ndarray, cache: list[np.ndarray] | None, first: int) -> tuple[np.ndarray, list]:
        c = self.config
        if cache is None:
            cache = [np.zeros((len(ids), c.n_head, 0, c.head_dim), np.float32)] * (2 * c.n_layer)
        feeds = {"input_ids": ids.astype(np.int64), "logits_from": np.array([first], np.int64)}
        feeds |= {f"{kind}_{i}": cache[2 * i + j] for i in range(c.n_layer) for j, kind in
                  enumerate(("past_k", "past_v"))}
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """[T] -> [T, V]."""
        return self._run(tokens[None], None, 0)[0][0]

    def prefill(self, tokens: np.ndarray) -> None:
        """[B, T]: the last position's logits."""
        self._run(tokens, None, tokens.shape[1] - 1)

    def generate(self, prompts: np.ndarray, new: int) -> np.ndarray:
        """[B, P] -> [B, new] greedy tokens, one session call per token after the prompt's."""
        logits, cache = self._run(prompts, None, prompts.shape[1] - 1)
        out = [logits[:, -1].argmax(-1)]
        for _ in range(new - 1):
            logits, cache = self._run(out[-1][:, None], cache, 0)
            out.append(logits[:, -1].argmax(-1))
        return np.stack(out, axis=1)
