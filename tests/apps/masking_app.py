"""An app that blocks the worker's stop signals and puts SIGSEGV back to its
default action at import, as a library that manages signals might; the rest
is behaviour's app (with its /segfault)."""

import signal

from behaviour import application  # noqa: F401

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1})
signal.signal(signal.SIGSEGV, signal.SIG_DFL)
