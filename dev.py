#!/usr/bin/env python3
"""The project's two commands, runnable on a fresh machine with only python3:

    python3 dev.py bench [ARGS]   # the main job: benchmark fusedrnn vs torch.nn (python -m bench ARGS)
    python3 dev.py test  [ARGS]   # the test suite (pytest ARGS)

Both create ./.venv with requirements-dev.txt if it is missing, build the
compiled parts in place (incrementally, with ninja), then run.
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PY = os.path.join(VENV, "bin", "python")


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw).returncode


def ensure_venv():
    stamp = os.path.join(VENV, ".requirements")
    want = open(os.path.join(ROOT, "requirements-dev.txt")).read()
    if os.path.exists(stamp) and open(stamp).read() == want:
        return
    if not os.path.exists(PY) and run([sys.executable, "-m", "venv", VENV]):
        sys.exit("could not create .venv")
    if run([PY, "-m", "pip", "install", "-q", "-r", "requirements-dev.txt"]):
        sys.exit("pip install -r requirements-dev.txt failed")
    open(stamp, "w").write(want)


def build_env():
    env = dict(os.environ)
    if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"  # auto-detection would pick /usr/local
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    env["FUSEDRNN_REQUIRE_EXT"] = "1"  # here a broken kernel build is an error, not a fallback
    return env


def build():
    env = build_env()
    if run([PY, "-m", "pip", "show", "-q", "fusedrnn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        # Editable install of the Python parts (the extensions are built in place below).
        if run([PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
               env={**env, "FUSEDRNN_NO_EXT": "1"}):
            sys.exit("pip install -e . failed")
    # The build's output (with ptxas's -v resource report) is kept in build/build.log and
    # condensed by csrc/cuda/ptxas_summary.py, which fails the build if a kernel spills.
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    log = os.path.join(ROOT, "build", "build.log")
    print("+", PY, "setup.py -q build_ext --inplace  (output: build/build.log)", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run([PY, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        sys.stdout.write(open(log).read()[-30000:])
        sys.exit("building the extensions failed")
    if run([PY, os.path.join("csrc", "cuda", "ptxas_summary.py"), log]):
        sys.exit("CUDA kernels spill registers (ptxas summary above)")


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("bench", "test"):
        sys.exit(__doc__)
    ensure_venv()
    build()
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "bench":
        sys.exit(run([PY, "-m", "bench", *args]))
    sys.exit(run([PY, "-m", "pytest", *args]))


if __name__ == "__main__":
    main()
