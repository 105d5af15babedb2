"""`gptjax bench`: one benchmark suite (prefill, decode, train step, precision variants) with ceilings measured
in the same run, MFU and bandwidth use, an optional Hugging Face peer interleaved A B A B, JSON lines, a markdown
table, plots and a run-to-run comparison; and focused studies (`--study NAME`) on the same harness. The one
timing harness of gptjax; its clock, warm-up, interleaved runs and statistics are gptjax.timing (below every
layer, so that the library times through them too). Submodules: env (environment), results (a run's results
directory), ceilings (measured and datasheet peaks), metrics (FLOPs/bytes/MFU arithmetic), workloads (gptjax
side), peer (HF side), report (JSONL schema, tables, --compare), plots, suite (the plan and the runner), studies
(one module per study), device_check; stats is gptjax.timing's former name (one release)."""
