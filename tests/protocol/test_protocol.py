"""The CNI protocol contract, black-box against the built executables (no netns needed).

Each case asserts the exit code, the error code and message on stdout, and that no
traceback reaches the runtime.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.harness import ALL_VERSIONS, CNIResult, bin_dir, run_plugin, version_tuple

NETCONF: dict[str, Any] = {
    "name": "k8s-pod-network",
    "type": "calico",
    "nodename": "node1",
    "ipam": {"type": "host-local", "subnet": "10.88.0.0/24", "dataDir": "/nonexistent/ipam"},
}
BINARIES = ("calico", "calico-ipam")


def conf_for(version: str, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, **NETCONF, **extra}


def invoke(env: dict[str, str], conf: Any, binary: str = "calico") -> CNIResult:
    return run_plugin([str(bin_dir() / binary)], env, conf)


def base_env(command: str, **extra: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "ctr1",
        "CNI_NETNS": "/var/run/netns/does-not-matter",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def assert_error(result: CNIResult, code: int, msg: str, version: str | None = None) -> dict:
    assert result.code != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    doc = result.json
    assert doc["code"] == code, result
    assert doc["msg"] == msg or doc["msg"].startswith(msg), result
    if version:
        assert doc["cniVersion"] == version
    return doc


@pytest.mark.parametrize("binary", BINARIES)
def test_version_without_stdin_lists_all_seven(binary: str) -> None:
    result = invoke({"CNI_COMMAND": "VERSION"}, None, binary)
    assert result.code == 0, result
    assert result.json == {"cniVersion": "1.1.0", "supportedVersions": list(ALL_VERSIONS)}


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("binary", BINARIES)
def test_version_echoes_config_version(binary: str, version: str) -> None:
    # What libcni sends when it probes: dummy values in the other variables.
    env = {
        "CNI_COMMAND": "VERSION",
        "CNI_NETNS": "dummy",
        "CNI_IFNAME": "dummy",
        "CNI_PATH": "dummy",
    }
    result = invoke(env, {"cniVersion": version}, binary)
    assert result.code == 0, result
    assert result.json == {"cniVersion": version, "supportedVersions": list(ALL_VERSIONS)}


@pytest.mark.parametrize("binary", BINARIES)
def test_unknown_command(binary: str) -> None:
    result = invoke(base_env("FROB"), conf_for("1.0.0"), binary)
    assert_error(result, 4, "unknown CNI_COMMAND: FROB")


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("ADD", "CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH"),
        ("CHECK", "CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH"),
        ("DEL", "CNI_CONTAINERID,CNI_IFNAME,CNI_PATH"),
        ("STATUS", "CNI_PATH"),
        ("GC", "CNI_PATH"),
    ],
)
@pytest.mark.parametrize("binary", BINARIES)
def test_required_variables_matrix(binary: str, command: str, missing: str) -> None:
    # libcni sets every variable, empty when absent: empty counts as unset.
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "", "CNI_NETNS": "", "CNI_IFNAME": ""}
    result = invoke(env, conf_for("1.1.0"), binary)
    assert_error(result, 4, f"required env variables [{missing}] missing")


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize(
    ("env", "code", "msg"),
    [
        ({"CNI_CONTAINERID": "-bad"}, 4, "invalid characters in containerID"),
        ({"CNI_CONTAINERID": "a b"}, 4, "invalid characters in containerID"),
        ({"CNI_IFNAME": "eth0123456789012"}, 4, "interface name is too long"),
        ({"CNI_IFNAME": ".."}, 4, "interface name is . or .."),
        ({"CNI_IFNAME": "eth/0"}, 4, "interface name contains / or : or whitespace characters"),
        ({"CNI_IFNAME": "eth 0"}, 4, "interface name contains / or : or whitespace characters"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, 4, 'ARGS: invalid pair "K8S_POD_NAME"'),
        ({"CNI_ARGS": "A=1;"}, 4, 'ARGS: invalid pair ""'),
    ],
)
def test_invalid_environment(version: str, env: dict[str, str], code: int, msg: str) -> None:
    for command in ("ADD", "DEL"):
        result = invoke(base_env(command, **env), conf_for(version))
        assert_error(result, code, msg)


@pytest.mark.parametrize("binary", BINARIES)
@pytest.mark.parametrize("stdin", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json(binary: str, stdin: bytes) -> None:
    assert_error(invoke(base_env("ADD"), stdin, binary), 6, "error unmarshall network config")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_network_name_rules(version: str) -> None:
    missing = {k: v for k, v in conf_for(version).items() if k != "name"}
    assert_error(invoke(base_env("ADD"), missing), 7, "missing network name", version)
    bad = conf_for(version, name="bad name!")
    assert_error(invoke(base_env("ADD"), bad), 7, "invalid characters found in network name")


@pytest.mark.parametrize("binary", BINARIES)
@pytest.mark.parametrize("version", ["0.5.0", "2.0.0", "1.1.1"])
def test_unsupported_version(binary: str, version: str) -> None:
    doc = assert_error(
        invoke(base_env("ADD"), conf_for(version), binary), 1, "incompatible CNI versions"
    )
    assert version in doc["details"] and "1.1.0" in doc["details"]


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("binary", BINARIES)
def test_version_gates(binary: str, version: str) -> None:
    for command, minimum in (("CHECK", "0.4.0"), ("STATUS", "1.1.0"), ("GC", "1.1.0")):
        if version_tuple(version) >= version_tuple(minimum):
            continue
        result = invoke(base_env(command), conf_for(version), binary)
        assert_error(result, 1, f"config version does not allow {command}", version)


def test_config_without_version_is_0_1_0() -> None:
    conf = dict(NETCONF)
    result = invoke(base_env("CHECK"), conf)
    assert_error(result, 1, "config version does not allow CHECK", "0.1.0")


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"mtu": "1500"}, "mtu"),
        ({"mtu": -1}, "mtu"),
        ({"ipam": {"subnet": "10.0.0.0/8"}}, "ipam"),
        ({"ipam": {"type": "../../bin/sh"}}, "ipam.type"),
        ({"nodename_file_optional": "yes"}, "nodename_file_optional"),
        ({"datastore_type": "zookeeper"}, "datastore_type"),
        (
            {"container_settings": {"allow_ip_forwarding": 1}},
            "container_settings.allow_ip_forwarding",
        ),
    ],
)
def test_invalid_config_names_the_key(version: str, change: dict, where: str) -> None:
    doc = assert_error(
        invoke(base_env("ADD"), conf_for(version, **change)), 7, "invalid network config"
    )
    assert f": {where}:" in doc["msg"], doc


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_keys_match_case_insensitively_like_go(version: str) -> None:
    """Go's encoding/json matches `MTU` to `mtu`: a bad value is caught under either spelling."""
    conf = conf_for(version)
    conf["MTU"] = "big"
    doc = assert_error(invoke(base_env("ADD"), conf), 7, "invalid network config")
    assert ": mtu:" in doc["msg"]


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_own_netns_is_refused_unless_overridden(version: str) -> None:
    env = base_env("ADD", CNI_NETNS=f"/proc/{os.getpid()}/ns/net")
    doc = assert_error(invoke(env, conf_for(version)), 8, "netns must not be the plugin's own")
    assert "CNI_NETNS_OVERRIDE" in doc["details"]


def test_admin_cli_without_cni_command() -> None:
    result = run_plugin([str(bin_dir() / "calico"), "version"], {}, None)
    assert result.code == 0 and "1.1.0" in result.stdout, result


def test_version_json_is_one_line() -> None:
    result = invoke({"CNI_COMMAND": "VERSION"}, None)
    assert result.stdout.count("\n") == 1
    json.loads(result.stdout)
