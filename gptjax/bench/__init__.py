"""`gptjax bench`: one benchmark suite (prefill, decode, train step, precision variants) with ceilings measured
in the same run, MFU and bandwidth use, an optional Hugging Face peer interleaved A B A B, JSON lines, a markdown
table, plots and a run-to-run comparison. Submodules: stats (timing statistics), env (environment), ceilings
(measured and datasheet peaks), metrics (FLOPs/bytes/MFU arithmetic), workloads (gptjax side), peer (HF side),
report (JSONL schema, tables, --compare), plots, suite (the plan and the runner), device_check."""
