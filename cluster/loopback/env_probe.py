"""Check that a job's runtime env reaches its driver and a task on every node with CPUs.

    python cluster/loopback/env_probe.py NAME=VALUE     (as a `ray job submit` entrypoint)

Exit 1 naming the process and the value it saw otherwise. A node's ~/.bashrc that sets NAME (Ray
sources it again for every worker process it starts on a node set up over SSH) would override
the job's value: the loopback run checks that cluster/local.yaml's setup no longer does that.
"""

import os
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=1)
def _value_on_node(name: str) -> tuple[str, str | None]:
    return ray.get_runtime_context().get_node_id(), os.environ.get(name)


def main() -> int:
    name, _, want = sys.argv[1].partition("=")
    ray.init(address="auto", logging_level="ERROR")
    seen = {"driver": os.environ.get(name)}
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    refs = [
        _value_on_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(name)
        for n in nodes
    ]
    for node_id, value in ray.get(refs, timeout=300):
        seen[f"task on node {node_id[:8]}"] = value
    ray.shutdown()
    wrong = {who: value for who, value in seen.items() if value != want}
    for who, value in seen.items():
        print(f"env_probe: {who}: {name}={value}")
    if not nodes or wrong:
        print(f"env_probe: FAIL: {name} should be {want} in the driver and on every node")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
