"""The rules an allocation is judged by (kube-controllers' allocationIsValid): in use until
proven otherwise."""

from __future__ import annotations

from ipam_plugin.leaks import Allocation, unused_allocations, why_unused
from libcalico.workloads import PodRecord, Snapshot


def allocation(pod: str = "web", node: str = "node1", kind: str = "") -> Allocation:
    namespace = "default" if pod else ""
    return Allocation("10.244.0.5", "10.244.0.0/26", "h", node, namespace, pod, kind)


def pod(node: str = "node1", reported: tuple[str, ...] = (), annotated: tuple[str, ...] = ()):
    return PodRecord("default", "web", node, frozenset(reported), frozenset(annotated))


def test_a_pod_that_is_gone_or_moved_no_longer_uses_its_address() -> None:
    assert why_unused(allocation(), None, True) == "pod default/web no longer exists"
    moved = why_unused(allocation(), pod(node="node2", reported=("10.244.0.5",)), True)
    assert moved == "pod default/web now runs on node node2"


def test_a_pod_reporting_other_addresses_no_longer_uses_this_one() -> None:
    assert why_unused(allocation(), pod(reported=("10.244.0.9",)), True) == (
        "pod default/web holds other addresses"
    )
    # The CNI's annotation counts as holding it, as in Calico's pod-to-endpoint conversion.
    held = pod(reported=("10.244.0.9",), annotated=("10.244.0.5",))
    assert why_unused(allocation(), held, True) is None


def test_in_use_until_proven_otherwise() -> None:
    assert why_unused(allocation(), pod(), True) is None  # no address reported yet
    assert why_unused(allocation(), pod(reported=("10.244.0.5",)), True) is None
    assert why_unused(allocation(pod=""), None, False) is None  # no owner recorded


def test_tunnel_addresses_belong_to_their_node() -> None:
    tunnel = allocation(pod="", kind="vxlanTunnelAddress")
    assert why_unused(tunnel, None, True) is None
    assert why_unused(tunnel, None, False) == "node node1 no longer exists"


def test_a_snapshot_marks_the_unused_whose_node_is_gone() -> None:
    found = [allocation(), allocation(pod="api", node="node2")]
    snapshot = Snapshot({("default", "web"): pod(reported=("10.244.0.5",))}, {"node1"})
    [unused] = unused_allocations(found, snapshot)
    assert unused.allocation.pod == "api" and unused.node_gone


def test_pod_records_read_status_and_annotations() -> None:
    record = PodRecord.from_pod(
        {
            "metadata": {
                "namespace": "default",
                "name": "web",
                "annotations": {"cni.projectcalico.org/podIPs": "10.244.0.5/32,fd00::5/128"},
            },
            "spec": {"nodeName": "node1"},
            "status": {"podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00::5"}]},
        }
    )
    assert record.node == "node1"
    assert record.reported_ips == record.annotated_ips == {"10.244.0.5", "fd00::5"}
