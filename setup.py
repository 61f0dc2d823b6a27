"""Build script.

The layout keeps the Triton kernels in the top-level ``kernels/`` folder and the benchmark harness
in ``bench/``; both install inside the fastmodels namespace (``fastmodels.kernels`` and
``fastmodels.bench``) because a top-level ``kernels`` module would collide with an unrelated PyPI
package.

The C++ CPU kernels in ``csrc/cpu/*.cpp`` build into one pybind11 extension, ``fastmodels._C``
(OpenMP, -O3). They take raw pointers, so the build needs pybind11 and a C++ compiler but never
torch. A failed build does not fail the install: the ``cpu`` backends then report why they are
unavailable (``fastmodels.backends()``), and the reference backends still work. Set
FASTMODELS_REQUIRE_CPP=1 to make a failed build an error instead, FASTMODELS_BUILD_CPP=0 to skip it.
The hot loops are compiled for x86-64-v4, v3 and baseline and chosen at load time
(csrc/include/cpu_simd.h); FASTMODELS_CXXFLAGS adds compiler flags (e.g.
"-DFASTMODELS_CLONES=0 -march=native" for one build for this machine's CPU).

CUDA C++ sources (``csrc/cuda/*.cu``) are not built here: they are compiled with nvcc on first use
on a GPU machine and cached (see fastmodels/_cuda.py). A wheel therefore ships ``csrc/`` inside the
package, as ``fastmodels/csrc`` (MANIFEST.in puts it in the sdist).
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ext_modules = []
cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
except ImportError:  # e.g. --no-build-isolation on a machine without pybind11
    if cpu_sources and os.environ.get("FASTMODELS_REQUIRE_CPP") == "1":
        raise
    if cpu_sources:
        print("WARNING: pybind11 is not installed; the C++ extension is not built (cpu backends disabled)", file=sys.stderr)
    cpu_sources = []
if cpu_sources and os.environ.get("FASTMODELS_BUILD_CPP", "1") == "0":
    print("FASTMODELS_BUILD_CPP=0: the C++ extension is not built (cpu backends disabled)", file=sys.stderr)
    cpu_sources = []
if cpu_sources:

    # Compile translation units in parallel (setuptools has no ninja backend without torch).
    ParallelCompile("FASTMODELS_BUILD_JOBS", default=0).install()
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext_modules.append(
        Pybind11Extension(
            "fastmodels._C",
            cpu_sources,
            include_dirs=[os.path.join("csrc", "include")],
            # the shared headers: editing only one of them must rebuild (build_ext compares times)
            depends=sorted(glob.glob(os.path.join("csrc", "include", "*.h"))),
            extra_compile_args=["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", *openmp, *os.environ.get("FASTMODELS_CXXFLAGS", "").split()],
            extra_link_args=openmp,
            cxx_std=17,
        )
    )


class OptionalBuildExt(build_ext):
    """Build the C++ extension, but let the pure-Python package install if it fails."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if os.environ.get("FASTMODELS_REQUIRE_CPP") == "1":
                raise
            print(f"WARNING: fastmodels C++ extension not built ({exc}); cpu backends disabled", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if os.environ.get("FASTMODELS_REQUIRE_CPP") == "1":
                raise
            print(f"WARNING: building {ext.name} failed ({exc}); cpu backends disabled", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Copy csrc/{cuda,include,cpu} into the built package as fastmodels/csrc (a source checkout
    or editable install reads them from csrc/ directly)."""

    def run(self):
        super().run()
        for sub in ("cuda", "include", "cpu"):
            dest = os.path.join(self.build_lib, "fastmodels", "csrc", sub)
            for path in sorted(glob.glob(os.path.join("csrc", sub, "*"))):
                self.mkpath(dest)
                self.copy_file(path, dest)


packages = find_packages(include=["fastmodels", "fastmodels.*"])
packages += ["fastmodels.kernels", "fastmodels.bench"]

setup(
    packages=packages,
    package_dir={"fastmodels.kernels": "kernels", "fastmodels.bench": "bench"},
    package_data={"fastmodels.bench": ["*.sh"], "fastmodels": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithSources},
    zip_safe=False,
)
