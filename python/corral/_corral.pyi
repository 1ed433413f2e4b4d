"""Type stubs for the native module."""

from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import IO, final

__all__ = [
    "ClientDisconnected",
    "ErrorStream",
    "FileWrapper",
    "Input",
    "InvalidRequestBody",
    "StartResponse",
    "Write",
    "__version__",
    "_log",
    "main",
]

__version__: str

class ClientDisconnected(OSError): ...
class InvalidRequestBody(OSError): ...

def main(argv: list[str]) -> int: ...
def _log(level: str, message: str) -> None:
    """Writes a line to the error log at `level` (error, warning, info or debug)."""

@final
class FileWrapper:
    @property
    def filelike(self) -> IO[bytes]: ...
    @property
    def blksize(self) -> int: ...
    def __new__(cls, filelike: IO[bytes], blksize: int = 8192) -> FileWrapper: ...
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None: ...

@final
class Input:
    def read(self, size: int | None = None) -> bytes: ...
    def readline(self, size: int | None = None) -> bytes: ...
    def readlines(self, hint: int | None = None) -> list[bytes]: ...
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...

@final
class Write:
    def __call__(self, data: bytes) -> None: ...

@final
class StartResponse:
    def __call__(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | None = None,
    ) -> Write: ...

@final
class ErrorStream:
    def write(self, s: str) -> int: ...
    def writelines(self, lines: Iterable[str]) -> None: ...
    def flush(self) -> None: ...
