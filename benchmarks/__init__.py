"""gptjax benchmarks: each module runs as `python -m benchmarks.NAME`; they print and save numbers, never assert."""
