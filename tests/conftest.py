"""Fixtures: start corral servers that are always torn down with their whole process group."""

from __future__ import annotations

import pytest
from support import STARTED_GROUPS, Server, group_members, start_time


class ServerFactory:
    def __init__(self):
        self.servers: list[Server] = []

    def __call__(self, app: str, *args: str, wait: bool = True, **kw) -> Server:
        """Starts corral serving `app`; by default waits until every worker is ready."""
        server = Server(app, *args, **kw)
        self.servers.append(server)
        if wait:
            server.wait_started()
        return server

    def cleanup(self):
        for server in self.servers:
            server.cleanup()


@pytest.fixture
def start_server():
    """A function that starts a server for one test; every server is stopped at teardown."""
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def start_module_server():
    """Like `start_server`, for servers shared by the tests of one module."""
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="session", autouse=True)
def no_server_survives():
    yield
    # A group whose number came round again (pids wrap) to a leader of
    # another program is not one of ours.
    left = {
        pgid: group_members(pgid) for pgid, started in STARTED_GROUPS if start_time(pgid) in (started, None)
    }
    left = {k: v for k, v in left.items() if v}
    assert not left, f"corral processes survived the tests: {left}"


@pytest.fixture(scope="module")
def behaviour(start_module_server, tmp_path_factory):
    """The behaviour app (apps/behaviour.py), one worker with four threads.

    The app appends to the file in CORRAL_TEST_MARKERS when a response iterable is closed.
    """
    markers = tmp_path_factory.mktemp("markers") / "closed.log"
    markers.touch()
    server = start_module_server(
        "behaviour:application", "--env", f"CORRAL_TEST_MARKERS={markers}", workers=1, threads=4
    )
    server.markers = markers
    yield server
    # wsgiref.validate complains on stderr about iterables that were never closed.
    assert "without being closed" not in server.log, server.log
