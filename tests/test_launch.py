"""The TPU-pod and SLURM launch scripts: what they would run (--dry-run), and what they do run
against stand-ins for gcloud, sbatch, srun, scontrol and make (no cloud, no cluster, no training)."""
import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = ROOT / "experiments" / "launch" / "tpu_pod.sh"
SLURM_GPU = ROOT / "experiments" / "launch" / "slurm_gpu.sh"
USER_ARGS = "--set total_steps=10 --set model.name='B/16' --set note=\"a b\""


def _run(script, *args, env=None, check=True):
  result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
  if check:
    assert result.returncode == 0, result.stderr + result.stdout
  return result


def _commands(stdout):
  """The `+ `-prefixed lines of a dry run, each read back as a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _opt(argv, name):
  """The value of `name VALUE` or `name=VALUE` in argv."""
  for i, arg in enumerate(argv):
    if arg == name:
      return argv[i + 1]
    if arg.startswith(name + "="):
      return arg[len(name) + 1:]
  raise AssertionError(f"{name} not in {argv}")


def _make_train_argv(remote_command):
  """The `make train …` words of a remote command (as the remote shell would split them)."""
  words = shlex.split(remote_command.replace(";", " ; ").replace("|", " | "))
  start = words.index("make")
  assert words[start + 1] == "train", remote_command
  return words[start:words.index("2>&1", start)]


def _tpu(*extra, check=True):
  base = ["--name", "pod", "--zone", "us-east5-a", "--exp", "vit_ti_digits", "--dry-run"]
  result = _run(TPU_POD, *base, *extra, check=check)
  return result, _commands(result.stdout)


def _kind(argv):
  """A short name for a printed command: 'create', 'qr-create', 'scp-up', 'ssh', 'scp-down', …"""
  if argv[:3] == ["gcloud", "compute", "tpus"]:
    group, verb = argv[3], argv[4]
    if verb == "scp":
      return "scp-up" if "--recurse" in argv else "scp-down"
    return ("qr-" if group == "queued-resources" else "") + verb
  return argv[0]


# ---- tpu_pod.sh --dry-run ----------------------------------------------------------------------

def test_tpu_dry_run_runs_every_step_in_order():
  result, cmds = _tpu("--project", "proj", "--accelerator-type", "v5p-32", "--workdir", "gs://b/runs/x",
                      "--args", USER_ARGS, "--logs", "out/logs", "--delete")
  kinds = [_kind(c) for c in cmds]
  assert kinds == ["create", "mkdir", "tar", "tar", "scp-up", "ssh", "ssh",
                   "mkdir", "scp-down", "scp-down", "scp-down", "scp-down", "delete"], kinds
  create = cmds[0]
  assert create[5] == "pod" and _opt(create, "--accelerator-type") == "v5p-32"
  assert _opt(create, "--version") == "v2-alpha-tpuv5"
  for c in cmds:
    if c[0] == "gcloud":
      assert _opt(c, "--zone") == "us-east5-a" and _opt(c, "--project") == "proj", c
  # The checkout is staged without .venv and runs/, then copied to every worker.
  pack = cmds[2]
  assert "--exclude=./.venv" in pack and "--exclude=./runs" in pack and pack[pack.index("-C") + 1] == str(ROOT)
  upload = cmds[4]
  assert _opt(upload, "--worker") == "all" and "pod:" in upload
  assert upload[upload.index("--recurse") + 1].endswith("/bigvis")
  # Install with the TPU extra, then train, each on every worker.
  install, train = cmds[5], cmds[6]
  assert _opt(install, "--worker") == "all" and "make install EXTRAS=tpu" in _opt(install, "--command")
  assert _opt(train, "--worker") == "all"
  remote = _opt(train, "--command")
  # Multi-host: each worker appends its coordinator/process flags, read from the metadata server.
  assert _make_train_argv(remote) == ["make", "train", "EXTRAS=tpu", "EXP=vit_ti_digits",
                                      "WORKDIR=gs://b/runs/x", f"ARGS={USER_ARGS} $dist"]
  assert "| tee ~/bigvis-logs/vit_ti_digits-" in remote and "pipefail" in remote
  # One log per host (v5p-32 = 16 chips = 4 hosts), fetched from each worker in turn.
  downloads = [c for c in cmds if _kind(c) == "scp-down"]
  assert [_opt(c, "--worker") for c in downloads] == ["0", "1", "2", "3"]
  assert all(c[5].startswith("pod:bigvis-logs/") and c[6].startswith("out/logs/") for c in downloads)
  assert len({c[6] for c in downloads}) == 4
  assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod"] and "--quiet" in cmds[-1]
  assert "warning" not in result.stderr  # gs:// workdir on a multi-host slice


def test_tpu_single_host_passes_args_unchanged():
  _, cmds = _tpu("--accelerator-type", "v6e-8", "--args", USER_ARGS)
  remote = _opt(cmds[-1], "--command")
  assert _make_train_argv(remote) == ["make", "train", "EXTRAS=tpu", "EXP=vit_ti_digits", f"ARGS={USER_ARGS}"]
  assert "metadata" not in remote


def test_tpu_dry_run_queued_resource():
  _, cmds = _tpu("--accelerator-type", "v5litepod-16", "--queued", "--spot", "--delete")
  kinds = [_kind(c) for c in cmds]
  assert kinds[:2] == ["qr-create", "qr-describe"] and kinds[-1] == "qr-delete", kinds
  assert "create" not in kinds and "describe" not in kinds
  create = cmds[0]
  assert create[5] == "pod" and _opt(create, "--node-id") == "pod" and "--spot" in create
  assert _opt(create, "--accelerator-type") == "v5litepod-16"
  assert _opt(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert _opt(cmds[1], "--format") == "value(state.state)"  # waits for ACTIVE
  assert "--force" in cmds[-1]
  assert kinds.index("qr-describe") < kinds.index("scp-up") < kinds.index("ssh")


def test_tpu_dry_run_reuse_skips_create_and_keeps_the_tpu():
  _, cmds = _tpu("--accelerator-type", "v4-8", "--reuse")
  kinds = [_kind(c) for c in cmds]
  assert "create" not in kinds and "delete" not in kinds
  assert kinds[0] == "describe" and kinds.count("ssh") == 2
  assert "scp-down" not in kinds  # no --logs


def test_tpu_dry_run_without_reuse_describes_nothing():
  _, cmds = _tpu("--accelerator-type", "v4-8")
  assert not any("describe" in c for c in cmds)


@pytest.mark.parametrize("accel, version, hosts", [
    ("v4-8", "tpu-ubuntu2204-base", 1), ("v4-32", "tpu-ubuntu2204-base", 4),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1), ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5p-256", "v2-alpha-tpuv5", 32), ("v6e-8", "v2-alpha-tpuv6e", 1), ("v6e-64", "v2-alpha-tpuv6e", 16),
])
def test_tpu_runtime_version_and_hosts_per_generation(accel, version, hosts):
  _, cmds = _tpu("--accelerator-type", accel, "--logs", "logs", "--workdir", "gs://b/x")
  assert _opt(cmds[0], "--version") == version
  assert sum(_kind(c) == "scp-down" for c in cmds) == hosts


def test_tpu_explicit_version_and_worker_count_win():
  _, cmds = _tpu("--accelerator-type", "v5p-16", "--version", "my-runtime", "--num-workers", "3",
                 "--logs", "logs", "--workdir", "gs://b/x")
  assert _opt(cmds[0], "--version") == "my-runtime"
  assert sum(_kind(c) == "scp-down" for c in cmds) == 3


def test_tpu_repo_clones_on_every_worker_instead_of_copying():
  _, cmds = _tpu("--accelerator-type", "v4-32", "--repo", "https://example.com/bigvis.git",
                 "--branch", "release-1", "--workdir", "gs://b/x")
  kinds = [_kind(c) for c in cmds]
  assert "scp-up" not in kinds and "tar" not in kinds
  clone = _opt(cmds[1], "--command")
  assert _opt(cmds[1], "--worker") == "all"
  assert "git clone --depth 1 --branch release-1 https://example.com/bigvis.git bigvis" in clone


def test_tpu_warns_about_a_local_workdir_on_a_multi_host_slice():
  result, _ = _tpu("--accelerator-type", "v4-32", "--workdir", "/tmp/run")
  assert "gs://" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--accelerator-type", "v4-8", "--exp", "e"], "--name is required"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8"], "--exp is required"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "tpu7x", "--exp", "e"], "--num-workers"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--name", "my pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e"], "is not a TPU name"),
    (["--name", "Pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e"], "is not a TPU name"),
    (["--name", "1pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e"], "is not a TPU name"),
    (["--name", "pod-", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e"], "is not a TPU name"),
    (["--name", "p" * 64, "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e"], "is not a TPU name"),
])
def test_tpu_usage_errors(args, message):
  result = _run(TPU_POD, *args, "--dry-run", check=False)
  assert result.returncode == 2 and message in result.stderr and not result.stdout


@pytest.mark.parametrize("name", ["p", "my-pod-2", "p" * 63])
def test_tpu_names_gcloud_accepts(name):
  _, cmds = _tpu("--name", name, "--accelerator-type", "v4-8")
  assert cmds[0][5] == name


def test_help():
  for script in (TPU_POD, SLURM_GPU):
    result = _run(script, "--help")
    assert "Usage:" in result.stdout and "--dry-run" in result.stdout


# ---- tpu_pod.sh against a stand-in gcloud ------------------------------------------------------

FAKE_GCLOUD = textwrap.dedent("""\
    import json, os, pathlib, shutil, subprocess, sys
    argv = sys.argv[1:]
    root = pathlib.Path(os.environ["FAKE_ROOT"])
    with open(root / "gcloud.jsonl", "a") as f:
      f.write(json.dumps(argv) + "\\n")
    def opt(name):
      for a in argv:
        if a.startswith(name + "="):
          return a.split("=", 1)[1]
      return argv[argv.index(name) + 1] if name in argv else None
    def workers():
      w = opt("--worker") or "0"
      n = int(os.environ["FAKE_WORKERS"])
      return range(n) if w == "all" else [int(w)]
    def home(i):
      h = root / f"worker{i}"
      h.mkdir(exist_ok=True)
      return h
    positional = [a for i, a in enumerate(argv)
                  if not a.startswith("-") and argv[i - 1] not in ("--zone", "--project", "--command")]
    verb = argv[3]
    if verb == "describe":
      if opt("--format") == "value(state.state)":
        print("ACTIVE")
        sys.exit(0)
      sys.exit(0 if os.environ.get("FAKE_EXISTS") else 1)
    if verb == "ssh":
      rc = 0
      for i in workers():
        env = dict(os.environ, HOME=str(home(i)))
        rc |= subprocess.run(["bash", "-c", opt("--command")], cwd=home(i), env=env).returncode
      sys.exit(rc)
    if verb == "scp":
      src, dest = positional[4], positional[5]
      for i in workers():
        if "--recurse" in argv:
          assert dest.endswith(":"), dest
          shutil.copytree(src, home(i) / pathlib.Path(src).name, dirs_exist_ok=True)
        else:
          shutil.copy(home(i) / src.split(":", 1)[1], dest)
    """)

FAKE_MAKE = textwrap.dedent("""\
    import json, os, sys
    with open(os.environ["FAKE_ROOT"] + "/make.jsonl", "a") as f:
      f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "home": os.environ.get("HOME"),
                          "procid": os.environ.get("SLURM_PROCID"),
                          "local_ids": os.environ.get("JAX_LOCAL_DEVICE_IDS"),
                          "mem": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}) + "\\n")
    print("fake make", *sys.argv[1:])
    sys.exit(int(os.environ.get("FAKE_MAKE_RC", "0")) if "train" in sys.argv else 0)
    """)


def _stub(bin_dir, name, python_source=None, shell_source=None):
  path = bin_dir / name
  if python_source is not None:
    path.write_text(f"#!{sys.executable} -S\n{python_source}")  # -S: start fast
  else:
    path.write_text(f"#!/bin/bash\n{shell_source}")
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "gcloud", FAKE_GCLOUD)
  _stub(bin_dir, "make", FAKE_MAKE)
  _stub(bin_dir, "sudo", shell_source='echo "sudo $*" >> "$FAKE_ROOT/sudo.log"\n')
  _stub(bin_dir, "curl", shell_source=textwrap.dedent("""\
      case ${*: -1} in  # the TPU VM metadata server
        */worker-network-endpoints) echo -n "${FAKE_ENDPOINTS:-w-0:0:10.0.0.1,w-1:1:10.0.0.2}" ;;
        */agent-worker-number) echo -n "${HOME##*worker}" ;;
        *) exit 22 ;;
      esac
      """))
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ROOT": str(tmp_path), "FAKE_WORKERS": "2"}

  def read(name):
    path = tmp_path / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
  return tmp_path, env, read


@pytest.mark.parametrize("endpoints, coordinator", [
    ("t1v-n-0:0:10.0.0.7,t1v-n-1:1:10.0.0.8,t1v-n-2:2:10.0.0.9", "10.0.0.7"),  # NAME:ID:IP
    ("t1v-n-a-w-0,t1v-n-a-w-1,t1v-n-a-w-2", "t1v-n-a-w-0"),                    # HOST
])
def test_tpu_remote_train_command_finds_its_place_in_the_slice(fake, endpoints, coordinator):
  root, env, read = fake
  _, cmds = _tpu("--accelerator-type", "v4-24", "--workdir", "gs://b/x", "--args", USER_ARGS)
  worker = root / "worker1"
  (worker / "bigvis").mkdir(parents=True)
  subprocess.run(["bash", "-c", _opt(cmds[-1], "--command")], cwd=worker, check=True, capture_output=True,
                 env={**os.environ, **env, "HOME": str(worker), "FAKE_ENDPOINTS": endpoints})
  [call] = read("make.jsonl")
  assert call["argv"] == ["train", "EXTRAS=tpu", "EXP=vit_ti_digits", "WORKDIR=gs://b/x",
                          f"ARGS={USER_ARGS} --coordinator-address={coordinator}:8482 "
                          "--num-processes=3 --process-id=1"]


def test_tpu_run_copies_installs_trains_collects_and_deletes(fake):
  root, env, read = fake
  logs = root / "logs"
  _run(TPU_POD, "--name", "pod", "--zone", "z", "--accelerator-type", "v4-16", "--exp", "vit_ti_digits",
       "--workdir", "gs://b/x", "--args", USER_ARGS, "--logs", str(logs), "--delete", env=env)
  verbs = [argv[3] for argv in read("gcloud.jsonl")]
  assert verbs == ["create", "scp", "ssh", "ssh", "scp", "scp", "delete"], verbs
  for i in range(2):
    code = root / f"worker{i}" / "bigvis"
    assert (code / "Makefile").exists() and (code / "experiments" / "launch" / "tpu_pod.sh").exists()
    assert not (code / ".venv").exists() and not (code / "runs").exists()
  calls = read("make.jsonl")
  assert [c["argv"][:2] for c in calls] == [["install", "EXTRAS=tpu"]] * 2 + [["train", "EXTRAS=tpu"]] * 2
  train = sorted((c for c in calls if c["argv"][0] == "train"), key=lambda c: c["home"])
  for i, call in enumerate(train):
    assert call["home"] == str(root / f"worker{i}")
    assert call["argv"][2:] == ["EXP=vit_ti_digits", "WORKDIR=gs://b/x",
                                f"ARGS={USER_ARGS} --coordinator-address=10.0.0.1:8482 "
                                f"--num-processes=2 --process-id={i}"]
  assert {pathlib.Path(c["cwd"]).name for c in calls} == {"bigvis"}
  fetched = sorted(logs.iterdir())
  assert [p.name.rsplit(".", 2)[-2] for p in fetched] == ["worker0", "worker1"]
  assert all("fake make train" in p.read_text() for p in fetched)


def test_tpu_run_deletes_and_fails_when_training_fails(fake):
  root, env, read = fake
  result = _run(TPU_POD, "--name", "pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e",
                "--logs", str(root / "logs"), "--delete", "--queued",
                env={**env, "FAKE_MAKE_RC": "3", "FAKE_WORKERS": "1"}, check=False)
  assert result.returncode != 0
  verbs = [(argv[2], argv[3]) for argv in read("gcloud.jsonl")]
  assert verbs[0] == ("queued-resources", "create") and verbs[1] == ("queued-resources", "describe")
  assert verbs[-2:] == [("tpu-vm", "scp"), ("queued-resources", "delete")]  # log still fetched
  assert len(list((root / "logs").iterdir())) == 1


def test_tpu_run_reuse_of_an_existing_tpu_skips_create(fake):
  _, env, read = fake
  _run(TPU_POD, "--name", "pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e", "--reuse",
       env={**env, "FAKE_EXISTS": "1", "FAKE_WORKERS": "1"})
  assert [argv[3] for argv in read("gcloud.jsonl")] == ["describe", "scp", "ssh", "ssh"]


def test_tpu_run_clones_then_updates_the_repo(fake, tmp_path):
  _, env, read = fake
  src = tmp_path / "src"
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
  subprocess.run([*git, "init", "-q", str(src)], check=True)
  (src / "Makefile").write_text("v1\n")
  subprocess.run([*git, "-C", str(src), "add", "Makefile"], check=True)
  subprocess.run([*git, "-C", str(src), "commit", "-qm", "v1"], check=True)
  args = ["--name", "pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e",
          "--repo", f"file://{src}", "--branch", "main"]
  env = {**env, "FAKE_WORKERS": "1"}
  _run(TPU_POD, *args, env=env)
  checkout = tmp_path / "worker0" / "bigvis"
  assert (checkout / "Makefile").read_text() == "v1\n"
  (src / "Makefile").write_text("v2\n")
  subprocess.run([*git, "-C", str(src), "commit", "-qam", "v2"], check=True)
  _run(TPU_POD, *args, "--reuse", env={**env, "FAKE_EXISTS": "1"})
  assert (checkout / "Makefile").read_text() == "v2\n"
  assert [c["argv"][0] for c in read("make.jsonl")] == ["install", "train"] * 2


# ---- slurm_gpu.sh --------------------------------------------------------------------------------

def _slurm(*extra, env=None):
  result = _run(SLURM_GPU, "--exp", "vit_ti_digits", "--dry-run", *extra, env=env)
  out = result.stdout
  begin, end = out.index("#!/bin/bash"), out.index("# ---- end of batch script")
  return out[begin:end], _commands(out[end:])


def test_slurm_dry_run_prints_the_batch_script_and_the_sbatch_command(tmp_path):
  script, cmds = _slurm("--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj",
                        "--time", "12:00:00", "--workdir", "/shared/runs/x", "--args", USER_ARGS,
                        "--logs", str(tmp_path / "logs"), "--cpus-per-task", "32",
                        "--sbatch-opt", "--exclusive", "--venv-setup")
  lines = script.splitlines()
  for line in ["#SBATCH --job-name=bigvis-vit_ti_digits", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
               "#SBATCH --time=12:00:00", "#SBATCH --cpus-per-task=32", "#SBATCH --exclusive",
               f"#SBATCH --output={tmp_path}/logs/%x-%j.out", "make install EXTRAS=gpu",
               "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]:
    assert line in lines, line
  directives = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
  assert directives == list(range(1, len(directives) + 1))  # before any command, or sbatch ignores them
  srun = script[script.index("srun "):]
  assert f"--output={tmp_path}/logs/%x-%j-%t.log" in srun and "--ntasks-per-node=1" in srun
  assert "make train EXTRAS=gpu" in srun and "--cpus-per-task=32" in srun
  for flag in ["--coordinator-address=$BIGVIS_COORDINATOR", "--num-processes=$SLURM_NTASKS",
               "--process-id=$SLURM_PROCID"]:
    assert flag in srun
  assert """scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1'""" in script
  assert cmds == [["mkdir", "-p", f"{tmp_path}/logs"], ["sbatch", cmds[1][1]]]
  assert cmds[1][1].startswith(f"{tmp_path}/logs/bigvis-vit_ti_digits-") and cmds[1][1].endswith(".sbatch")
  assert not (tmp_path / "logs").exists()  # dry run: nothing written


def test_slurm_dry_run_says_the_batch_script_is_not_written_and_where_it_would_go(tmp_path):
  """The `sbatch PATH` it prints names a file a dry run does not write: the output must say so."""
  result = _run(SLURM_GPU, "--exp", "vit_ti_digits", "--logs", str(tmp_path / "logs"), "--dry-run")
  out = result.stdout
  path = _commands(out)[-1][1]
  header = out[:out.index("#!/bin/bash")]
  assert "nothing is written or submitted" in header and path in header.replace("\n# ", " ")
  after = out[out.index("# ---- end of batch script"):]
  assert f"# (here the batch script above is written to {path})" in after.splitlines()
  assert after.index("+ mkdir") < after.index("# (here") < after.index("+ sbatch")
  assert not (tmp_path / "logs").exists()


def test_slurm_single_node_needs_no_coordinator():
  script, _ = _slurm("--gpus-per-node", "1")
  assert "--coordinator-address" not in script and "#SBATCH --nodes=1" in script
  assert "make --question .venv/.installed-gpu EXTRAS=gpu" in script  # no --venv-setup: check only


def _run_batch_script(script, root, env, nodes):
  """Runs a batch script as SLURM would, with srun starting one task per node in turn."""
  bin_dir = root / "bin"
  _stub(bin_dir, "scontrol", shell_source='printf "node001\\nnode002\\nnode003\\n"\n')
  _stub(bin_dir, "srun", shell_source=textwrap.dedent("""\
      echo "srun $*" >> "$FAKE_ROOT/srun.log"
      while [[ $1 == -* ]]; do shift; done
      for (( i = 0; i < SLURM_NNODES; i++ )); do SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit; done
      """))
  path = root / "job.sbatch"
  path.write_text(script)
  slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-003]", "SLURM_NNODES": str(nodes),
               "SLURM_NTASKS": str(nodes)}
  return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60,
                        env={**os.environ, **env, **slurm_env})


def test_slurm_batch_script_starts_one_process_per_node_with_distributed_flags(fake):
  root, env, read = fake
  script, _ = _slurm("--nodes", "3", "--gpus-per-node", "4", "--args", USER_ARGS, "--venv-setup")
  result = _run_batch_script(script, root, env, nodes=3)
  assert result.returncode == 0, result.stderr
  calls = read("make.jsonl")
  assert calls[0]["argv"] == ["install", "EXTRAS=gpu"] and calls[0]["procid"] is None  # once, before srun
  train = calls[1:]
  assert len(train) == 3
  for i, call in enumerate(train):
    assert call["cwd"] == str(ROOT) and call["local_ids"] == "0,1,2,3" and call["mem"] == "0.9"
    assert call["argv"][:4] == ["train", "EXTRAS=gpu", "EXP=vit_ti_digits", "WORKDIR=runs/vit_ti_digits"]
    port = 20000 + 4242 % 20000
    assert call["argv"][4] == (f"ARGS={USER_ARGS} --coordinator-address=node001:{port} "
                               f"--num-processes=3 --process-id={i}")


def test_slurm_batch_script_stops_when_the_venv_is_not_installed(fake):
  root, env, read = fake
  script, _ = _slurm("--nodes", "2")
  _stub(root / "bin", "make", shell_source="exit 1\n")  # `make --question` says: out of date
  result = _run_batch_script(script, root, env, nodes=2)
  assert result.returncode == 1 and "--venv-setup" in result.stderr
  assert not (root / "srun.log").exists()


def test_slurm_submits_with_sbatch(fake):
  root, env, _ = fake
  _stub(root / "bin", "sbatch", shell_source='echo "$@" > "$FAKE_ROOT/sbatch.args"; echo "Submitted batch job 7"\n')
  result = _run(SLURM_GPU, "--exp", "vit_ti_digits", "--nodes", "2", "--logs", str(root / "logs"), env=env)
  assert "Submitted batch job 7" in result.stdout
  submitted = pathlib.Path((root / "sbatch.args").read_text().strip())
  assert submitted.parent == root / "logs" and "#SBATCH --nodes=2" in submitted.read_text()


@pytest.mark.parametrize("args, message", [
    ([], "--exp is required"), (["--exp", "e", "--nodes", "0"], "--nodes"),
    (["--exp", "e", "--time", "soon"], "--time"), (["--exp", "e", "--what"], "unknown option"),
    (["--exp", "e", "--port", "99999"], "--port must be an integer from 1 to 65535"),
    (["--exp", "e", "--port", "0"], "--port must be"), (["--exp", "e", "--port", "8080x"], "--port must be"),
    (["--exp", "e", "--job-name", "a b"], "SLURM names"),
])
def test_slurm_usage_errors(args, message):
  result = _run(SLURM_GPU, *args, "--dry-run", check=False)
  assert result.returncode == 2 and message in result.stderr


def test_slurm_port_limits_are_accepted():
  script, _ = _slurm("--nodes", "2", "--port", "65535")
  assert "awk 'NR == 1'):65535\"" in script


# ---- a value left out: the next flag is not taken as the value -----------------------------

@pytest.mark.parametrize("script, args", [
    (SLURM_GPU, ["--exp", "vit_ti_digits", "--args", "--dry-run"]),
    (SLURM_GPU, ["--exp", "vit_ti_digits", "--workdir", "--dry-run"]),
    (SLURM_GPU, ["--exp", "--dry-run", "--nodes", "2"]),
    (TPU_POD, ["--name", "pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e", "--args", "--dry-run"]),
    (TPU_POD, ["--name", "pod", "--zone", "z", "--accelerator-type", "v4-8", "--exp", "e", "--logs", "--dry-run"]),
], ids=lambda v: v.name if isinstance(v, pathlib.Path) else " ".join(v[-2:]))
def test_a_flag_is_not_taken_as_a_missing_value(fake, script, args):
  """`--args --dry-run` used to set ARGS=--dry-run and then submit the job (or create the TPU)."""
  root, env, read = fake
  _stub(root / "bin", "sbatch", shell_source='echo "$@" > "$FAKE_ROOT/sbatch.args"\n')
  result = _run(script, *args, env=env, check=False)
  option, flag = args[-2:] if args[-1] == "--dry-run" else args[-4:-2]
  assert result.returncode == 2, result.stdout
  assert result.stderr.strip() == f"{script.name}: {option} needs a value; got the flag {flag}"
  assert not result.stdout and not read("gcloud.jsonl") and not (root / "sbatch.args").exists()


@pytest.mark.parametrize("value", ["--set x=1", "", "-v"])
def test_args_may_start_with_a_dash_or_be_empty(value):
  script, _ = _slurm("--args", value)
  [export] = [l for l in script.splitlines() if l.startswith("export BIGVIS_ARGS=")]
  assert shlex.split(export) == ["export", f"BIGVIS_ARGS={value}"]
  _, cmds = _tpu("--accelerator-type", "v4-8", "--args", value)
  argv = _make_train_argv(_opt(cmds[-1], "--command"))
  assert argv[-1] == (f"ARGS={value}" if value else "EXP=vit_ti_digits")


# ---- static checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TPU_POD, SLURM_GPU], ids=lambda p: p.name)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck(tmp_path):
  script, _ = _slurm("--nodes", "2", "--prelude", "module load cuda")
  generated = tmp_path / "job.sbatch"
  generated.write_text(script)
  result = subprocess.run(["shellcheck", str(TPU_POD), str(SLURM_GPU), str(generated)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_make_train_passes_a_workdir_with_spaces_as_one_argument():
  make = subprocess.run(["make", "-n", "train", "WORKDIR=/shared/runs/a b", "EXP=clip_vitb16:tokenizer=/t/k.model",
                         "ARGS=--set total_steps=10"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert make.returncode == 0, make.stderr
  [line] = [l for l in make.stdout.splitlines() if "bigvis train" in l]
  argv = shlex.split(line)
  assert argv[1:] == ["train", "--config", "clip_vitb16:tokenizer=/t/k.model", "--workdir", "/shared/runs/a b",
                      "--set", "total_steps=10"]


def test_an_experiment_argument_travels_with_exp_and_names_stay_plain(tmp_path):
  """CLIP's experiments take their tokenizer as an argument (`clip_vitb16:tokenizer=PATH`): `make
  train EXP=…`, tpu_pod.sh and slurm_gpu.sh pass it on whole, while the default workdir, log and job
  names use the experiment's name alone (no colons or slashes in file names)."""
  exp = "clip_vith14:tokenizer=gs://b/tok.model"
  make = subprocess.run(["make", "-n", "train", f"EXP={exp}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert make.returncode == 0, make.stderr
  assert f"train --config '{exp}' --workdir 'runs/clip_vith14'" in make.stdout
  _, cmds = _tpu("--exp", exp, "--accelerator-type", "v5p-32", "--workdir", "gs://b/runs/x", "--logs", "out/logs")
  remote = _opt(next(c for c in cmds if _kind(c) == "ssh" and "make train" in _opt(c, "--command")), "--command")
  assert f"EXP={exp}" in _make_train_argv(remote)
  assert "| tee ~/bigvis-logs/clip_vith14-" in remote
  assert all(c[6].startswith("out/logs/clip_vith14-") for c in cmds if _kind(c) == "scp-down")
  script, _ = _slurm("--exp", exp.replace("vith14", "vitb16"), "--logs", str(tmp_path / "logs"))
  assert "#SBATCH --job-name=bigvis-clip_vitb16" in script.splitlines()
  # The default workdir is make's, runs/NAME, so that `make train EXP=…` resumes the run.
  assert "export BIGVIS_WORKDIR=runs/clip_vitb16" in script.splitlines()
  assert "export BIGVIS_EXP=clip_vitb16:tokenizer=gs://b/tok.model" in script.splitlines()
