"""config.py, golang.py, selfloop.py: endpoint normalisation, IPv6 formatting, Go durations,
the self-loop guard."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from etcdgw.config import (
    ConfigError,
    Endpoint,
    Listen,
    format_addr,
    parse_endpoint,
    parse_listen,
    split_host_port,
    strip_schema,
)
from etcdgw.golang import format_duration, parse_duration
from etcdgw.selfloop import check_self_loop


@pytest.mark.parametrize(
    ("host", "port", "want"),
    [
        # etcd's TestFormatAddr cases
        ("192.168.1.10", 2379, "192.168.1.10:2379"),
        ("::1", 2379, "[::1]:2379"),
        ("2001:db8::ff00:42:8329", 80, "[2001:db8::ff00:42:8329]:80"),
        ("m1.etcd.local", 2379, "m1.etcd.local:2379"),
    ],
)
def test_format_addr(host: str, port: int, want: str) -> None:
    assert format_addr(host, port) == want
    assert Endpoint(host, port).addr == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("127.0.0.1:2379", Endpoint("127.0.0.1", 2379)),
        ("http://localhost:20000", Endpoint("localhost", 20000)),
        ("https://m1.etcd.local:2379/some/path", Endpoint("m1.etcd.local", 2379, secure=True)),
        ("[::1]:2379", Endpoint("::1", 2379)),
        ("http://[fc00::ccf0]:2379", Endpoint("fc00::ccf0", 2379)),
    ],
)
def test_parse_endpoint(raw: str, want: Endpoint) -> None:
    assert parse_endpoint(raw) == want


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("infra0.example.com", 'error parsing endpoint "infra0.example.com"'),
        ("https://127.0.0.1", 'error parsing endpoint "https://127.0.0.1"'),
        ("fc00::1:2379", 'error parsing endpoint "fc00::1:2379"'),
        ("h:0", 'error parsing endpoint "h:0": port 0 out of range 1-65535'),
        ("h:70000", 'error parsing endpoint "h:70000": port 70000 out of range 1-65535'),
        ("h:2379abc", "error parsing endpoint \"h:2379abc\": invalid port '2379abc'"),
        (":2379", 'error parsing endpoint ":2379": missing host'),
    ],
)
def test_parse_endpoint_errors(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_endpoint(raw)
    assert ei.value.message == message
    assert ei.value.stream == "stdout"


def test_strip_schema_keeps_plain() -> None:
    assert strip_schema("127.0.0.1:2379") == "127.0.0.1:2379"
    assert strip_schema("unix://x") == "x"


def test_split_host_port_go_errors() -> None:
    with pytest.raises(ValueError, match="missing port"):
        split_host_port("h")
    with pytest.raises(ValueError, match="too many colons"):
        split_host_port("::1:2379")
    assert split_host_port("[::1]:1") == ("::1", "1")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:23790") == Listen("127.0.0.1", 23790)
    assert parse_listen("[::1]:23790") == Listen("::1", 23790)
    assert parse_listen(":23790") == Listen("", 23790)
    assert parse_listen("unix:///run/etcdgw.sock") == Listen(path="/run/etcdgw.sock")
    for bad in ("127.0.0.1", "x:y", "unix://relative"):
        with pytest.raises(ConfigError, match="failed to validate listen address"):
            parse_listen(bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1m0s", 60.0),
        ("1m", 60.0),
        ("1.5s", 1.5),
        ("300ms", 0.3),
        ("1h2m", 3720.0),
        ("0", 0.0),
        ("-1s", -1.0),
        ("2h45m30.5s", 9930.5),
        ("10us", 1e-5),
        (".5s", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("123", 'time: missing unit in duration "123"'),
        ("", 'time: invalid duration ""'),
        ("1x", 'time: unknown unit "x" in duration "1x"'),
        ("s", 'time: invalid duration "s"'),
        ("1m 2s", 'time: unknown unit "m " in duration "1m 2s"'),
        ("-", 'time: invalid duration "-"'),
    ],
)
def test_parse_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_duration(text)
    assert str(ei.value) == message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(60, "1m0s"), (1.5, "1.5s"), (0.3, "300ms"), (3720, "1h2m0s"), (300, "5m0s"), (0, "0s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


HOSTS = {
    "localhost": ["127.0.0.1", "::1"],
    "127.0.0.1": ["127.0.0.1"],
    "::1": ["::1"],
    "0.0.0.0": ["0.0.0.0"],
    "m1.etcd.test": ["127.0.0.1"],
    "elsewhere": ["192.0.2.7"],
}


def fake_resolve(host: str) -> list[str]:
    try:
        return HOSTS[host]
    except KeyError:
        raise OSError(f"lookup {host}: no such host") from None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "m1.etcd.test", "0.0.0.0"])
def test_self_loop_refused(host: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check_self_loop([Listen("127.0.0.1", 23790)], [Endpoint(host, 23790)], fake_resolve)
    assert "should not resolve to the gateway listen addr (127.0.0.1:23790)" in ei.value.message
    assert ei.value.message.startswith(f"SRV or endpoint ({format_addr(host, 23790)}->")


def test_self_loop_ipv6_and_wildcard() -> None:
    with pytest.raises(ConfigError):
        check_self_loop([Listen("::1", 23790)], [Endpoint("localhost", 23790)], fake_resolve)
    # A wildcard listener covers every local address (Go compares strings and misses this).
    with pytest.raises(ConfigError):
        check_self_loop([Listen("", 23790)], [Endpoint("127.0.0.1", 23790)], fake_resolve)
    # Other port, or a non-local address: fine.
    check_self_loop([Listen("127.0.0.1", 23790)], [Endpoint("127.0.0.1", 2379)], fake_resolve)
    check_self_loop([Listen("", 23790)], [Endpoint("elsewhere", 23790)], fake_resolve)


def test_unresolvable_hosts() -> None:
    with pytest.raises(ConfigError) as ei:
        check_self_loop([Listen("127.0.0.1", 23790)], [Endpoint("nope", 1)], fake_resolve)
    assert ei.value.message == "failed to resolve endpoint host: nope"
    with pytest.raises(ConfigError) as ei:
        check_self_loop([Listen("nolisten", 23790)], [], fake_resolve)
    assert ei.value.message == "failed to resolve listen host: nolisten"


# --- the schema (config.KEYS) and the config file reader --------------------------------------


@pytest.mark.parametrize(("text", "mode"), [("0660", 0o660), ("660", 0o660), ("0600", 0o600)])
def test_parse_mode_accepts_three_or_four_octal_digits(text: str, mode: int) -> None:
    from etcdgw.config import parse_mode

    assert parse_mode(text) == mode


@pytest.mark.parametrize(
    "text", ["0o777", " 0660", "0660 ", "0_660", "1777", "0778", "66", "٦٦٠", ""]
)
def test_parse_mode_refuses_other_spellings(text: str) -> None:
    from etcdgw.config import parse_mode

    with pytest.raises(ValueError, match="expected an octal mode"):
        parse_mode(text)


def test_every_key_default_parses_and_matches_config() -> None:
    """One definition per key: Config's defaults are the KEYS defaults, converted."""
    from etcdgw.config import KEYS, Config, convert

    cfg = Config()
    for key in KEYS:
        if key.default is not None:
            assert getattr(cfg, key.dest) == convert(key, key.default), key.name


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("٣s", "invalid duration"),  # Go accepts ASCII digits only
        ("2562048h", "invalid duration"),  # past Go's int64 nanoseconds
        ("1_0s", "unknown unit"),
    ],
)
def test_duration_refusals(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


def test_int_keys_are_strict() -> None:
    from etcdgw.config import KEY_BY_NAME, convert

    key = KEY_BY_NAME["health-rise"]
    assert convert(key, "3") == 3
    for bad in ("1_0", " 3", "٣", "3.0", "9" * 30):
        with pytest.raises(ValueError, match="invalid syntax"):
            convert(key, bad)
    with pytest.raises(ValueError, match="must be <= 1000000"):
        convert(key, "1000001")


def test_read_config_file_keeps_what_was_written(tmp_path: Path) -> None:
    from etcdgw.configfile import read_config_file

    p = tmp_path / "gw.yaml"
    p.write_text(
        "listen-unix-mode: 0660\nretry-delay: 1:30\ninsecure-discovery: yes\n"
        'metrics-addr:\ndiscovery-srv: ~\ntrusted-ca-file: ""\nendpoints: a:1,b:2\n'
        "listen-addr: [unix:///x, '127.0.0.1:1']\n"
    )
    assert read_config_file(str(p)) == {
        "listen-unix-mode": "0660",
        "retry-delay": "1:30",
        "insecure-discovery": "yes",
        "metrics-addr": None,
        "discovery-srv": None,
        "trusted-ca-file": "",
        "endpoints": "a:1,b:2",
        "listen-addr": ["unix:///x", "127.0.0.1:1"],
    }
    p.write_text("")
    assert read_config_file(str(p)) == {}
    p.write_text("# only a comment\n")
    assert read_config_file(str(p)) == {}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a: 1\n---\nb: 2\n", "expected one YAML document"),
        ("endpoints: [a:1, ~]\n", "endpoints: empty list item"),
        ("? [a]\n: 1\n", "keys must be flag names"),
        ("x: &a 1\ny: *a\n", "YAML aliases"),
        ("endpoints: [a\n", "YAML error at line 2"),
        ("just text\n", "expected a mapping"),
    ],
)
def test_read_config_file_refusals(tmp_path: Path, text: str, reason: str) -> None:
    from etcdgw.configfile import read_config_file

    p = tmp_path / "gw.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(reason)) as ei:
        read_config_file(str(p))
    assert ei.value.stream == "stderr" and "\n" not in ei.value.message
