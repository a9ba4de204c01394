"""TensorFlow's host allocator: bigvis picks the BFC pool (memory reused across batches) before TF allocates."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Which allocator TensorFlow took, told by what only the BFC pool does: keep to its cap. Three 38 MB
# tensors do not fit in a 64 MB pool; TensorFlow's default allocator has no cap. (Whether
# get_memory_info answers cannot tell them apart: some TensorFlow builds keep statistics for both.)
PROBE = """
import os
{imports}
import tensorflow as tf
try:
  kept = [tf.zeros([64, 224, 224, 3]) + float(i) for i in range(3)]
  print("default")
except tf.errors.ResourceExhaustedError:
  print("bfc")
"""


def _run(code: str, **env: str) -> str:
  clean = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPU_")}
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**clean, "JAX_PLATFORMS": "cpu", **env})
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip()


def _allocator(imports: str, **env: str) -> str:
  return _run(PROBE.format(imports=imports), **{"TF_CPU_BFC_MEM_LIMIT_IN_MB": "64", **env})


def test_importing_bigvis_chooses_the_bfc_allocator_before_tensorflow_allocates():
  assert _allocator("from bigvis import train") == "bfc"  # (a cap of the user's own is kept)
  # Without one, the pool may grow to the machine's memory (TensorFlow's own cap is 64 GB).
  limit_mb = _run("import os, bigvis; print(os.environ['TF_CPU_BFC_MEM_LIMIT_IN_MB'])")
  host_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
  assert int(limit_mb) >= max(host_mb, 1 << 16)


def test_without_bigvis_tensorflow_keeps_its_default_allocator():
  # The probe itself must be able to tell the two apart, or the test above proves nothing.
  assert _allocator("") == "default"
  assert _allocator("", TF_CPU_ALLOCATOR_USE_BFC="true") == "bfc"


def test_a_users_own_setting_wins():
  assert _allocator("import bigvis", TF_CPU_ALLOCATOR_USE_BFC="false") == "default"
