"""A small progress bar on stderr (redrawn in place on a terminal, one line per step otherwise)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()

    def _eta(self) -> str:
        if not self.done:
            return "?"
        left = (time.monotonic() - self.t0) / self.done * (self.total - self.done)
        return f"{int(left) // 60}m{int(left) % 60:02d}s"

    def show(self, label: str) -> None:
        """Called before a step starts."""
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} eta {self._eta()}  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:150])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        took = time.monotonic() - self.t0
        msg = f"{self.done}/{self.total} cases in {int(took) // 60}m{took % 60:04.1f}s"
        self.stream.write(("\r\033[K" if self.tty else "") + msg + "\n")
        self.stream.flush()
