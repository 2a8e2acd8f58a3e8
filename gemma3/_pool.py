"""Worker processes that a terminal's Ctrl-C does not reach.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group. A spawned worker that
gets it before its initializer can ignore it (while the interpreter starts, or while it unpickles
its start-up state) prints a KeyboardInterrupt traceback, and no code of ours runs early enough
in that window to prevent it. So the workers are started in a process group of their own
(``os.posix_spawn(..., setpgroup=0)``): the signal reaches only the parent, which stops the pool
(``Pool.terminate``), and a worker whose parent is gone ends when its task pipe closes.

Everything else is multiprocessing's "spawn" start method unchanged: a fresh interpreter (no
forked OpenMP or BLAS state), the same command line and start-up data.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from multiprocessing import popen_spawn_posix, spawn, util
from multiprocessing.context import reduction, set_spawning_popen


class _Popen(popen_spawn_posix.Popen):
    """popen_spawn_posix.Popen with the child started in its own process group."""

    def _launch(self, process_obj):
        from multiprocessing import resource_tracker

        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        data = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(spawn.get_preparation_data(process_obj._name), data)
            reduction.dump(process_obj, data)
        finally:
            set_spawning_popen(None)
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        try:
            self._fds.extend([child_r, child_w])
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self.pid = _spawn_in_own_group(spawn.get_executable(), cmd, self._fds)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(data.getbuffer())
        finally:
            self.finalizer = util.Finalize(self, util.close_fds, [parent_r, parent_w])
            os.close(child_r)
            os.close(child_w)


def _spawn_in_own_group(exe: str, args: list[str], passfds: list[int]) -> int:
    """exec ``args`` in a new process group, the descriptors ``passfds`` left open in it."""
    was = {fd: os.get_inheritable(fd) for fd in passfds}
    try:
        for fd in passfds:
            os.set_inheritable(fd, True)
        return os.posix_spawn(exe, args, os.environ, setpgroup=0)
    finally:
        for fd, inh in was.items():
            os.set_inheritable(fd, inh)


class _Process(mp.context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj):  # noqa: N802 - multiprocessing's name
        return _Popen(process_obj)


class _Context(mp.context.SpawnContext):
    Process = _Process


def start_pool(workers: int, initializer, initargs: tuple):
    """A multiprocessing Pool of ``workers`` spawned processes, each in its own process group."""
    return _Context().Pool(workers, initializer, initargs)
