"""LocTex Engine.

One import root, ``loctex``: ``kernels/`` installs as ``loctex.kernels`` and ``engine/`` as
``loctex.engine``. The CPU C++ ops in ``kernels/csrc`` are built through ``CMakeLists.txt``
(see ``CMakeBuild``); when that build fails the package still installs and the ops fall back to
the PyTorch reference with a one-time warning.

Install with ``pip install --no-build-isolation -e .[dev]`` after ``pip install torch==2.13.0``:
the C++ build needs the installed torch, and build isolation would pull a fresh (CUDA) torch.
"""
import os
import subprocess
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = "."):
        super().__init__(name, sources=[], optional=True)
        self.source_dir = os.path.abspath(source_dir)


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt against the installed torch; never fail the install."""

    def run(self):
        self._failed = []
        super().run()
        # Drop what did not build so that the install (and editable installs) copy only real files.
        self.extensions = [e for e in self.extensions if e not in self._failed]

    def build_extension(self, ext):
        try:
            import torch  # noqa: F401  (the CMake package comes from the installed torch)
            from torch.utils import cmake_prefix_path
        except ImportError:
            warnings.warn("torch is not installed; skipping the C++ ops (reference fallback)")
            self._failed.append(ext)
            return
        out = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_tmp = os.path.abspath(os.path.join(self.build_temp, ext.name))
        os.makedirs(build_tmp, exist_ok=True)
        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}",
               f"-DPython_EXECUTABLE={sys.executable}", f"-DLOCTEX_OUTPUT_DIR={out}"]
        try:
            subprocess.check_call(["cmake", ext.source_dir, *cfg], cwd=build_tmp)
            subprocess.check_call(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)],
                                  cwd=build_tmp)
        except (OSError, subprocess.CalledProcessError) as exc:
            warnings.warn(f"C++ ops build failed ({exc}); loctex.kernels falls back to the reference")
            self._failed.append(ext)


setup(
    name="loctex",
    version="0.1.0",
    description="LocTex: contrastive + localized-narrative pre-training with fused kernels",
    python_requires=">=3.10",
    packages=[
        "loctex", "loctex.data", "loctex.models", "loctex.eval", "loctex.synth",
        "loctex.kernels", "loctex.kernels.triton", "loctex.engine",
    ],
    package_dir={"loctex.kernels": "kernels", "loctex.engine": "engine"},
    ext_modules=[CMakeExtension("loctex.kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",  # 2.13.0 (CPU wheel here) and 2.11 (GPU machine) both satisfy it
        "numpy", "pyyaml", "rich", "tokenizers", "transformers", "pycocotools", "pillow",
        "safetensors", "scikit-learn", "deepspeed", "matplotlib", "simplejpeg", "orjson",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "cmake", "ninja"],
        "dali": ["nvidia-dali-cuda120"],
    },
    entry_points={"console_scripts": ["loctex=loctex.cli:main"]},
)
