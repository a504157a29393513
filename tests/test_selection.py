"""The selection rule is written twice: balancer.Selector (the specification, used by the loop)
and _pick.pxi (its C copy, used by the relay thread's native accept). These properties feed
both the same targets, priorities, weights, usable flags and seeds and demand the same
choices, so neither can drift (issue: one owner per decision). The C copy runs through the
path production runs (Engine.set_targets, then Engine.pick, also as a Balancer's delegate)
and, for live counts the test cannot make without connections, through pick_sequence, which
shares set_targets' helpers (_plain, the seed)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etcdgw.balancer import Balancer, Selector
from etcdgw.config import Endpoint
from etcdgw.engine import RelaySettings, Target

pytestmark = pytest.mark.c_extension

U64 = st.integers(0, (1 << 64) - 1)

Row = tuple[int, int, bool, int]

# (priority, weight, usable, live): small ranges so that classes, ties and weight-0 records
# occur.
LIVE = st.integers(0, 5)
rows = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6), st.booleans(), LIVE), max_size=9)
plain_rows = st.lists(st.tuples(st.just(0), st.just(0), st.booleans(), LIVE), max_size=9)


# Without live counts: the production path's targets have live counts only from connections.
rows0 = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 6), st.booleans(), st.just(0)), max_size=9
)
plain_rows0 = st.lists(st.tuples(st.just(0), st.just(0), st.booleans(), st.just(0)), max_size=9)


def as_targets(rows_: list[Row], base: int = 100) -> list[Target]:
    """Targets as accept.NativeAccept.sync() gives them (no address: pick() needs none)."""
    return [
        Target(base + i, socket.AF_INET, None, 2379, p, w, u)
        for i, (p, w, u, _) in enumerate(rows_)
    ]


def c_sequence(targets: list[Row], rr: int, rng: int, n: int, least: bool = False) -> list[int]:
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    return list(_relay.pick_sequence(targets, rr, rng, n, least))


def py_sequence(targets: list[Row], rr: int, rng: int, n: int, least: bool = False) -> list[int]:
    sel = Selector(seed=rng, rr=rr, least=least)
    return [sel.pick(targets) for _ in range(n)]


@settings(max_examples=400, deadline=None)
@given(targets=rows | plain_rows, rr=U64, rng=U64, n=st.integers(1, 40), least=st.booleans())
def test_c_and_python_choose_the_same(
    targets: list[Row], rr: int, rng: int, n: int, least: bool
) -> None:
    assert c_sequence(targets, rr, rng, n, least) == py_sequence(targets, rr, rng, n, least)


@settings(max_examples=200, deadline=None)
@given(targets=rows | plain_rows, rr=U64, n=st.integers(1, 60))
def test_least_connections_as_connections_accumulate(targets: list[Row], rr: int, n: int) -> None:
    """Each choice adds a connection to the chosen target, as a real client would: both
    copies still agree step by step (the counts fed back are the same)."""
    py = list(targets)
    sel = Selector(rr=rr, least=True)
    state = rr
    for _ in range(n):
        rows_now = list(py)
        want = sel.pick(rows_now)
        assert c_sequence(rows_now, state, 1, 1, True) == [want]
        state = sel.rr
        if want >= 0:
            p, w, u, live = py[want]
            py[want] = (p, w, u, live + 1)


@settings(max_examples=100, deadline=None)
@given(
    phases=st.lists(st.tuples(rows, st.integers(1, 15)), min_size=1, max_size=5),
    rng=U64,
)
def test_same_choices_when_usable_flags_change_between_picks(
    phases: list[tuple[list[Row], int]], rng: int
) -> None:
    """The state (counter, generator) carries over when the targets change, as it does when
    an endpoint goes down or a refresh replaces the list while clients keep coming."""
    sel = Selector(seed=rng)
    got_py: list[int] = []
    got_c: list[int] = []
    rr, state = 0, sel.rng
    for targets, n in phases:
        got_py += [sel.pick(targets) for _ in range(n)]
        # The C copy starts from the state the Python one had before this phase.
        got_c += c_sequence(targets, rr, state, n)
        # Advance the reference state the C copy must continue from.
        rr, state = sel.rr, sel.rng
    assert got_c == got_py


def test_edge_cases_agree() -> None:
    cases: list[list[Row]] = [
        [],
        [(0, 0, False, 0)] * 3,
        [(1, 0, True, 0), (0, 0, False, 0)],  # priority honoured even with weight 0 (RFC 2782)
        [(0, 5, False, 0), (1, 1, True, 0)],  # the next class takes over
        [(0, 0, True, 0), (0, 7, True, 0)],  # weight-0 record with a small share
        [(2, 3, True, 1), (2, 3, True, 0), (2, 0, True, 0), (2, 0, True, 4)],
    ]
    for targets in cases:
        for seed in (1, 7, 12345, (1 << 64) - 1):
            for least in (False, True):
                assert c_sequence(targets, 0, seed, 200, least) == py_sequence(
                    targets, 0, seed, 200, least
                )


def test_least_connections_fills_the_emptiest_and_follows_weights() -> None:
    # A member back from a restart with 0 of 30 connections gets the next ones.
    sel = Selector(least=True)
    live = [15, 15, 0]
    got = []
    for _ in range(9):
        i = sel.pick([(0, 0, True, n) for n in live])
        got.append(i)
        live[i] += 1
    assert got == [2] * 9
    # SRV weights 1:2:3: 60 connections split 10:20:30.
    live = [0, 0, 0]
    for _ in range(60):
        i = sel.pick([(0, w, True, n) for w, n in zip((1, 2, 3), live, strict=True)])
        live[i] += 1
    assert live == [10, 20, 30]


def test_balancer_pick_is_the_selector() -> None:
    """Balancer.pick() is Selector.pick() over its remotes: one rule, not a third copy."""
    eps = [
        Endpoint("a", 1, priority=0, weight=3),
        Endpoint("b", 2, priority=0, weight=1),
        Endpoint("c", 3, priority=1, weight=0),
    ]
    b = Balancer(eps, seed=99)
    b.mark_down(b.remotes[1], "x", 0.0)
    sel = Selector(seed=99)
    view = [(ep.priority, ep.weight, ep.host != "b", 0) for ep in eps]
    for _ in range(100):
        r = b.pick()
        i = sel.pick(view)
        assert r is b.remotes[i]


# -- the path production runs: Engine.set_targets + Engine.pick --


@settings(max_examples=200, deadline=None)
@given(
    phases=st.lists(
        st.tuples(rows0 | plain_rows0, st.integers(1, 15), st.booleans()), min_size=1, max_size=4
    )
)
def test_the_engine_chooses_as_the_selector(phases: list[tuple[list[Row], int, bool]]) -> None:
    """A threaded engine told its targets by set_targets() picks what Selector picks from the
    same counter and generator state, across target changes (usable flags, lists, rules)."""
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    e = _relay.Engine()
    try:
        rr, rng = e._selection_state()
        sel = Selector(seed=rng, rr=rr)
        for targets, n, least in phases:
            e.set_targets(as_targets(targets), RelaySettings(least=least))
            sel.least = least
            got = [e.pick() for _ in range(n)]
            want = [sel.pick(targets) for _ in range(n)]
            assert got == [100 + i if i >= 0 else -1 for i in want]
        assert e._selection_state() == (sel.rr, sel.rng)
    finally:
        e.close()


def test_a_balancer_with_the_engine_as_delegate_picks_as_without() -> None:
    """Native accept's wiring: the balancer asks the engine (delegate), which was told the
    balancer's remotes; it picks the remotes a balancer on its own would."""
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    eps = [
        Endpoint("a", 1, priority=0, weight=3),
        Endpoint("b", 2, priority=0, weight=1),
        Endpoint("c", 3, priority=0, weight=0),
        Endpoint("d", 4, priority=1, weight=5),
    ]
    e = _relay.Engine()
    try:
        rr, rng = e._selection_state()
        native, alone = Balancer(eps, seed=rng), Balancer(eps, seed=rng)
        native.selector.rr = alone.selector.rr = rr

        def tell() -> None:
            e.set_targets(
                [
                    Target(r.tag, socket.AF_INET, None, r.endpoint.port, r.endpoint.priority,
                           r.endpoint.weight, r.usable)
                    for r in native.remotes
                ],
                RelaySettings(),
            )  # fmt: skip

        tell()
        native.delegate = e.pick
        for step in range(300):
            if step == 100:  # one goes down, then the whole class: the next class takes over
                for b in (native, alone):
                    b.mark_down(b.remotes[0], "x", 0.0)
                tell()
            if step == 200:
                for b in (native, alone):
                    for r in b.remotes[:3]:
                        b.mark_down(r, "x", 0.0)
                tell()
            got, want = native.pick(), alone.pick()
            assert got is not None and want is not None
            assert native.remotes.index(got) == alone.remotes.index(want), step
    finally:
        e.close()
