"""pytest configuration shared by ``tests/`` and ``benchmarks/``: a test run writes nothing
into the checkout, not even the caches that hypothesis (``.hypothesis/``) and pytest-benchmark
(``.benchmarks/``) would create in the working directory. Both go to one temporary folder,
removed when the run ends. pytest's own ``.pytest_cache`` stays (``--lf`` needs it across
runs; ``-p no:cacheprovider`` turns it off)."""

import os
import shutil
import tempfile

import pytest

_SCRATCH = tempfile.mkdtemp(prefix="mobileops-test-caches-")
# Read lazily by hypothesis, at its first write, so setting it before any test runs suffices.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(_SCRATCH, "hypothesis"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark's own pytest_configure creates its storage folder; only when the
    # plugin is active and the user did not name a storage of their own.
    if config.pluginmanager.hasplugin("benchmark") and \
            getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = "file://" + os.path.join(_SCRATCH, "benchmarks")


def pytest_unconfigure(config):
    shutil.rmtree(_SCRATCH, ignore_errors=True)
