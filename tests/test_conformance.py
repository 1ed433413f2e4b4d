"""gunicorn's request-parsing vectors (tests/conformance/README.md), run against corral.

Every vector with nondefault_cfg false is sent raw on a fresh connection, which
is then half-closed; the test reads until the server closes it.
"""

import base64
import json

import pytest
from support import TESTS, IncompleteResponse, exchange, parse_responses

VECTORS = [
    json.loads(line) for line in (TESTS / "conformance" / "gunicorn-requests.jsonl").read_text().splitlines()
]
DEFAULT_VECTORS = [v for v in VECTORS if not v["nondefault_cfg"]]

# Policy decisions (see tests/conformance/README.md): corral rejects these with 400, like gunicorn 27.
REJECTED_BY_POLICY = {"valid/009.http", "valid/027.http"}
# Policy: 501 for what corral cannot serve as asked. A transfer-coding other than chunked
# (gzip, ...) is not decoded, and wsgi.input must be the decoded body, so RFC 9112 6.1's 501
# rather than gunicorn's passing the coded bytes on; and CONNECT asks for a tunnel, which a
# WSGI app cannot provide (RFC 9110 9.3.6), nor may a pipelined request after it be read.
NOT_IMPLEMENTED_BY_POLICY = {
    "valid/025.http",
    "valid/025_line.http",
    "valid/rfc9112_smuggle_gzip_chunked_01.http",
    "valid/rfc9112_target_authority_connect_01.http",
    "valid/rfc9112_target_authority_ipv6_01.http",
}
# Policy: a body cut short by the end of input (valid/099 declares 17914 bytes and sends 8599,
# then the client half-closes) is an error for the app's read, as under uWSGI and mod_wsgi,
# not a shorter body taken for a whole one (gunicorn hands the app the 8599 bytes); the
# client, which may still read, is told 400.
CUT_BODY = {"valid/099.http"}
# Incomplete requests: they only fail at end of input, and closing without an answer is fine.
INCOMPLETE = {"invalid/001.http", "invalid/rfc9112_chunked_missing_final_crlf_01.http"}
# What the README asks for beyond "some 4xx/5xx", by gunicorn's exception.
STATUS_BY_EXCEPTION = {"LimitRequestLine": 414, "LimitRequestHeaders": 431}


@pytest.fixture(scope="module")
def conformance_server(start_module_server):
    # gunicorn's request-line limit is 4094 and invalid/006 relies on it; corral's default is
    # 8190 (as in nginx), so this server runs with gunicorn's value.
    return start_module_server("echo_app:application", "--limit-request-line", "4094", threads=4)


def test_vector_counts():
    assert len(VECTORS) == 137
    accept = [v for v in DEFAULT_VECTORS if v["expect"] == "accept"]
    reject = [v for v in DEFAULT_VECTORS if v["expect"] == "reject"]
    assert (len(accept), len(reject)) == (50, 63)


def _describe(data):
    return f"received {len(data)} bytes: {data[:600]!r}"


@pytest.mark.parametrize("vector", DEFAULT_VECTORS, ids=[v["name"] for v in DEFAULT_VECTORS])
def test_vector(conformance_server, vector):
    raw = base64.b64decode(vector["raw"])
    name = vector["name"]
    data, closed = exchange(conformance_server.host, conformance_server.port, raw, timeout=5.0)
    try:
        responses = parse_responses(data)
    except IncompleteResponse as e:
        pytest.fail(f"unparseable response ({e}); {_describe(data)}")

    if name in NOT_IMPLEMENTED_BY_POLICY:
        assert closed and [r.status for r in responses] == [501], _describe(data)
        return

    if vector["expect"] == "reject" or name in REJECTED_BY_POLICY:
        assert closed, f"the server did not close the connection after rejecting; {_describe(data)}"
        assert all(not 200 <= r.status < 300 for r in responses), (
            f"a 2xx for a rejected request; {_describe(data)}"
        )
        if not responses:
            assert name in INCOMPLETE, f"no response at all to a complete invalid request; {_describe(data)}"
            return
        status = responses[0].status
        if name in REJECTED_BY_POLICY:
            assert status == 400, _describe(data)
        else:
            assert 400 <= status < 600, _describe(data)
            wanted = STATUS_BY_EXCEPTION.get(vector.get("expected_exc"))
            if wanted:
                assert status == wanted, _describe(data)
        return

    if name in CUT_BODY:
        assert closed and [r.status for r in responses] == [400], _describe(data)
        return

    expected = vector["expected"]
    assert closed, f"the server did not close the half-closed connection; {_describe(data)}"
    assert len(responses) == len(expected), _describe(data)
    for resp, exp in zip(responses, expected):
        assert 200 <= resp.status < 300, _describe(data)
        got = json.loads(resp.body)
        assert got["method"] == exp["method"]
        # The vectors' path is the decoded path as a str; PATH_INFO is the same decoded path
        # (latin-1 mapped bytes, which for these ASCII paths is the same str).
        assert got["path"] == exp["path"]
        assert got["query"] == exp["query"]
        assert base64.b64decode(got["body"]) == base64.b64decode(exp["body"])
    if name == "valid/040.http":
        # Header names with "_" are dropped, so they cannot pose as Transfer-Encoding/Content-Length.
        got = json.loads(responses[0].body)
        assert not any("TRANSFER" in k or k == "HTTP_CONTENT_LENGTH" for k in got["headers"]), got["headers"]
        assert got["content_length"] == "7"


def test_duplicate_headers_are_joined(conformance_server):
    raw = b"GET /stuff/here?foo=bar HTTP/1.0\r\nIf-Match: bazinga!\r\nIf-Match: large-sound\r\n\r\n"
    data, _ = exchange(conformance_server.host, conformance_server.port, raw)
    (resp,) = parse_responses(data)
    assert json.loads(resp.body)["headers"]["HTTP_IF_MATCH"] == "bazinga!,large-sound"
