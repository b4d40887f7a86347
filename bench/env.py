"""What a result was measured on: device, software versions, command line, machine load."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)
    else:
        info["name"] = info["cpu"]
    return info


def describe_device(info: dict) -> str:
    if info["type"] == "cuda":
        return f"CUDA: {info['name']} (sm_{info['capability'].replace('.', '')}, {info['memory_gb']} GB)"
    return f"CPU: {info['name']} ({info['cpu_count']} logical cores, {info['torch_threads']} torch thread{'s' if info['torch_threads'] != 1 else ''})"


def _version(mod: str):
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:  # noqa: BLE001
        return None


def _git() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""
    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "fusedrnn": _version("fusedrnn"),
         "triton": _version("triton"), "numpy": _version("numpy"),
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
         else None, "mkldnn": torch.backends.mkldnn.is_available(), "platform": platform.platform()}
    v["git"] = _git()
    return v


def command_line(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m bench", *map(shlex.quote, argv)])


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def math_flags() -> dict:
    return {"cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_enabled": torch.backends.cudnn.enabled, "mkldnn_enabled": torch.backends.mkldnn.enabled}
