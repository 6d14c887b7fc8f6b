"""Pod annotations and usePodCidr as the plugin reads them: user input, validated with
Calico's error texts before any address is taken (no API server needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni_plugin.k8s import Pod, PodAdd, plan_addresses, with_pod_cidrs
from cni_plugin.netconf import NetConf
from cni_plugin.skel import Request
from cni_plugin.types import CNIError
from libcalico.datastore.k8s_client import KubeAccess, ServerURL

P = "cni.projectcalico.org/"


def conf(ipam: dict[str, Any] | None = None, **extra: Any) -> NetConf:
    return NetConf.load(
        {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "calico",
            "ipam": ipam or {"type": "calico-ipam", "ipv4_pools": ["netconf-pool"]},
            **extra,
        }
    )


def pod(annotations: dict[str, str], namespace: dict[str, str] | None = None) -> Pod:
    return Pod("web", "nginx", "uid-1", annotations, namespace or {})


def test_pod_pools_beat_namespace_pools_which_beat_the_netconf() -> None:
    assert plan_addresses(conf(), pod({})).ipam["ipv4_pools"] == ["netconf-pool"]
    ns = {P + "ipv4pools": '["ns-pool"]'}
    assert plan_addresses(conf(), pod({}, ns)).ipam["ipv4_pools"] == ["ns-pool"]
    mine = {P + "ipv4pools": '["10.9.0.0/24"]'}
    assert plan_addresses(conf(), pod(mine, ns)).ipam["ipv4_pools"] == ["10.9.0.0/24"]


def test_ip_families_set_both_assign_flags() -> None:
    plan = plan_addresses(conf(), pod({P + "ipFamilies": '["IPv6"]'}))
    assert (plan.ipam["assign_ipv4"], plan.ipam["assign_ipv6"]) == ("false", "true")


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({P + "ipv4pools": "pool-a"}, "failed to parse 'pool-a' as JSON"),
        ({P + "ipv4pools": '{"a": 1}'}, "must be a JSON array of strings"),
        ({P + "ipv4pools": '["fd00::/64"]'}, '"fd00::/64" isn\'t a IPv4 address'),
        ({P + "ipv6pools": '["Bad_Name"]'}, 'error parsing pool "Bad_Name"'),
        ({P + "ipFamilies": '["IPv4", "ipv6"]'}, "error parsing ipFamilies"),
        ({P + "ipAddrs": "[]"}, "specified but empty"),
        ({P + "ipAddrs": '["10.0.0.1/24"]'}, "invalid IP format: 10.0.0.1/24"),
        ({P + "ipAddrs": '["fd00::1", "fd00::2"]'}, "cannot have more than one IPv6 address"),
        (
            {P + "ipAddrs": '["10.0.0.1"]', P + "ipAddrsNoIpam": '["10.0.0.2"]'},
            "can't have both annotations",
        ),
        ({P + "ipAddrsNoIpam": '["10.0.0.2"]'}, "requested feature is not enabled"),
        ({P + "hwAddr": "01:00:5e:00:00:01"}, "is not a unicast MAC address"),
        ({P + "hwAddr": "zz:00:00:00:00:01"}, "is not a unicast MAC address"),
    ],
)
def test_bad_annotations_are_refused_with_a_config_error(
    annotations: dict[str, str], message: str
) -> None:
    with pytest.raises(CNIError) as err:
        plan_addresses(conf(), pod(annotations))
    assert err.value.code == 7
    assert message in err.value.msg


def test_fixed_addresses_need_calico_ipam() -> None:
    host_local = conf({"type": "host-local", "subnet": "10.0.0.0/24"})
    with pytest.raises(CNIError, match="needs ipam type calico-ipam"):
        plan_addresses(host_local, pod({P + "ipAddrs": '["10.0.0.5"]'}))


def test_ip_addrs_go_to_calico_ipam_as_one_ip_argument() -> None:
    plan = plan_addresses(conf(), pod({P + "ipAddrs": '["10.0.0.5", "fd00::5"]'}))
    req = Request(
        command="ADD",
        config={"name": "n", "ipam": {"type": "calico-ipam"}},
        environ={"CNI_ARGS": "K8S_POD_NAME=nginx"},
    )
    sent = PodAdd(client=None, plan=plan).ipam_request(req)  # type: ignore[arg-type]
    assert sent.environ["CNI_ARGS"] == "K8S_POD_NAME=nginx;IP=10.0.0.5,fd00::5"
    assert json.loads(sent.stdin)["ipam"] == plan.ipam
    assert req.environ["CNI_ARGS"] == "K8S_POD_NAME=nginx"  # the caller's request is untouched


def test_ip_addrs_no_ipam_with_the_feature_flag_skips_ipam() -> None:
    flagged = conf(feature_control={"ip_addrs_no_ipam": True})
    plan = plan_addresses(flagged, pod({P + "ipAddrsNoIpam": '["10.0.0.2", "fd00::2"]'}))
    assert [str(ip) for ip in plan.static] == ["10.0.0.2/32", "fd00::2/128"]


def test_use_pod_cidr_is_replaced_everywhere_and_other_keys_survive() -> None:
    ipam = {
        "type": "host-local",
        "subnet": "usePodCidr",
        "ranges": [[{"subnet": "usePodCIDRIPv6", "gateway": "fd00::1"}]],
        "dataDir": "/x",
        "somethingNew": {"kept": True},
    }
    out = with_pod_cidrs(ipam, {4: "10.244.1.0/24", 6: "fd00:1::/64"})
    assert out == {
        "type": "host-local",
        "subnet": "10.244.1.0/24",
        "ranges": [[{"subnet": "fd00:1::/64", "gateway": "fd00::1"}]],
        "dataDir": "/x",
        "somethingNew": {"kept": True},
    }
    assert ipam["subnet"] == "usePodCidr"  # a copy
    with pytest.raises(CNIError, match="usePodCidr found but there is no IPv4 CIDR configured"):
        with_pod_cidrs({"subnet": "usePodCidr"}, {6: "fd00:1::/64"})


def test_kubeconfig_overrides_and_api_root_suffix(tmp_path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://10.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"tokenFile": "token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    (tmp_path / "token").write_text("from-file\n")
    access = KubeAccess.resolve({"kubernetes": {"kubeconfig": str(kubeconfig)}}, {})
    assert (access.server, access.token) == ("https://10.0.0.1:6443", "from-file")
    legacy = {"kubeconfig": str(kubeconfig), "k8s_api_root": "https://10.0.0.2:443/api/v1/"}
    access = KubeAccess.resolve(
        {"kubernetes": {"kubeconfig": str(kubeconfig)}, "policy": legacy}, {}
    )
    assert access.server == "https://10.0.0.2:443"
    env = {"KUBECONFIG": str(kubeconfig), "K8S_API_TOKEN": "from-env"}
    assert KubeAccess.resolve({}, env).token == "from-env"


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("https://10.0.0.1:6443", ServerURL("https", "10.0.0.1", 6443)),
        ("https://[fd00::1]", ServerURL("https", "fd00::1", 443)),
        ("kube.example:8443/prefix/", ServerURL("https", "kube.example", 8443, "/prefix")),
    ],
)
def test_server_urls(url: str, parsed: ServerURL) -> None:
    assert ServerURL.parse(url) == parsed
