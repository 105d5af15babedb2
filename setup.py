"""Builds the optional CPU kernels (gptjax/_kernels/cpu_matmul.cc: int8 / bfloat16 matmuls, cpu_int4.cc: packed int4
matmuls, for XLA:CPU through the XLA FFI). Without a C++ compiler, or on a CPU family the code does not target, the
build skips them with a warning and gptjax runs its pure-XLA formulations instead
(gptjax.backends.cpu_kernels.status() says which).

The XLA FFI headers are the ones jaxlib ships (jax.ffi.include_dir()), from the jax that pip installs into the
build environment: pyproject.toml lists jax as a build requirement, pinned to the runtime's range as JAX's own FFI
examples do. Built at install rather than compiled on first use into a cache directory (issue 14, both measured
with jax 0.10.2 on 2 busy cores, pip's wheel cache warm): the build requirement makes a fresh `pip install .` take
67 s -> 104 s (pip 23.2.1, as `python3 -m venv` ships it: it byte-compiles the build environment; pip 26.3 adds
about 35 s), while a first-use compile (g++ -O3, 15 s) would land in the first import of every new environment,
inside a server's first request, a benchmark's first call or several test workers at once, and would need g++,
Python's headers and a writable, locked cache wherever gptjax runs, not only where it is installed. A wheel built
here runs its kernels on machines without a compiler.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError


class BuildWithFfiHeaders(build_ext):
    """build_ext that adds jaxlib's XLA FFI headers, importing jax only when it compiles (an import takes seconds,
    and pip runs setup.py three times)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import jax.ffi
        except ImportError as e:  # only without build isolation and without jax: skipped like a failed compile
            raise CompileError(f"the XLA FFI headers come from jax, which cannot be imported ({e})") from e
        ext.include_dirs.append(jax.ffi.include_dir())
        super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "gptjax._cpu_kernels",
            sources=["gptjax/_kernels/cpu_matmul.cc", "gptjax/_kernels/cpu_int4.cc", "gptjax/_kernels/gemm_bf16.cc",
                     "gptjax/_kernels/gemm_int8.cc", "gptjax/_kernels/attention.cc",
                     "gptjax/_kernels/adamw.cc", "gptjax/_kernels/rows_add.cc"],
            depends=["gptjax/_kernels/parallel_rows.h", "gptjax/_kernels/gemm_bf16.h", "gptjax/_kernels/gemm_int8.h",
                     "gptjax/_kernels/transpose16.h", "gptjax/_kernels/bf16.h"],
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            language="c++",
            optional=True,  # a failed build warns and leaves gptjax on XLA's formulations
        )
    ],
    cmdclass={"build_ext": BuildWithFfiHeaders},
)
