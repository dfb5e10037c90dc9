"""Builds the fused CPU kernels (csrc/) as plain shared libraries loaded through ctypes, one per
instruction-set variant; lomix_kernels/cpu.py asks a tiny baseline probe (csrc/cpu_level.cpp) for
this CPU's x86-64 level and loads the best variant it runs.

csrc/ uses no torch headers, so the build needs no torch and pip's build isolation cannot pull a
second (CUDA) torch. Variants on x86-64: avx512 (-march=x86-64-v4) and avx2 (x86-64-v3); elsewhere
one portable build. LOMIX_CPU_NATIVE=1 adds a -march=native variant (for this machine only; never
picked automatically — force it with LOMIX_CPU_ISA=native).

- No baseline (pre-AVX2) x86 variant: without fused multiply-adds the kernels miss SPEC §8's
  error budget on ill-conditioned awf gradients (measured 3.5e-5 .. 1e-3 against a budget of
  1.6e-5 .. 1.9e-4); on such CPUs the cpu backend says why and auto uses the reference.
- Each variant is its own library (not one library with several code paths) on purpose: the C++
  standard library's template code is emitted as weak symbols into every object file, and the
  linker would keep one copy, compiled for whichever ISA came first.
"""
import os
from pathlib import Path
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

X86 = platform.machine().lower() in ("x86_64", "amd64")
VARIANTS = {"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"]} if X86 else {"portable": []}
if os.environ.get("LOMIX_CPU_NATIVE") == "1":
    VARIANTS["native"] = ["-march=native"]
PROBE = ["-march=x86-64"] if X86 else []
# -fno-wrapv undoes the -fwrapv of Python's own CFLAGS (sysconfig), which setuptools puts first: with
# signed overflow defined to wrap, gcc keeps the int loop indices' wrap-around and the kernels ran ~3.5%
# slower (benchmarks/CPU_LOG.md).
BASE = ["-O3", "-std=c++17", "-fno-wrapv", "-fno-math-errno", "-fno-trapping-math", "-Wall"]


class BuildVariants(build_ext):
    """Compile each variant with its own flags into its own temp folder (same source file)."""

    def build_extension(self, ext):
        variant = ext.name.rsplit("_", 1)[-1]
        ext.extra_compile_args = BASE + (PROBE if variant == "probe" else VARIANTS[variant] + ["-fopenmp"])
        ext.extra_link_args = [] if variant == "probe" else ["-fopenmp"]
        temp = self.build_temp
        self.build_temp = os.path.join(temp, variant)  # objects of one variant never reused by another
        try:
            super().build_extension(ext)
        except Exception as exc:  # an old compiler without this -march: the other variants still build
            if variant in ("probe", "avx2", "portable"):
                raise
            self.warn(f"lomix_kernels: skipping the {variant} CPU variant ({exc})")
            self.skipped.append(self.get_ext_fullpath(ext.name))
        finally:
            self.build_temp = temp

    def initialize_options(self):
        super().initialize_options()
        self.skipped = []  # libraries of variants this compiler could not build

    def run(self):
        super().run()
        if self.inplace:  # (an editable install builds next to the sources, where older builds stay)
            self.remove_stale_variants()

    def remove_stale_variants(self):
        """Delete the kernel libraries in the package folder that this build does not provide (a variant
        built before, e.g. with LOMIX_CPU_NATIVE=1, or one skipped now): LOMIX_CPU_ISA would load them."""
        paths = [self.get_ext_fullpath(ext.name) for ext in self.extensions]
        keep = {os.path.basename(p) for p in paths if p not in self.skipped}
        for lib in Path(paths[0]).parent.glob("_lomix_cpu_*"):
            if lib.name not in keep:
                self.announce(f"lomix_kernels: removing the stale kernel library {lib.name}", level=2)
                lib.unlink()

    def get_export_symbols(self, ext):
        return []  # a ctypes library: no PyInit_ symbol


HEADERS = sorted(str(p) for p in Path("csrc").glob("*.h"))  # one translation unit: the .cpp includes them

setup(
    ext_modules=[Extension("lomix_kernels._lomix_cpu_probe", sources=["csrc/cpu_level.cpp"], language="c++")]
    + [Extension(f"lomix_kernels._lomix_cpu_{v}", sources=["csrc/lomix_cpu.cpp"], depends=HEADERS, language="c++")
       for v in VARIANTS],
    cmdclass={"build_ext": BuildVariants},
)
