"""One thread for every model computation of the engine, in arrival order.

Why one thread: PyTorch's CPU kernels run on an OpenMP team that belongs to the calling thread.
Once more than one thread has a team (the main thread that loaded the model, the web server's
threads that analysed studies, one thread per draft), libgomp has more threads than cores and
stops spinning between parallel regions, so every small kernel pays a thread wake-up. Measured
on 2 cores: a 16 x 576 softmax takes 5.7 us on the only team and 67 us beside another one; a
decode step for four drafts 18 ms against 33 ms. So the engine runs its model work (loading,
analysis, Grad-CAM, prefill, decode steps, grounding) as jobs here, and other threads that touch
torch keep it at one thread (no team). Jobs run in arrival order: another user's analysis
waits for the job in progress (one decode step), never for a whole draft.

The thread ends after `idle_s` without work (its team with it) and starts again on demand.

At interpreter exit the model threads and the workers started with `start_worker` are let
finish what they are doing (new jobs raise `ProcessExiting`) before Python finalizes. A daemon
thread still inside a torch call then would abort the process ("terminate called without an
active exception", exit 134): torch releases the GIL inside its C++ calls, and a daemon thread
that takes it back during finalization is ended by a forced unwind that a noexcept destructor
turns into std::terminate (pytorch/pytorch#38228).
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

IDLE_S = 30.0
EXIT_WAIT_S = 60.0  # at most this long at exit for model jobs and workers to end

_exiting = threading.Event()
_model_threads: weakref.WeakSet = weakref.WeakSet()
_workers: set[threading.Thread] = set()
_workers_lock = threading.Lock()


class ProcessExiting(RuntimeError):
    """Model work asked for while the interpreter exits."""


class _Job:
    __slots__ = ("fn", "args", "kwargs", "done", "result", "error")

    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ModelThread:
    def __init__(self, threads: int | None = None, name: str = "mrg-model",
                 idle_s: float = IDLE_S):
        """`threads`: torch's intra-op threads for the jobs (None: what the creating thread
        uses now)."""
        import torch

        self.threads = int(threads or torch.get_num_threads())
        self.name, self.idle_s = name, idle_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # the thread's start and end
        self._thread: threading.Thread | None = None
        # seconds spent in jobs: with a benchmark's wall time, how much of it the model
        # thread was computing (bench/concurrent_drafts.py); only this thread adds to it
        self.busy_s = 0.0
        _model_threads.add(self)

    def run(self, fn: Callable, /, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread, after the jobs that came before; its
        result, or its exception raised here. Called from the model thread itself (a job
        that needs another model call), it runs at once."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        job = _Job(fn, args, kwargs)
        with self._lock:
            if _exiting.is_set():
                raise ProcessExiting("the process is exiting: no new model work")
            self._jobs.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _serve(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            if job is None:  # put by _finish_at_exit after the last job it lets in
                return
            t0 = time.perf_counter()
            try:
                job.result = job.fn(*job.args, **job.kwargs)
            except BaseException as exc:  # raised again in the caller's thread
                job.error = exc
            finally:
                self.busy_s += time.perf_counter() - t0
                job.done.set()

    def _end_for_exit(self) -> threading.Thread | None:
        """Let the jobs already queued run, then end the thread; the thread to join."""
        with self._lock:
            thread = self._thread
            if thread is not None:
                self._jobs.put(None)
        return thread


def start_worker(target: Callable, name: str, *args) -> threading.Thread:
    """A daemon thread that does torch work outside the model thread (a draft's search); at
    exit the interpreter waits for it (EXIT_WAIT_S at most): its model calls raise
    ProcessExiting then, so it ends soon."""
    def work():
        try:
            target(*args)
        finally:
            with _workers_lock:
                _workers.discard(threading.current_thread())

    thread = threading.Thread(target=work, name=name, daemon=True)
    with _workers_lock:
        _workers.add(thread)
    thread.start()
    return thread


def exiting() -> bool:
    return _exiting.is_set()


@atexit.register
def _finish_at_exit(wait_s: float = EXIT_WAIT_S) -> None:
    # atexit runs before finalization starts, while daemon threads still run normally.
    _exiting.set()
    deadline = time.monotonic() + wait_s
    threads = [t for mt in list(_model_threads) if (t := mt._end_for_exit()) is not None]
    with _workers_lock:
        threads += list(_workers)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def one_torch_thread() -> None:
    """For a thread that does light torch work next to the model thread (a draft's own
    search): no OpenMP team of its own, so the model thread's team keeps its cores."""
    import torch

    torch.set_num_threads(1)
