"""Every test sees 8 CPU devices, so multi-device behaviour is tested on a real mesh."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One JAX compilation cache for the session's workers and the runs they start: many tests compile
# the same tiny steps again (a resumed run, the same config on the same mesh), on two CPU cores.
# The executables are XLA's for the same programs, so no result depends on a hit or a miss.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # the controller makes it; workers inherit it
if _OWN_CACHE:
  import tempfile  # noqa: E402
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigvis-test-jax-cache-")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory, monkeypatch):
  """Bundled datasets are generated once per test session into a shared temp folder."""
  if "BIGVIS_DATA_DIR" not in os.environ:
    shared = tmp_path_factory.getbasetemp().parent / "bigvis-data"
    monkeypatch.setenv("BIGVIS_DATA_DIR", str(shared))


def pytest_collection_modifyitems(items):
  """Modules with a `slow` test first, each kept whole (its module fixtures set up once): pytest-xdist
  deals tests out in this order, so the long end-to-end runs start early and the two workers finish
  on short tests together, rather than one idling while the other runs a long test dealt last."""
  slow_modules = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_modules)


def pytest_unconfigure(config):
  """The process that made the compilation cache (the controller, or a run without workers) removes it."""
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
