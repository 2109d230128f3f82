import os

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs 2 xdist workers on the 2 cores: with torch's default 2 threads each, small ops
# spin in OpenMP barriers against the other worker (oversubscription); one thread each is
# the fastest split.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_sessionstart(session):
    """The C++ CPU ops must be there: without them every CPU op quietly runs the reference and
    their tests would have nothing to test. LOCTEX_REQUIRE_CPP=0 is for a machine that only runs
    the GPU kernels (make gpu-check on an image without a compiler)."""
    import loctex.kernels as K
    if os.environ.get("LOCTEX_REQUIRE_CPP", "1") != "0" and not K.cpp_available():
        from loctex.kernels import cpp
        pytest.exit(f"the LocTex C++ ops are not available ({cpp.load_error()}); "
                    "build them with `pip install --no-build-isolation -e .`", returncode=3)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpp: uses the C++ CPU ops (deselect with -m 'not cpp')")
    config.addinivalue_line("markers", "slow: end-to-end runs of tens of seconds "
                                       "(deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
