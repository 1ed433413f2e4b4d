"""corral: a WSGI application server with a Rust core."""

from corral._corral import ClientDisconnected, FileWrapper, InvalidRequestBody, __version__

__all__ = ["ClientDisconnected", "FileWrapper", "InvalidRequestBody", "__version__"]
