"""Result conversion between the seven spec versions, as libcni converts."""

from __future__ import annotations

import ipaddress

import pytest

from cni_plugin.types import (
    DNS,
    SUPPORTED_VERSIONS,
    CNIError,
    Interface,
    IPConfig,
    Result,
    Route,
    parse_result,
)


def dual_stack_result() -> Result:
    return Result(
        interfaces=[
            Interface("cali12345678901", mac="ee:ee:ee:ee:ee:ee"),
            Interface("eth0", mac="0a:58:0a:f4:00:05", mtu=1450, sandbox="/var/run/netns/p"),
        ],
        ips=[
            IPConfig(ipaddress.ip_interface("10.244.0.5/32"), interface=1),
            IPConfig(ipaddress.ip_interface("10.244.0.6/32"), interface=1),
            IPConfig(ipaddress.ip_interface("fd00::5/128"), interface=1),
        ],
        routes=[
            Route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("169.254.1.1")),
            Route(ipaddress.ip_network("::/0"), ipaddress.ip_address("fe80::ecee:eeff:feee:eeee")),
        ],
        dns=DNS(nameservers=["10.96.0.10"], search=["svc.cluster.local"]),
    )


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_current_shape(version: str) -> None:
    doc = dual_stack_result().to_version(version)
    assert doc["cniVersion"] == version
    assert doc["interfaces"][1] == {
        "name": "eth0",
        "mac": "0a:58:0a:f4:00:05",
        "mtu": 1450,
        "sandbox": "/var/run/netns/p",
    }
    assert doc["ips"][0] == {"interface": 1, "address": "10.244.0.5/32"}
    assert doc["dns"] == {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_040_adds_ip_version_and_drops_new_interface_fields(version: str) -> None:
    doc = dual_stack_result().to_version(version)
    assert [ip["version"] for ip in doc["ips"]] == ["4", "4", "6"]
    assert "mtu" not in doc["interfaces"][1]


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_020_keeps_first_address_of_each_family_and_routes_by_family(version: str) -> None:
    doc = dual_stack_result().to_version(version)
    assert set(doc) == {"cniVersion", "ip4", "ip6", "dns"}
    assert doc["ip4"] == {
        "ip": "10.244.0.5/32",
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
    }
    assert doc["ip6"]["routes"] == [{"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"}]


def test_020_without_addresses_cannot_convert() -> None:
    with pytest.raises(CNIError, match="cannot convert: no valid IP addresses"):
        Result().to_version("0.2.0")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_round_trip_through_every_version(version: str) -> None:
    original = dual_stack_result()
    again = parse_result(original.to_version(version), version)
    assert again.to_version(version) == original.to_version(version)


def test_route_fields_of_1_1_0_survive() -> None:
    result = Result(
        ips=[IPConfig(ipaddress.ip_interface("10.0.0.2/32"))],
        routes=[
            Route(
                ipaddress.ip_network("10.1.0.0/16"),
                mtu=1400,
                advmss=1360,
                priority=5,
                table=100,
                scope=253,
            )
        ],
    )
    route = result.to_version("1.1.0")["routes"][0]
    assert route == {
        "dst": "10.1.0.0/16",
        "mtu": 1400,
        "advmss": 1360,
        "priority": 5,
        "table": 100,
        "scope": 253,
    }


@pytest.mark.parametrize("bad", [[], {"ips": [{"address": "not-an-ip"}]}, {"ips": [{}]}])
def test_unparseable_result_is_a_decode_error(bad) -> None:
    with pytest.raises(CNIError) as err:
        parse_result(bad, "1.0.0")
    assert err.value.code == 6
