"""Builds the optional CPU kernels (gptjax/_kernels/cpu_matmul.cc: int8 / bfloat16 matmuls for XLA:CPU through the
XLA FFI). Without a C++ compiler, or on a CPU family the code does not target, the build skips them with a
warning and gptjax runs its pure-XLA formulations instead (gptjax.backends.cpu_kernels.status() says which)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gptjax._cpu_kernels",
            sources=["gptjax/_kernels/cpu_matmul.cc"],
            include_dirs=["gptjax/_kernels/include"],  # the XLA FFI headers of jaxlib 0.10.2 (Apache-2.0)
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            language="c++",
            optional=True,
        )
    ]
)
