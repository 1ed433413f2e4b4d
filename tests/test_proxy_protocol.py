"""--proxy-protocol: HTTP connections that start with a PROXY header (v1 text or
v2 binary, as HAProxy's send-proxy and AWS's NLB send them) give the app the
client's address; --proxy-allow-from limits who may send one."""

import ipaddress
import json
import re
import signal
import socket
import struct
import time

import front_ends
import pytest
from support import wait_until

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src: str, dst: str, sport: int, dport: int, command: int = 1) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if s.version == 4 else 0x21
    payload = s.packed + d.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(payload)) + payload


def _environ_on(conn) -> dict:
    conn.send_request("GET", "/environ", {"Host": "x"})
    resp = conn.read_response()
    assert resp.status == 200, resp.body[:500]
    return {k: v["value"] for k, v in json.loads(resp.body).items() if isinstance(v, dict)}


@pytest.fixture(scope="module")
def proxied(start_module_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("proxy") / "access.log"
    server = start_module_server(
        "behaviour:application",
        "--proxy-protocol",
        "--access-log",
        str(log),
        "--access-log-format",
        "%(h)s %(r)s %(s)s",
        threads=2,
    )
    server.access = log
    return server


def test_a_v1_header_names_the_client_for_every_request_of_the_connection(proxied):
    with proxied.connect() as conn:
        conn.send(b"PROXY TCP4 203.0.113.7 198.51.100.1 40001 443\r\n")
        for _ in range(2):
            env = _environ_on(conn)
            assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("203.0.113.7", "40001")
    assert wait_until(lambda: "203.0.113.7 GET /environ HTTP/1.1 200" in proxied.access.read_text())


def test_x_forwarded_proto_counts_for_the_socket_peer_not_the_named_client(proxied):
    """As gunicorn judges it: HAProxy in mode http on 127.0.0.1 with send-proxy sets
    the header for any client, so the trusted peer is the balancer."""
    with proxied.connect() as conn:
        conn.send(b"PROXY TCP4 203.0.113.7 198.51.100.1 40001 443\r\n")
        conn.send_request("GET", "/environ", {"Host": "x", "X-Forwarded-Proto": "https"})
        env = {k: v["value"] for k, v in json.loads(conn.read_response().body).items() if isinstance(v, dict)}
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("203.0.113.7", "https")


def test_a_v2_header_in_pieces_and_with_the_request_behind_it(proxied):
    header = v2_header("2001:db8::7", "2001:db8::1", 50000, 80)
    with proxied.connect() as conn:
        conn.send(header[:7])
        conn.send(header[7:] + b"GET /environ HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        env = {k: v["value"] for k, v in json.loads(resp.body).items() if isinstance(v, dict)}
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("2001:db8::7", "50000")
    # A balancer's own health check (LOCAL) names no client: the peer stays.
    with proxied.connect() as conn:
        conn.send(v2_header("192.0.2.1", "192.0.2.2", 1, 2, command=0))
        assert _environ_on(conn)["REMOTE_ADDR"] == "127.0.0.1"


def test_a_connection_without_a_header_is_served_as_it_is(proxied):
    with proxied.connect() as conn:
        env = _environ_on(conn)
        assert env["REMOTE_ADDR"] == "127.0.0.1"
        assert env["REMOTE_PORT"] == str(conn.sock.getsockname()[1])


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"PROXY TCP4 203.0.113.7 198.51.100.1 99999 443\r\n", "PROXY v1 address or port is malformed"),
        (b"PROXY TCP9 a b 1 2\r\n", "PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN"),
        (
            V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),
            "PROXY v2 address family or transport is not one the protocol defines",
        ),
    ],
)
def test_a_malformed_header_gets_400_and_a_log_line(proxied, header, why):
    mark = proxied.mark()
    with proxied.connect() as conn:
        conn.send(header + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 400
    proxied.wait_for(rf"Bad request from 127\.0\.0\.1:\d+: {why} \(400 Bad Request\)", since=mark)


@pytest.mark.parametrize(("family", "size"), [(0x31, 216), (0x12, 12)], ids=["unix", "udp"])
def test_a_v2_header_for_a_unix_or_udp_peer_stands_for_the_connection_itself(proxied, family, size):
    """A valid family the server does not use is taken as UNSPEC (the
    specification, 2.2): the request is served with the connection's own
    addresses, not refused."""
    with proxied.connect() as conn:
        conn.send(V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", size) + bytes(size))
        env = _environ_on(conn)
        assert env["REMOTE_ADDR"] == "127.0.0.1"
        assert env["REMOTE_PORT"] == str(conn.sock.getsockname()[1])


def test_a_header_from_a_peer_not_allowed_gets_403(start_server):
    server = start_server("behaviour:application", "--proxy-protocol", "--proxy-allow-from", "10.0.0.0/8")
    mark = server.mark()
    with server.connect() as conn:
        conn.send(
            b"PROXY TCP4 203.0.113.7 198.51.100.1 40001 443\r\nGET /environ HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert conn.read_response().status == 403
    server.wait_for(
        r"Bad request from 127\.0\.0\.1:\d+: a PROXY header from a peer not in --proxy-allow-from", since=mark
    )
    with server.connect() as conn:
        assert _environ_on(conn)["REMOTE_ADDR"] == "127.0.0.1"


@pytest.mark.parametrize(
    "client", [("192.0.2.7", "192.0.2.7"), ("2001:db8::7", "[2001:db8::7]")], ids=["v4", "v6"]
)
def test_log_lines_name_the_client_a_header_gave_on_a_unix_socket_and_ipv6_in_brackets(
    start_server, tmp_path, client
):
    """Over a unix socket the error log named only the socket, though the
    header had named the client; an IPv6 client and its port read as one
    longer address without brackets."""
    addr, shown = client
    sock = tmp_path / "pp.sock"
    server = start_server("behaviour:application", "--proxy-protocol", http=f"unix:{sock}")
    family = "TCP6" if ":" in addr else "TCP4"
    dst = "2001:db8::1" if ":" in addr else "198.51.100.1"
    mark = server.mark()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(f"PROXY {family} {addr} {dst} 56324 443\r\nGET / HTTP/9.9\r\nHost: x\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 505")
    server.wait_for(
        rf"Bad request from {re.escape(shown)}:56324 via unix:{re.escape(str(sock))}: ", since=mark
    )


def test_without_the_option_a_proxy_header_is_a_bad_request(start_server):
    server = start_server("behaviour:application")
    with server.connect() as conn:
        conn.send(b"PROXY TCP4 203.0.113.7 198.51.100.1 40001 443\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 400


@pytest.mark.skipif(not front_ends.available("haproxy"), reason="haproxy is not installed")
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy_in_tcp_mode_the_app_sees_the_client(start_server, tmp_path, send):
    """HAProxy balancing TCP (it sees no HTTP at all) with send-proxy / send-proxy-v2:
    REMOTE_PORT is the client's own port, not the one HAProxy connected from."""
    server = start_server("behaviour:application", "--proxy-protocol")
    port = front_ends.free_port()
    cfg = f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend lb
    bind 127.0.0.1:{port}
    default_backend corral
backend corral
    server s1 127.0.0.1:{server.port} {send}
"""
    fe = front_ends.haproxy(tmp_path / "haproxy", cfg, [port])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /environ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            client_port = sock.getsockname()[1]
    finally:
        fe.stop()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:300]
    env = {k: v["value"] for k, v in json.loads(body).items() if isinstance(v, dict)}
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("127.0.0.1", str(client_port))


def test_the_client_stays_with_a_connection_handed_to_a_new_worker(start_server):
    """A reload hands kept-alive connections to the new workers: the client a
    PROXY header named goes with them, and whose X-Forwarded-Proto counts is
    still judged on the socket's peer."""
    server = start_server("behaviour:application", "--proxy-protocol", workers=1)
    with server.connect() as conn:
        conn.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 40009 443\r\n")
        conn.send_request("GET", "/pid", {"Host": "x"})
        old = conn.read_response().body.decode()
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(rf"Worker stopped gracefully: pid={old}", since=mark)
        assert server.grep(rf"Worker handed 1 connection\(s\) to other workers: pid={old}", mark)
        conn.send_request("GET", "/environ", {"Host": "x", "X-Forwarded-Proto": "https"})
        resp = conn.read_response()
        env = {k: v["value"] for k, v in json.loads(resp.body).items() if isinstance(v, dict)}
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("203.0.113.9", "40009")
    # The peer is 127.0.0.1, which --forwarded-allow-ips trusts by default.
    assert env["wsgi.url_scheme"] == "https"


def test_a_header_that_comes_alone_while_the_worker_drains_is_followed_by_its_request(start_server):
    """HAProxy in mode tcp sends the header as it connects, apart from the
    client's bytes: a connection accepted as a stop begins is served, not
    closed because its buffer was empty again after the header."""
    server = start_server("behaviour:application", "--proxy-protocol", workers=1)
    with server.connect() as conn:
        mark = server.mark()
        server.signal(signal.SIGTERM)
        server.wait_for("Worker draining", since=mark)
        conn.send(b"PROXY TCP4 203.0.113.5 198.51.100.1 40005 443\r\n")
        time.sleep(0.3)
        conn.send_request("GET", "/environ", {"Host": "x"})
        resp = conn.read_response()
        assert resp.status == 200
        env = {k: v["value"] for k, v in json.loads(resp.body).items() if isinstance(v, dict)}
        assert env["REMOTE_ADDR"] == "203.0.113.5"
    assert server.wait_exit(20) == 0
