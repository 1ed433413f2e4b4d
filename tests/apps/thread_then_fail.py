"""An import that starts a thread (not a daemon) that never ends, then fails."""

import threading
import time


def _forever():
    while True:
        time.sleep(0.05)


threading.Thread(target=_forever, name="forever").start()
raise RuntimeError("configuration missing")
