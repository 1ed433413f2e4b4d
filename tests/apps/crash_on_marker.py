"""The behaviour app, in a process killed at import while the file named by
CORRAL_TEST_CRASH_MARKER exists: a C extension that crashes at load, or a
process the kernel ends while it boots. A file saying "once" is removed by
the first import that sees it."""

import os
import signal

_marker = os.environ.get("CORRAL_TEST_CRASH_MARKER")
if _marker and os.path.exists(_marker):
    with open(_marker) as _f:
        if _f.read().strip() == "once":
            try:
                os.unlink(_marker)
            except FileNotFoundError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)

from behaviour import application  # noqa: F401
