"""SeededClientManager on its own: who each SuperNode is, and who is sampled."""

import pytest
from conftest import logged_warnings
from flwr.common import Code, GetPropertiesRes, Status

from flower_tutorial.client_manager import SeededClientManager

OK = Status(code=Code.OK, message="")


class _Proxy:
    """A node `cid` that says it holds partition `pid` of `num_partitions`."""

    def __init__(self, cid: str, pid: int, num_partitions: int = 10) -> None:
        self.cid = cid
        self.properties = {"partition-id": pid, "num-partitions": num_partitions}

    def get_properties(self, ins, timeout, group_id) -> GetPropertiesRes:
        return GetPropertiesRes(OK, self.properties)


def _manager(nodes: list[tuple[str, int]]) -> SeededClientManager:
    manager = SeededClientManager(timeout=5.0, seed=0)
    for cid, pid in nodes:
        manager.register(_Proxy(cid, pid))
    return manager


def test_two_supernodes_naming_one_partition_both_take_part_with_a_warning(caplog):
    manager = _manager([("node-b", 3), ("node-a", 3), ("node-c", 1)])
    sampled = manager.sample(num_clients=3, min_num_clients=3)
    assert sorted(proxy.cid for proxy in sampled) == ["node-a", "node-b", "node-c"]
    assert manager.unidentified == {}
    assert [manager.partition_id(c) for c in ("node-a", "node-b", "node-c")] == [
        3,
        3,
        1,
    ]
    assert logged_warnings(caplog) == [
        "node node-b says partition-id = 3, as node(s) node-a do: each takes part, "
        "and that partition counts once per node (check their node config).",
        "node node-a says partition-id = 3, as node(s) node-b do: each takes part, "
        "and that partition counts once per node (check their node config).",
    ]


def test_a_node_naming_the_partition_of_one_gone_is_not_warned_about(caplog):
    # A SuperNode that comes back under a new node ID names its old partition.
    manager = _manager([("node-old", 3), ("node-c", 1)])
    manager.sample(num_clients=2, min_num_clients=2)
    manager.unregister(manager.clients["node-old"])
    manager.register(_Proxy("node-new", 3))
    sampled = manager.sample(num_clients=2, min_num_clients=2)
    assert sorted(proxy.cid for proxy in sampled) == ["node-c", "node-new"]
    assert logged_warnings(caplog) == []


def test_a_node_that_cannot_say_who_it_is_costs_its_own_place_only():
    # At the tutorial's settings (all ten sampled, min-fit-clients = 10), one
    # node lies about its partition: the other nine are sampled, and its reason
    # says why the sample is one short.
    nodes = [(f"node-{pid}", pid) for pid in range(10)]
    manager = _manager(nodes)
    manager.clients["node-3"].properties["partition-id"] = "3"
    sampled = manager.sample(num_clients=10, min_num_clients=10)
    assert sorted(manager.partition_id(p.cid) for p in sampled) == [
        0,
        1,
        2,
        4,
        5,
        6,
        7,
        8,
        9,
    ]
    reason = "node node-3 left out: partition-id = '3', expected an integer"
    assert manager.unsampled() == [reason]
    assert manager.unsampled() == []  # told once per sample
    assert manager.unidentified == {"node-3": reason}
    # A sample that the liar does not leave short says nothing of it.
    assert len(manager.sample(num_clients=5, min_num_clients=5)) == 5
    assert manager.unsampled() == []


def test_a_lie_is_cut_to_a_readable_length():
    manager = _manager([("node-0", 0), ("node-1", 1)])
    manager.clients["node-1"].properties["partition-id"] = "1" * 10_000_000
    manager.sample(num_clients=2, min_num_clients=1)
    (reason,) = manager.unsampled()
    assert len(reason) < 250
    assert reason.endswith("(10,000,000 characters), expected an integer")


def test_the_run_ends_only_when_no_node_can_say_who_it_is():
    manager = _manager([("node-0", 0), ("node-1", 1)])
    for proxy in manager.clients.values():
        proxy.properties["num-partitions"] = None
    with pytest.raises(
        RuntimeError,
        match="All 2 SuperNodes failed when asked which partition they hold; "
        "the first said: node node-0 left out: num-partitions = None",
    ):
        manager.sample(num_clients=2, min_num_clients=1)
