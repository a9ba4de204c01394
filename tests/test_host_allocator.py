"""TensorFlow's host allocator: bigvis picks the BFC pool (memory reused across batches) before TF allocates."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# get_memory_info answers only for an allocator that keeps statistics: the BFC pool, not TF's default.
PROBE = """
import os, sys
{imports}
import tensorflow as tf
tf.zeros([64, 224, 224, 3]) + 1.0
try:
  info = tf.config.experimental.get_memory_info("CPU:0")
  print("bfc", info["peak"] >= 64 * 224 * 224 * 3 * 4, os.environ.get("TF_CPU_BFC_MEM_LIMIT_IN_MB"))
except ValueError:
  print("default")
"""


def _probe(imports: str, **env: str) -> list[str]:
  clean = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPU_")}
  proc = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**clean, "JAX_PLATFORMS": "cpu", **env})
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.split()


def test_importing_bigvis_chooses_the_bfc_allocator_before_tensorflow_allocates():
  kind, peak_counted, limit_mb = _probe("from bigvis import train")
  assert (kind, peak_counted) == ("bfc", "True")
  # The pool may grow to the machine's memory (TensorFlow's own cap is 64 GB).
  host_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
  assert int(limit_mb) >= max(host_mb, 1 << 16)


def test_without_bigvis_tensorflow_keeps_its_default_allocator():
  # The probe itself must be able to tell the two apart, or the test above proves nothing.
  assert _probe("") == ["default"]


def test_a_users_own_setting_wins():
  assert _probe("import bigvis", TF_CPU_ALLOCATOR_USE_BFC="false") == ["default"]
