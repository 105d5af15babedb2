"""Peak memory of load_checkpoint on a synthetic checkpoint (default: gpt2-xl shape, 6.2 GB in fp32).

    python -m benchmarks.load_memory [--preset gpt2-xl] [--dir DIR]

Writes random weights with save_checkpoint, then loads them in a fresh process and reports that process's
peak RSS (VmHWM) before and after loading, against the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

_CHILD = """
import re, sys, time
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
from gptjax import load_checkpoint
before = hwm(); t0 = time.perf_counter()
config, params = load_checkpoint(sys.argv[1])
print(before, hwm(), sum(v.nbytes for v in params.values()), time.perf_counter() - t0)
"""


def main(argv: list[str] | None = None) -> int:
    """Write, then load in a child process, and print the peak-RSS figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-xl")
    ap.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory, removed after)")
    args = ap.parse_args(argv)
    from gptjax import get_preset, init_params, save_checkpoint

    config = get_preset(args.preset)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        t0 = time.perf_counter()
        save_checkpoint(config, init_params(config), os.path.join(d, "ck"))
        size = os.path.getsize(os.path.join(d, "ck", "model.safetensors"))
        print(f"wrote {args.preset} checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
        out = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(d, "ck")], check=True,
                             capture_output=True, text=True).stdout
    before, peak, loaded, seconds = (float(x) for x in out.split())
    print(f"load: {seconds:.1f} s; peak RSS before {before / 1e9:.2f} GB, after {peak / 1e9:.2f} GB; "
          f"growth {(peak - before) / 1e9:.2f} GB = {(peak - before) / size:.3f}x the file "
          f"({loaded / 1e9:.2f} GB of float32 params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
