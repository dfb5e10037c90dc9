"""Builds the fused CPU kernels (csrc/) as a plain shared library loaded through ctypes.

csrc/ uses no torch headers, so the build needs no torch and pip's build isolation cannot pull a
second (CUDA) torch. Set LOMIX_MARCH (default "native") to choose the -march flag, e.g. "x86-64-v2"
for a wheel that moves between machines.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildPlainLibrary(build_ext):
    """Compile with -O3, -march, OpenMP; fall back to a portable -march if the compiler refuses."""

    def build_extension(self, ext):
        march = os.environ.get("LOMIX_MARCH", "native")
        base = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall"]
        ext.extra_link_args = ["-fopenmp"]
        try:
            ext.extra_compile_args = base + [f"-march={march}"]
            super().build_extension(ext)
        except Exception:  # an old compiler or an unknown -march value
            ext.extra_compile_args = base
            super().build_extension(ext)

    def get_export_symbols(self, ext):
        return []  # a ctypes library: no PyInit_ symbol


setup(
    ext_modules=[Extension("lomix_kernels._lomix_cpu", sources=["csrc/lomix_cpu.cpp"], language="c++")],
    cmdclass={"build_ext": BuildPlainLibrary},
)
