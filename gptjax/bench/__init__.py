"""`gptjax bench`: one benchmark suite (prefill, decode, train step, precision variants) with ceilings measured
in the same run, MFU and bandwidth use, an optional Hugging Face peer interleaved A B A B, JSON lines, a markdown
table, plots and a run-to-run comparison; and focused studies (`--study NAME`) on the same harness. The one
timing harness of gptjax. Submodules: stats (the clock, warm-up and interleaved runs, statistics), env
(environment), results (a run's results directory), ceilings (measured and datasheet peaks), metrics
(FLOPs/bytes/MFU arithmetic), workloads (gptjax side), peer (HF side), report (JSONL schema, tables, --compare),
plots, suite (the plan and the runner), studies (one module per study), device_check."""
