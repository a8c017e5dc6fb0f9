"""SeededClientManager on its own: who each SuperNode is, and who is sampled."""

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
