"""LocTex Engine.

One import root, ``loctex``: ``kernels/`` installs as ``loctex.kernels``, ``engine/`` as
``loctex.engine`` and ``configs/`` as ``loctex.configs``. The CPU C++ ops in ``kernels/csrc`` are
built through ``CMakeLists.txt`` (see ``CMakeBuild``) against the torch the install can import.

* ``pip install --no-build-isolation -e .[dev]`` after installing torch (what ``make`` does): the
  ops are built now, against that torch; a failed build fails the install, loudly.
* ``pip install .`` / ``pip install -e .`` (an isolated build: no torch to build against): the C++
  sources ship in the package and ``loctex.kernels`` compiles them on first use against the running
  torch, cached per torch version (``kernels/cpp.py``).
"""
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = "."):
        super().__init__(name, sources=[])
        self.source_dir = os.path.abspath(source_dir)


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt against the torch this install can import.

    Without torch (an isolated build) nothing is built here and the ops are compiled on first use
    instead; with torch, a failed build is an error: an install that silently lacks the ops would
    run every CPU op on the slow reference."""

    def run(self):
        if os.environ.get("LOCTEX_BUILD_CPP", "1") == "0":
            print("loctex: LOCTEX_BUILD_CPP=0: the C++ ops are not built now (compiled on first use)",
                  file=sys.stderr)
            self.extensions = []
            super().run()
            return
        try:
            import torch  # noqa: F401
        except ImportError:
            print("loctex: torch is not importable in this build environment (an isolated build); "
                  "the C++ ops will be compiled on first use against the running torch",
                  file=sys.stderr)
            self.extensions = []
        super().run()

    def build_extension(self, ext):
        out = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_tmp = os.path.abspath(os.path.join(self.build_temp, ext.name))
        os.makedirs(build_tmp, exist_ok=True)
        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
               f"-DLOCTEX_OUTPUT_DIR={out}"]
        try:
            subprocess.check_call(["cmake", ext.source_dir, *cfg], cwd=build_tmp)
            subprocess.check_call(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)],
                                  cwd=build_tmp)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"loctex: building the C++ ops with CMake failed ({exc}); see the "
                             "output above. Without --no-build-isolation they are compiled on "
                             "first use instead.") from exc


setup(
    name="loctex",
    version="0.1.0",
    description="LocTex: contrastive + localized-narrative pre-training with fused kernels",
    python_requires=">=3.10",
    packages=[
        "loctex", "loctex.data", "loctex.models", "loctex.eval", "loctex.synth",
        "loctex.kernels", "loctex.kernels.triton", "loctex.engine", "loctex.configs",
    ],
    package_dir={"loctex.kernels": "kernels", "loctex.engine": "engine",
                 "loctex.configs": "configs"},
    # The C++ sources ship so that an install without a build (no torch at build time) can
    # compile them on first use; the configs so that commands find them from an installed package.
    package_data={"loctex.kernels": ["csrc/*.cpp", "csrc/*.h"], "loctex.configs": ["*.yaml"]},
    ext_modules=[CMakeExtension("loctex.kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # Wide on purpose: GPU machines bring their own torch/torchvision (e.g. 2.11 / 0.26);
        # the README pins torch==2.14.1 torchvision==0.29.1 for CPU machines.
        "torch>=2.4", "torchvision>=0.19",
        "numpy", "pyyaml", "rich", "tokenizers", "transformers", "pycocotools", "pillow",
        "safetensors", "scikit-learn", "deepspeed", "ninja", "xxhash", "matplotlib", "simplejpeg", "orjson",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "cmake"],
        "dali": ["nvidia-dali-cuda120"],
    },
    entry_points={"console_scripts": ["loctex=loctex.cli:main"]},
)
