"""Test-suite setup. Without a GPU, Triton's kernels run through its interpreter (tests/test_kernels.py);
the switch must be set before triton is first imported, hence here. Nothing routes other CPU work through
the kernels (r1lab.model.kernels.CPU_INTERPRET stays off outside those tests).

torch.compile's kernels go to a cache of this run's own (unless TORCHINDUCTOR_CACHE_DIR is set): Inductor's shared
cache (/tmp/torchinductor_$USER) is not keyed on ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS or the OpenMP thread
count, and reusing kernels compiled under other settings crashed the compiled-update and compiled-decode tests
(segmentation fault, abort) when the suite was run under those settings one after another; with a fresh cache
each passes."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="r1lab-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): one worker per core, at most 4 (each loads torch and compiles its own kernels)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    # the workers share the cores: each takes its share as torch threads instead of all of them
    torch.set_num_threads(max(1, torch.get_num_threads() // _workers))


@pytest.fixture(autouse=True)
def _fresh_compiler_state():
    """Each test compiles from a clean torch.compile state. Dynamo remembers the shapes it saw per function across
    tests and recompiles later calls with symbolic sizes; after the speculative-decoding and LoRA tests compiled
    the model at other shapes, the compiled-training test hit an Inductor codegen error ("expected [s52] to have
    been codegen-ed") that it does not hit alone."""
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matmuls gain nothing from threads, and one thread keeps results independent of the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
