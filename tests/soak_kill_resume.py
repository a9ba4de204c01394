"""Kill -9 soak test, outside the suite: SIGKILL a run at random moments, resume, compare losses.

    .venv/bin/python tests/soak_kill_resume.py --kills 3 --steps 60 [--config vit_ti_digits] [--seed 1]

Runs the experiment once uninterrupted, then again killed `--kills` times at
random wall-clock moments (checkpoints every 5 steps) and restarted with the
same command each time; exits 0 when `train/loss` matches at every step.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, workdir: str, steps: int) -> subprocess.Popen:
  args = [sys.executable, "-m", "bigvis.cli", "train", "--config", config, "--workdir", workdir,
          "--set", f"total_steps={steps}", "--set", "log_every_steps=1", "--set", "checkpoint_every_steps=5",
          "--set", "evals={}"]
  return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="vit_ti_digits")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--kills", type=int, default=3)
  parser.add_argument("--seed", type=int, default=None)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="bigvis-soak-")
  ref, killed = os.path.join(root, "ref"), os.path.join(root, "killed")

  t0 = time.time()
  if run(args.config, ref, args.steps).wait():
    print("reference run failed", file=sys.stderr)
    return 1
  duration = time.time() - t0
  for i in range(args.kills):
    proc = run(args.config, killed, args.steps)
    delay = rng.uniform(0.3, 0.9) * duration
    try:
      proc.wait(timeout=delay)
      print(f"kill {i + 1}: the run finished before {delay:.1f}s", file=sys.stderr)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      steps = sorted(losses(killed)) if os.path.exists(os.path.join(killed, "metrics.jsonl")) else []
      print(f"kill {i + 1}: SIGKILL after {delay:.1f}s at logged step {steps[-1] if steps else 0}", file=sys.stderr)
  final = run(args.config, killed, args.steps)
  if final.wait():
    print(final.stderr.read(), file=sys.stderr)
    return 1
  a, b = losses(ref), losses(killed)
  bad = [s for s in a if s not in b or abs(a[s] - b[s]) > 1e-6 * max(abs(a[s]), 1e-12)]
  print(json.dumps({"steps": len(a), "kills": args.kills, "mismatched_steps": bad, "workdir": root}))
  return 1 if bad or sorted(a) != sorted(b) else 0


if __name__ == "__main__":
  sys.exit(main())
