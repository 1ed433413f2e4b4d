"""Fails at import: the module it needs does not exist."""

import corral_tests_no_such_module  # noqa: F401
