"""What a process the app forks from a serving thread needs put right.

Serving threads are not started by `threading`, so Python knows each as a
`_DummyThread`. A child forked from one takes that object for its main
thread, and before Python 3.13 its exit then fails an assertion in
`threading._shutdown` and ends with status 1, whatever the child did: a
`multiprocessing` process reports exitcode 1 although its target returned.
"""

import _thread
import os
import threading


def _main_thread_after_fork() -> None:
    main = threading.main_thread()
    if isinstance(main, threading._DummyThread) and getattr(main, "_tstate_lock", False) is None:
        # What threading._shutdown releases for a real main thread.
        lock = _thread.allocate_lock()
        lock.acquire()
        setattr(main, "_tstate_lock", lock)  # noqa: B010 (a private attribute the stubs do not name)


def register() -> None:
    """Runs after threading's own after-fork step (hooks run in the order registered)."""
    os.register_at_fork(after_in_child=_main_thread_after_fork)
