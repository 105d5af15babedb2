"""`gptjax bench`: one benchmark suite (prefill, decode, train step, precision variants) with ceilings measured
in the same run, MFU and bandwidth use, optional peers (llama.cpp, CTranslate2, ONNX Runtime, Hugging Face) on the
same weights round-robin with gptjax, JSON lines, a markdown table, plots and a run-to-run comparison; and focused
studies (`--study NAME`) on the same harness. The one timing harness of gptjax; its clock, warm-up, interleaved
runs and statistics are gptjax.timing (below every layer, so that the library times through them too).
Submodules: env (environment), results (a run's results directory), ceilings (measured and datasheet peaks),
metrics (FLOPs/bytes/MFU arithmetic), workloads (gptjax side), peers (the other engines: hf in-process; llama.cpp,
ct2 and ort each in its own process; peer is the HF peer's former name), report (JSONL schema, tables,
--compare), plots, suite (the plan and the runner), studies (one module per study), device_check; stats is
gptjax.timing's former name (one release)."""
