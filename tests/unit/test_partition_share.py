"""Which dispatch node holds which partition (outbox/jetstream_leases.py): every node
works it out alike from the live nodes, the share is even, and a node joining or leaving
moves only its own share."""

from __future__ import annotations

import itertools

from outbox.jetstream_leases import node_id, shares

PARTITIONS = 16


def share(nodes: list[str]) -> dict[str, set[int]]:
    out = shares(nodes, PARTITIONS)
    assert sorted(p for parts in out.values() for p in parts) == list(range(PARTITIONS))
    return out


def test_every_node_gets_an_even_share_however_alike_their_names():
    # as node_id() names them on one host: the same name but for the pid and a few hex
    # digits (crc32, being linear, gave one of three such nodes nothing)
    for pids in itertools.combinations(range(21010, 21020), 3):
        nodes = [f"vm-{pid}-{pid * 7919 % 16**6:06x}" for pid in pids]
        assert sorted(len(parts) for parts in share(nodes).values()) == [5, 5, 6], nodes
    for n in (1, 2, 4, 5, 16, 20):
        sizes = sorted(len(parts) for parts in share([node_id() for _ in range(n)]).values())
        assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == PARTITIONS


def test_a_node_joining_or_leaving_moves_little_beyond_its_own_share():
    moved = []
    for i in range(100):  # (names fixed, so the figures are too)
        nodes = [f"host{i}-{pid}-{pid * 7919 % 16**6:06x}" for pid in range(3)]
        before = share(nodes)
        joined = share([*nodes, "newcomer"])
        moved.append(sum(len(before[n] - joined[n]) for n in nodes) - len(joined["newcomer"]))
        left = share(nodes[1:])
        moved.append(sum(len(before[n] - left[n]) for n in nodes[1:]))
    # (what moves between nodes that stay, besides what the newcomer takes or the
    # leaver leaves: a few at most, often none)
    assert max(moved) <= 4 and sum(moved) / len(moved) <= 2, moved


def test_every_node_works_out_the_same_share_whatever_order_it_lists_them_in():
    nodes = [node_id() for _ in range(4)]
    expected = shares(nodes, PARTITIONS)
    for order in itertools.permutations(nodes):
        assert shares(list(order), PARTITIONS) == expected
