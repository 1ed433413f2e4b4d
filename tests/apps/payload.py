"""The bytes the framework apps (Flask, Django, Falcon) serve, deterministic
so that the tests can check a download's digest."""

import os
import threading

CHUNK = bytes(range(256)) * 256  # 64 KiB


def download_bytes(size):
    """The body of /download?size=N, in pieces."""
    while size > 0:
        piece = CHUNK[: min(size, len(CHUNK))]
        size -= len(piece)
        yield piece


def file_of(directory, size):
    """A file in `directory` holding download_bytes(size), written once."""
    path = os.path.join(directory, f"{size}.bin")
    if not os.path.exists(path):
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.writelines(download_bytes(size))
        os.replace(tmp, path)
    return path
