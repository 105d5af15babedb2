"""`import gptjax` from a source tree whose CPU kernels were never built says so once, with the fix
(cpu_kernels.build_warning, called from gptjax/__init__.py), and says nothing where the kernels are built, switched
off, or of no use to the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_CPU = all(f in Path("/proc/cpuinfo").read_text() for f in ("avx512_vnni", "avx512_bf16")) if Path(
    "/proc/cpuinfo").exists() else False
# an editable install of another checkout would hand over its kernels; a fresh clone has none, so drop its finder
IMPORT = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
          "if not getattr(f, '__module__', type(f).__module__).startswith('__editable__')]; import gptjax; import gptjax")
NOT_BUILT = "whose CPU kernels are not built"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not KERNEL_CPU, reason="no AVX512 VNNI/BF16 here: the kernels could not run anyway")]


@pytest.fixture(scope="module")
def unbuilt_tree(tmp_path_factory) -> Path:
    """A copy of the package as a fresh clone has it: the sources, no compiled kernels."""
    tree = tmp_path_factory.mktemp("clone")
    shutil.copytree(ROOT / "gptjax", tree / "gptjax", ignore=shutil.ignore_patterns("__pycache__", "_cpu_kernels*.so"))
    return tree


def _import_stderr(tree: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPTJAX_CPU_KERNELS")} | env
    run = subprocess.run([sys.executable, "-c", IMPORT], check=False, cwd=tree, env=environ | {"PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stderr


def test_an_unbuilt_tree_warns_exactly_once_with_the_fix(unbuilt_tree):
    err = _import_stderr(unbuilt_tree)
    assert err.count(NOT_BUILT) == 1 and err.count("RuntimeWarning") == 1, err
    assert str(unbuilt_tree / "gptjax") in err and "pip install -e ." in err and "build_ext --inplace" in err
    assert "GPTJAX_CPU_KERNELS=0 silences this" in err


def test_switching_the_kernels_off_silences_it(unbuilt_tree):
    assert NOT_BUILT not in _import_stderr(unbuilt_tree, GPTJAX_CPU_KERNELS="0")


def test_a_built_tree_says_nothing():
    if not any((ROOT / "gptjax").glob("_cpu_kernels*.so")):
        pytest.skip("this checkout's kernels are not built")
    assert NOT_BUILT not in _import_stderr(ROOT)
