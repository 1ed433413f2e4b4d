"""Kills the process that imports it, as a crashing C extension might at boot."""

import os
import signal

if os.environ.get("CORRAL_TEST_CRASH") == "segv":
    os.kill(os.getpid(), signal.SIGSEGV)
else:
    os._exit(7)
