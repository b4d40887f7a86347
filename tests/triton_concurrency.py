"""Run the programs of a Triton launch concurrently under the interpreter (test support).

The Triton interpreter runs the programs of a grid one after the other, so a kernel whose
programs wait for each other (the grid barrier of the persistent kernels in
triton_kernels/recurrence.py) would spin forever, and a missing barrier goes unnoticed.
Inside `concurrent_programs(order)`, which also lets launch.py choose those kernels
under the interpreter, every program of a launch is a thread, and exactly
one runs at a time: a program runs until its next atomic operation (a grid barrier is
built from atomics), then hands over to the next live program in a fixed order. The
schedule is deterministic and adversarial, like the CUDA emulator's (csrc/emulation):
without a barrier, a program runs all its steps before the next program starts, so a
read of another program's data of the same step sees the poison it was filled with.

Depends on the interpreter's internals of the pinned Triton (GridExecutor, the global
InterpreterBuilder); it fails loudly if they change.
"""
from __future__ import annotations

import contextlib
import inspect
import threading

from triton.runtime import interpreter as I

MAX_SWITCHES = 2_000_000  # a barrier that can never be satisfied spins: report it


class _Scheduler:
    """One baton: only the thread holding it runs interpreted code."""

    def __init__(self, n: int, order: list[int]):
        self.go = [threading.Semaphore(0) for _ in range(n)]
        self.order = order             # program indices in the order they get the baton
        self.alive = [True] * n
        self.switches = 0
        self.error: BaseException | None = None

    def _next(self, me: int) -> int | None:
        pos = self.order.index(me)
        for k in range(1, len(self.order) + 1):
            cand = self.order[(pos + k) % len(self.order)]
            if self.alive[cand]:
                return cand
        return None

    def switch(self, me: int) -> None:
        """Called by program `me` at a synchronization point: let the next program run."""
        self.switches += 1
        if self.switches > MAX_SWITCHES:
            raise RuntimeError("concurrent_programs: no progress (a grid barrier waits for a program that never arrives)")
        nxt = self._next(me)
        if nxt is None or nxt == me:
            return
        self.go[nxt].release()
        self.go[me].acquire()

    def finish(self, me: int) -> None:
        self.alive[me] = False
        nxt = self._next(me)
        if nxt is not None:
            self.go[nxt].release()


_local = threading.local()


def _grid_idx_get(self):
    return getattr(_local, "grid_idx", None)


def _grid_idx_set(self, value):
    _local.grid_idx = value


def _concurrent_call(order_name: str):
    def __call__(self, *args_dev, **kwargs):
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch_scope = I._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {n: a if n in self.constexprs else I._implicit_cvt(a) for n, a in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            I.interpreter_builder.set_grid_dim(*grid)
            programs = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
            order = list(range(len(programs)))
            if order_name == "reverse":
                order.reverse()
            sched = _Scheduler(len(programs), order)

            def run(i):
                sched.go[i].acquire()
                _local.program = (sched, i)
                try:
                    if sched.error is None:
                        I.interpreter_builder.set_grid_idx(*programs[i])
                        self.fn(**args)
                except BaseException as e:  # noqa: BLE001 (re-raised in the launching thread)
                    sched.error = sched.error or e
                finally:
                    _local.program = None
                    sched.finish(i)

            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(programs))]
            for t in threads:
                t.start()
            sched.go[order[0]].release()
            for t in threads:
                t.join()
            if sched.error is not None:
                raise sched.error
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)
    return __call__


def _switching_atomic(original):
    def create_atomic_rmw(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        prog = getattr(_local, "program", None)
        if prog is not None:
            prog[0].switch(prog[1])
        return out
    return create_atomic_rmw


@contextlib.contextmanager
def concurrent_programs(order: str = "forward"):
    """Within the block, interpreted launches run their programs concurrently, switching
    at atomics; `order` ("forward" or "reverse") is the order programs get to run in."""
    assert order in ("forward", "reverse"), order
    for name in ("_init_args_hst", "_restore_args_dev", "pre_run_hooks", "constexprs"):
        assert hasattr(I.GridExecutor, name) or name in ("pre_run_hooks", "constexprs"), \
            f"Triton's interpreter changed: GridExecutor.{name} is gone"
    saved = (I.GridExecutor.__call__, I.InterpreterBuilder.create_atomic_rmw,
             I.InterpreterBuilder.__dict__.get("grid_idx"), I.interpreter_builder.__dict__.pop("grid_idx", None))
    from fusedrnn.triton_kernels import launch
    launch.CONCURRENT_INTERPRETER = True  # the grid-barrier (persistent) kernels may run now
    I.GridExecutor.__call__ = _concurrent_call(order)
    I.InterpreterBuilder.create_atomic_rmw = _switching_atomic(saved[1])
    I.InterpreterBuilder.grid_idx = property(_grid_idx_get, _grid_idx_set)
    try:
        yield
    finally:
        launch.CONCURRENT_INTERPRETER = False
        I.GridExecutor.__call__, I.InterpreterBuilder.create_atomic_rmw = saved[0], saved[1]
        if saved[2] is None:
            del I.InterpreterBuilder.grid_idx
        else:
            I.InterpreterBuilder.grid_idx = saved[2]
        if saved[3] is not None:
            I.interpreter_builder.grid_idx = saved[3]
