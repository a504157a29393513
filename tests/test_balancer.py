"""balancer.py: round-robin, failover state, RFC 2782 priority/weight, endpoint refresh."""

from __future__ import annotations

from collections import Counter

from etcdgw.balancer import Balancer
from etcdgw.config import Endpoint

A, B, C = Endpoint("a", 1), Endpoint("b", 2), Endpoint("c", 3)


def picks(b: Balancer, n: int) -> list[str]:
    out = []
    for _ in range(n):
        r = b.pick()
        out.append(r.endpoint.host if r else "-")
    return out


def test_round_robin_in_list_order() -> None:
    assert picks(Balancer([A, B, C]), 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_duplicates_get_a_double_share() -> None:
    assert Counter(picks(Balancer([A, B, A]), 30)) == {"a": 20, "b": 10}


def test_inactive_skipped_and_counter_advances() -> None:
    b = Balancer([A, B, C])
    assert b.mark_down(b.remotes[1], "refused", now=1.0)
    assert not b.mark_down(b.remotes[1], "refused again", now=2.0)  # logged once
    assert b.remotes[1].dial_failures == 2
    assert b.remotes[1].down_since == 1.0
    assert picks(b, 4) == ["a", "c", "a", "c"]
    assert b.inactive() == [b.remotes[1]]
    assert b.mark_up(b.remotes[1]) and not b.mark_up(b.remotes[1])
    assert sorted(picks(b, 3)) == ["a", "b", "c"]


def test_all_down_gives_none_and_a_fallback_list() -> None:
    b = Balancer([A, B])
    for r in b.remotes:
        b.mark_down(r, "x", 0.0)
    assert b.pick() is None
    assert not b.any_usable()
    assert [r.endpoint for r in b.fallback()] == [A, B]


def test_unhealthy_is_not_picked() -> None:
    b = Balancer([A, B])
    assert b.set_healthy(b.remotes[0], False)
    assert picks(b, 3) == ["b", "b", "b"]


def srv(host: str, prio: int, weight: int) -> Endpoint:
    return Endpoint(host, 2379, priority=prio, weight=weight)


def test_lowest_priority_class_wins_even_with_weight_zero() -> None:
    # Go ignores priority when the records have weight 0 (round-robin over all); RFC 2782 not.
    b = Balancer([srv("p2", 2, 0), srv("p1", 1, 0), srv("p1b", 1, 0)])
    assert Counter(picks(b, 10)) == {"p1": 5, "p1b": 5}


def test_next_priority_takes_over_when_class_down() -> None:
    b = Balancer([srv("p1", 1, 10), srv("p2", 2, 10)])
    b.mark_down(b.remotes[0], "x", 0.0)
    assert picks(b, 3) == ["p2", "p2", "p2"]


def test_weights_proportional_not_off_by_one() -> None:
    # Go's pick: weights [1, 1] always give the first. RFC 2782: half and half.
    b = Balancer([srv("x", 0, 1), srv("y", 0, 1)], seed=7)
    got = Counter(picks(b, 4000))
    assert 1800 < got["x"] < 2200 and got["x"] + got["y"] == 4000
    b = Balancer([srv("x", 0, 30), srv("y", 0, 10)], seed=7)
    got = Counter(picks(b, 4000))
    assert 2800 < got["x"] < 3200


def test_weight_zero_gets_a_small_share() -> None:
    b = Balancer([srv("w", 0, 99), srv("z", 0, 0)], seed=3)
    got = Counter(picks(b, 20000))
    # 1 / (99 + 1) of the draws: about 200 of 20000.
    assert 100 < got["z"] < 320


def test_set_endpoints_keeps_state_and_flags_removed() -> None:
    b = Balancer([A, B])
    old_b = b.remotes[1]
    b.mark_down(old_b, "x", 0.0)
    old_a = b.remotes[0]
    added, removed = b.set_endpoints([B, C])
    assert [r.endpoint for r in added] == [C]
    assert removed == [old_a] and old_a.removed
    assert b.remotes[0] is old_b and not old_b.active  # state kept
    assert picks(b, 2) == ["c", "c"]
    assert old_a not in b.fallback()
