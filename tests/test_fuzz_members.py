"""Hypothesis properties of parse_member_list: whatever a member answers, the result is
well-formed endpoints or the one documented error (ValueError), never anything else.

Three kinds of answers: etcd-shaped JSON (members with names, IDs, peer and client URLs,
learners, header.cluster_id) whose URLs mix valid and odd ones (IPv6 with zones, userinfo,
ports 0 and 65536, IDNA-invalid hosts, unix://, fresh schemes); the same shape with wrong
types anywhere (any JSON value in any field); and raw hostile bytes (deep nesting, huge
numbers, non-UTF-8, truncated documents). The run takes a few seconds; the example counts
grow with ETCDGW_MEMBER_EXAMPLES.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etcdgw.config import ConfigError, host_error, parse_endpoint
from etcdgw.membership import MAX_MEMBER_LIST, SOURCE, MemberList, parse_member_list

pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

EXAMPLES = int(os.environ.get("ETCDGW_MEMBER_EXAMPLES", "400"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- URLs -------------------------------------------------------------------------------------

hosts = st.one_of(
    st.sampled_from(
        [
            "127.0.0.1",
            "10.0.0.7",
            "etcd-0.etcd.default.svc",
            "m1.example",
            "localhost",
            "[::1]",
            "[fe80::1%25eth0]",  # a zone, as RFC 6874 escapes it
            "[fe80::1%eth0]",  # unescaped
            "[fe80::1%25]",  # an empty zone
            "[::1",  # unbalanced
            "a..b",  # IDNA: an empty label
            "a" * 64 + ".example",  # IDNA: a label over 63
            "x" * 260,  # over 253
            "ünïcødé.example",
            "xn--ls8h.example",
            "user:pw@m1.example",
            "@m1.example",
            "m1.example@evil",
            "",
            " m1.example",
            "m1\x00.example",
            "%41.example",
            "1.2.3.4.5",
            "[1.2.3.4]",
            "[::ffff:127.0.0.1]",
            "0.0.0.0",
            "[::]",
        ]
    ),
    st.text(max_size=30),
)
ports = st.one_of(
    st.sampled_from(["2379", "0", "1", "65535", "65536", "99999999999999999999", "", "+80"]),
    st.sampled_from([" 1", "0x10", "١٢", "2379/", "2379?x", "2379#f"]),
    st.integers(min_value=-5, max_value=70000).map(str),
)
schemes = st.one_of(
    st.sampled_from(["http", "https", "HTTP", "unix", "unixs", "grpc", "", "h ttp", "http+unix"]),
    st.from_regex(r"[a-z][a-z0-9+.-]{0,8}", fullmatch=True),
)


@st.composite
def urls(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=40))  # anything at all
    if kind == 1:
        return f"unix://{draw(st.text(max_size=20))}"
    port = draw(ports)
    sep = draw(st.sampled_from([":", ":", ":", "", "::"]))
    tail = draw(st.sampled_from(["", "", "/", "/v3", "?a=b", "#x"]))
    return f"{draw(schemes)}://{draw(hosts)}{sep}{port}{tail}"


# --- answers ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | urls(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
ids = st.integers(min_value=0, max_value=2**64 - 1).map(str)


@st.composite
def etcd_members(draw: st.DrawFn, hostile: bool) -> dict[str, Any]:
    """One member as etcd writes it (protobuf JSON leaves out false and empty fields);
    hostile: any field may be any JSON value."""
    m: dict[str, Any] = {"ID": draw(ids)}
    if draw(st.booleans()):
        m["name"] = draw(st.text(max_size=20))
    m["peerURLs"] = draw(st.lists(urls(), max_size=2))
    if draw(st.integers(0, 4)):
        m["clientURLs"] = draw(st.lists(urls(), max_size=4))
    if draw(st.integers(0, 3)) == 0:
        m["isLearner"] = True
    if hostile:
        keys = st.sampled_from(["ID", "name", "clientURLs", "isLearner"])
        for key in draw(st.lists(keys, max_size=2)):
            m[key] = draw(json_values)
    return m


@st.composite
def member_lists(draw: st.DrawFn, hostile: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "header": {
            "cluster_id": draw(ids),
            "member_id": draw(ids),
            "raft_term": draw(st.integers(0, 10**6).map(str)),
        },
        "members": draw(st.lists(etcd_members(hostile), max_size=6 if hostile else 8)),
    }
    if hostile:
        where = draw(st.sampled_from(["none", "header", "cluster_id", "members", "doc"]))
        if where == "header":
            doc["header"] = draw(json_values)
        elif where == "cluster_id":
            doc["header"]["cluster_id"] = draw(json_values)
        elif where == "members":
            doc["members"] = draw(json_values)
        elif where == "doc":
            return {"x": draw(json_values)}
    return doc


def hostile_bytes() -> st.SearchStrategy[bytes]:
    depth = st.integers(min_value=1, max_value=200_000)
    return st.one_of(
        st.binary(max_size=200),  # non-UTF-8 and garbage
        depth.map(
            lambda d: b'{"header":{"cluster_id":"1"},"members":' + b"[" * d + b"]" * d + b"}"
        ),
        depth.map(lambda d: b"{" + b'"a":{' * d + b"}" * d + b"}"),  # deep and truncated
        st.integers(1, 10_000).map(
            lambda n: b'{"header":{"cluster_id":' + b"9" * n + b'},"members":[]}'
        ),
        st.integers(1, 400).map(lambda n: b'{"header":{"cluster_id":"1e' + b"9" * n + b'"}}'),
        st.just(b'{"header":{"cluster_id":1e999},"members":[]}'),
        st.just(b'{"header":{"cluster_id":"1"},"members":[{"clientURLs":["http://a:1"]}]'),
        st.just(b"\xef\xbb\xbf" + json.dumps({"header": {"cluster_id": "1"}}).encode()),
        st.just('{"header":{"cluster_id":"1"}}'.encode("utf-16")),
        st.just(b'{"header":{"cluster_id":"1"},"members":[{"name":"\xff\xfe"}]}'),
        st.just(b'{"header":{"cluster_id":"1"},"members":[{"name":"\\ud800"}]}'),
        st.just(b" " * (MAX_MEMBER_LIST + 1)),
    )


# --- the property -------------------------------------------------------------------------------


def check(body: bytes) -> None:
    try:
        ml = parse_member_list(body)
    except ValueError as e:
        assert str(e), "a refusal says why"
        assert len(str(e)) < 2000, "and says it in one short line"
        return
    # Anything else than ValueError escapes the try and fails the example.
    assert isinstance(ml, MemberList)
    assert isinstance(ml.cluster_id, str) and ml.cluster_id
    seen = set()
    for ep in ml.endpoints:
        assert isinstance(ep.host, str) and ep.host and host_error(ep.host) is None, ep
        assert isinstance(ep.port, int) and 1 <= ep.port <= 65535, ep
        assert ep.priority == 0 and ep.weight == 0 and isinstance(ep.secure, bool)
        assert ep.source == SOURCE
        assert (ep.host, ep.port) not in seen, "no duplicates"
        seen.add((ep.host, ep.port))
        # What --endpoints would take from the same address is the same endpoint.
        try:
            again = parse_endpoint(ep.addr)
        except ConfigError as e:
            raise AssertionError(f"{ep.addr}: --endpoints refuses it: {e}") from None
        assert (again.host, again.port) == (ep.host, ep.port), (again, ep)
    for what, why in ml.skipped:
        assert isinstance(what, str) and isinstance(why, str) and why
        assert len(what) < 300 and len(why) < 300, "log-sized"


@SETTINGS
@given(doc=member_lists())
def test_etcd_shaped_answers(doc: dict[str, Any]) -> None:
    check(json.dumps(doc).encode())


@SETTINGS
@given(doc=member_lists(hostile=True))
def test_wrong_types_anywhere(doc: dict[str, Any]) -> None:
    check(json.dumps(doc).encode())


@SETTINGS
@given(body=hostile_bytes())
def test_hostile_bytes(body: bytes) -> None:
    check(body)


def test_the_odd_urls_are_all_tried() -> None:
    """The URL strategy reaches what the issue names: a sample is parsed both ways."""
    body = json.dumps(
        {
            "header": {"cluster_id": "1"},
            "members": [
                {
                    "ID": "1",
                    "clientURLs": [
                        "http://[fe80::1%25eth0]:2379",
                        "http://user:pw@m1.example:2379",
                        "http://m1.example:0",
                        "http://m1.example:65536",
                        "http://a..b:2379",
                        "unix://localhost:2379",
                    ],
                }
            ],
        }
    ).encode()
    ml = parse_member_list(body)
    assert [ep.addr for ep in ml.endpoints] == ["[fe80::1%eth0]:2379", "m1.example:2379"]
    assert len(ml.skipped) == 4
