"""host-local behaviours (cni-spec.md §7.3 items 14-22) of the range allocator library."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam_plugin.ranges import (
    DuplicateAllocation,
    LockTimeout,
    RangeConfigError,
    RangeExhausted,
    RangeSet,
    RangeStore,
    RangeStoreError,
    RequestedIPUnavailable,
    allocate,
    find,
    gc,
    list_attachments,
    parse_ranges,
    release,
)

ip = ipaddress.ip_address


def exactly(message: str) -> str:
    """A pytest `match` pattern accepting only this whole message."""
    return f"^{re.escape(message)}$"


def sets(*raw_sets: list[dict], version: str = "1.0.0") -> list[RangeSet]:
    return parse_ranges({"type": "calico-ipam", "ranges": list(raw_sets)}, None, version)


def subnet(cidr: str, **extra: str) -> dict:
    return {"subnet": cidr, **extra}


@pytest.fixture
def store(tmp_path: Path) -> RangeStore:
    return RangeStore(tmp_path, "mynet")


def addresses(allocations) -> list[str]:
    return [str(a.address) for a in allocations]


def ip_files(store: RangeStore) -> list[str]:
    names = os.listdir(store.directory)
    return sorted(n for n in names if n != "lock" and not n.startswith("last_reserved_ip."))


def test_dual_stack_add_gives_dot2_in_first_range_with_gateways(store):
    range_sets = sets([subnet("10.1.2.0/24"), subnet("10.2.2.0/24")], [subnet("2001:db8:1::/64")])
    got = allocate(store, range_sets, "dummy", "eth0", [])
    assert addresses(got) == ["10.1.2.2/24", "2001:db8:1::2/64"]
    assert [str(a.gateway) for a in got] == ["10.1.2.1", "2001:db8:1::1"]
    assert [a.range_set_index for a in got] == [0, 1]


def test_on_disk_format_is_host_locals(store):
    range_sets = sets([subnet("10.1.2.0/24")], [subnet("2001:db8:1::/64")])
    allocate(store, range_sets, "dummy", "eth0", [])
    directory = store.directory
    assert (directory / "10.1.2.2").read_bytes() == b"dummy\r\neth0"
    assert (directory / "2001:db8:1::2").read_bytes() == b"dummy\r\neth0"
    assert (directory / "last_reserved_ip.0").read_bytes() == b"10.1.2.2"
    assert (directory / "last_reserved_ip.1").read_bytes() == b"2001:db8:1::2"
    assert (directory / "lock").read_bytes() == b""
    for name in ("10.1.2.2", "last_reserved_ip.0"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755


def test_release_removes_the_ip_files_and_keeps_round_robin_state(store):
    range_sets = sets([subnet("10.1.2.0/24")], [subnet("2001:db8:1::/64")])
    allocate(store, range_sets, "dummy", "eth0", [])
    assert release(store, "dummy", "eth0") == 2
    assert ip_files(store) == []
    assert sorted(os.listdir(store.directory)) == [
        "last_reserved_ip.0",
        "last_reserved_ip.1",
        "lock",
    ]


def test_one_container_with_two_ifnames_gets_two_ips_and_del_releases_one(store):
    range_sets = sets([subnet("10.1.2.0/24")])
    assert addresses(allocate(store, range_sets, "dummy", "eth0", [])) == ["10.1.2.2/24"]
    assert addresses(allocate(store, range_sets, "dummy", "eth1", [])) == ["10.1.2.3/24"]
    assert release(store, "dummy", "eth0") == 1
    assert ip_files(store) == ["10.1.2.3"]
    assert find(store, "dummy", "eth1") == [ip("10.1.2.3")]


def test_repeated_add_for_same_attachment_is_rejected_and_keeps_the_first(store):
    range_sets = sets([subnet("10.1.2.0/24")])
    allocate(store, range_sets, "dummy", "eth0", [])
    with pytest.raises(DuplicateAllocation) as err:
        allocate(store, range_sets, "dummy", "eth0", [])
    assert str(err.value) == (
        "10.1.2.2 has been allocated to dummy, duplicate allocation is not allowed"
    )
    assert err.value.range_set_index == 0
    assert ip_files(store) == ["10.1.2.2"]
    assert addresses(allocate(store, range_sets, "other", "eth0", [])) == ["10.1.2.3/24"]


def test_legacy_id_only_file_counts_as_a_duplicate(store):
    range_sets = sets([subnet("10.1.2.0/24")])
    (store.directory / "10.1.2.7").write_text("dummy")
    with pytest.raises(DuplicateAllocation):
        allocate(store, range_sets, "dummy", "eth0", [])


def test_release_of_unknown_container_succeeds_and_changes_nothing(store):
    allocate(store, sets([subnet("10.1.2.0/24")]), "dummy", "eth0", [])
    assert release(store, "unknown", "eth0") == 0
    assert ip_files(store) == ["10.1.2.2"]


def test_release_removes_legacy_files_holding_only_the_id(store):
    (store.directory / "10.1.2.9").write_text("dummy\n")
    (store.directory / "10.1.2.10").write_text("someone-else")
    assert release(store, "dummy", "eth0") == 1
    assert ip_files(store) == ["10.1.2.10"]


def test_container_id_whitespace_is_trimmed_when_written_and_matched(store):
    allocate(store, sets([subnet("10.1.2.0/24")]), "  dummy \n", "eth0", [])
    assert (store.directory / "10.1.2.2").read_bytes() == b"dummy\r\neth0"
    assert find(store, "dummy", "eth0") == [ip("10.1.2.2")]
    assert release(store, "dummy ", "eth0") == 1


def test_slash_29_yields_dot2_to_dot6_then_exhaustion_never_broadcast(store):
    range_sets = sets([subnet("192.168.1.0/29")])
    got = [addresses(allocate(store, range_sets, f"c{i}", "eth0", []))[0] for i in range(5)]
    assert got == [f"192.168.1.{n}/29" for n in range(2, 7)]
    with pytest.raises(RangeExhausted) as err:
        allocate(store, range_sets, "c5", "eth0", [])
    assert str(err.value) == "no IP addresses available in range set: 192.168.1.1-192.168.1.6"
    assert err.value.range_set_index == 0
    assert "192.168.1.7" not in ip_files(store)


def test_round_robin_does_not_reuse_a_just_released_ip(store):
    range_sets = sets([subnet("192.168.1.0/29")])
    allocate(store, range_sets, "a", "eth0", [])
    release(store, "a", "eth0")
    assert addresses(allocate(store, range_sets, "b", "eth0", [])) == ["192.168.1.3/29"]


def test_round_robin_wraps_back_to_a_released_ip_once_the_end_is_reached(store):
    range_sets = sets([subnet("192.168.1.0/29")])
    for name in "abcde":
        allocate(store, range_sets, name, "eth0", [])
    release(store, "b", "eth0")
    assert addresses(allocate(store, range_sets, "f", "eth0", [])) == ["192.168.1.3/29"]


def test_the_last_reserved_ip_itself_is_the_final_candidate(store):
    range_sets = sets([subnet("192.168.1.0/29")])
    for name in "abcde":
        allocate(store, range_sets, name, "eth0", [])
    release(store, "b", "eth0")
    assert addresses(allocate(store, range_sets, "f", "eth0", [])) == ["192.168.1.3/29"]
    release(store, "f", "eth0")
    assert addresses(allocate(store, range_sets, "g", "eth0", [])) == ["192.168.1.3/29"]


def test_last_reserved_ip_outside_the_set_restarts_at_range_start(store):
    (store.directory / "last_reserved_ip.0").write_text("10.9.9.9")
    assert addresses(allocate(store, sets([subnet("10.1.2.0/24")]), "a", "eth0", [])) == [
        "10.1.2.2/24"
    ]


def test_allocation_wraps_across_ranges_of_a_set(store):
    range_sets = sets([subnet("192.168.1.0/30"), subnet("192.168.2.0/30")])
    assert addresses(allocate(store, range_sets, "a", "eth0", [])) == ["192.168.1.2/30"]
    assert addresses(allocate(store, range_sets, "b", "eth0", [])) == ["192.168.2.2/30"]
    release(store, "a", "eth0")
    got = allocate(store, range_sets, "c", "eth0", [])
    assert addresses(got) == ["192.168.1.2/30"]
    assert str(got[0].gateway) == "192.168.1.1"
    with pytest.raises(RangeExhausted) as err:
        allocate(store, range_sets, "d", "eth0", [])
    assert str(err.value) == (
        "no IP addresses available in range set: 192.168.1.1-192.168.1.2,192.168.2.1-192.168.2.2"
    )


def test_custom_gateway_and_range_bounds_are_honoured(store):
    range_sets = sets(
        [subnet("10.1.2.0/24", rangeStart="10.1.2.10", rangeEnd="10.1.2.11", gateway="10.1.2.10")]
    )
    got = allocate(store, range_sets, "a", "eth0", [])
    assert addresses(got) == ["10.1.2.11/24"]
    assert str(got[0].gateway) == "10.1.2.10"
    with pytest.raises(RangeExhausted):
        allocate(store, range_sets, "b", "eth0", [])


@pytest.mark.parametrize("requested", ["10.1.2.88", "10.1.2.88/24"])
def test_requested_ip_is_given_exactly(store, requested):
    got = allocate(store, sets([subnet("10.1.2.0/24")]), "a", "eth0", [requested])
    assert addresses(got) == ["10.1.2.88/24"]
    assert (store.directory / "last_reserved_ip.0").read_text() == "10.1.2.88"


def test_requested_ips_go_to_the_range_set_that_contains_them(store):
    range_sets = sets([subnet("10.1.2.0/24")], [subnet("2001:db8:1::/64")])
    got = allocate(store, range_sets, "a", "eth0", ["2001:db8:1::99", "10.1.2.77"])
    assert addresses(got) == ["10.1.2.77/24", "2001:db8:1::99/64"]


def test_requested_ip_already_taken_is_rejected(store):
    range_sets = sets([subnet("192.168.1.0/29")])
    allocate(store, range_sets, "a", "eth0", ["192.168.1.5"])
    with pytest.raises(RequestedIPUnavailable) as err:
        allocate(store, range_sets, "b", "eth0", ["192.168.1.5"])
    assert str(err.value) == (
        "requested IP address 192.168.1.5 is not available in range set 192.168.1.1-192.168.1.6"
    )
    assert ip_files(store) == ["192.168.1.5"]


def test_requested_gateway_is_rejected(store):
    message = "requested ip 10.1.2.1 is subnet's gateway"
    with pytest.raises(RequestedIPUnavailable, match=exactly(message)):
        allocate(store, sets([subnet("10.1.2.0/24")]), "a", "eth0", ["10.1.2.1"])
    assert ip_files(store) == []


@pytest.mark.parametrize("requested", ["10.1.3.5", "10.1.2.50"])
def test_requested_ip_outside_every_range_is_rejected_and_nothing_is_taken(store, requested):
    range_sets = sets([subnet("10.1.2.0/24", rangeStart="10.1.2.100")], [subnet("2001:db8:1::/64")])
    with pytest.raises(RequestedIPUnavailable) as err:
        allocate(store, range_sets, "a", "eth0", [requested])
    assert str(err.value) == f"failed to allocate all requested IPs: {requested}"
    assert err.value.range_set_index is None
    assert ip_files(store) == []


def test_unparsable_requested_ip_is_a_config_error(store):
    with pytest.raises(RangeConfigError, match=exactly("invalid IP address: nonsense")):
        allocate(store, sets([subnet("10.1.2.0/24")]), "a", "eth0", ["nonsense"])


def test_failure_in_a_later_range_set_releases_the_earlier_ones(store):
    range_sets = sets([subnet("10.1.2.0/24")], [subnet("10.2.2.0/30")])
    allocate(store, [range_sets[1]], "other", "eth0", [])
    with pytest.raises(RangeExhausted) as err:
        allocate(store, range_sets, "a", "eth0", [])
    assert err.value.range_set_index == 1
    assert ip_files(store) == ["10.2.2.2"]
    assert find(store, "a", "eth0") == []


def test_find_reports_the_attachments_ips_or_legacy_files(store):
    allocate(store, sets([subnet("10.1.2.0/24")]), "a", "eth0", [])
    (store.directory / "10.1.2.40").write_text("legacy")
    assert find(store, "a", "eth0") == [ip("10.1.2.2")]
    assert find(store, "legacy", "eth0") == [ip("10.1.2.40")]
    assert find(store, "a", "eth1") == []


def test_list_attachments_and_gc_release_only_invalid_attachments(store):
    range_sets = sets([subnet("10.1.2.0/24")])
    for cid, ifname in [("a", "eth0"), ("a", "eth1"), ("b", "eth0")]:
        allocate(store, range_sets, cid, ifname, [])
    (store.directory / "10.1.2.50").write_text("b")
    (store.directory / "10.1.2.51").write_text("gone")
    assert list_attachments(store) == {
        ip("10.1.2.2"): ("a", "eth0"),
        ip("10.1.2.3"): ("a", "eth1"),
        ip("10.1.2.4"): ("b", "eth0"),
        ip("10.1.2.50"): ("b", None),
        ip("10.1.2.51"): ("gone", None),
    }
    removed = gc(store, {("a", "eth0"), ("b", "eth0")})
    assert sorted(removed) == [ip("10.1.2.3"), ip("10.1.2.51")]
    assert ip_files(store) == ["10.1.2.2", "10.1.2.4", "10.1.2.50"]


def test_lock_held_elsewhere_times_out_naming_the_lock_file(tmp_path):
    store = RangeStore(tmp_path, "mynet", timeout=0.2)
    holder = os.open(store.lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(LockTimeout, match=re.escape(str(store.lock_path))):
            allocate(store, sets([subnet("10.1.2.0/24")]), "a", "eth0", [])
    finally:
        os.close(holder)
    assert ip_files(store) == []
    assert addresses(allocate(store, sets([subnet("10.1.2.0/24")]), "a", "eth0", [])) == [
        "10.1.2.2/24"
    ]


def test_unusable_data_dir_is_reported_with_its_path(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(RangeStoreError, match=re.escape(str(blocker / "mynet"))):
        RangeStore(blocker, "mynet")


def test_network_name_cannot_escape_the_data_dir(tmp_path):
    with pytest.raises(RangeConfigError):
        RangeStore(tmp_path, "../etc")


# ------------------------------------------------------------------------ config parsing


def only_range(cidr: str):
    return sets([subnet(cidr)])[0].ranges[0]


@pytest.mark.parametrize(
    ("cidr", "start", "end", "gateway"),
    [
        ("10.1.2.0/24", "10.1.2.1", "10.1.2.254", "10.1.2.1"),
        ("10.1.2.0/25", "10.1.2.1", "10.1.2.126", "10.1.2.1"),
        ("10.1.2.0/30", "10.1.2.1", "10.1.2.2", "10.1.2.1"),
        ("2001:db8:1::/64", "2001:db8:1::1", "2001:db8:1:0:ffff:ffff:ffff:ffff", "2001:db8:1::1"),
    ],
)
def test_range_defaults(cidr, start, end, gateway):
    r = only_range(cidr)
    assert (str(r.range_start), str(r.range_end), str(r.gateway)) == (start, end, gateway)


@pytest.mark.parametrize("cidr", ["10.1.2.0/31", "10.1.2.1/32", "2001:db8::/127", "2001:db8::/128"])
def test_subnets_too_small_are_rejected(cidr):
    with pytest.raises(RangeConfigError) as err:
        only_range(cidr)
    assert str(err.value) == f"invalid range set 0: Network {cidr} too small to allocate from"


def test_subnet_with_host_bits_is_rejected():
    with pytest.raises(RangeConfigError) as err:
        only_range("10.1.2.5/24")
    assert str(err.value) == (
        "invalid range set 0: Network has host bits set. "
        "For a subnet mask of length 24 the network address is 10.1.2.0"
    )


@pytest.mark.parametrize("cidr", ["10.1.2.0", "10.1.2.0/33", "usePodCidr", "10.1.2.0/255.0.0.0"])
def test_malformed_subnet_is_rejected(cidr):
    message = f"invalid range set 0: invalid CIDR address: {cidr}"
    with pytest.raises(RangeConfigError, match=exactly(message)):
        only_range(cidr)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rangeStart": "10.1.3.1"}, "RangeStart 10.1.3.1 not in network 10.1.2.0/24"),
        ({"rangeEnd": "10.1.3.1"}, "RangeEnd 10.1.3.1 not in network 10.1.2.0/24"),
        (
            {"rangeStart": "10.1.2.50", "rangeEnd": "10.1.2.40"},
            "RangeEnd 10.1.2.40 not in network 10.1.2.0/24",
        ),
        ({"rangeStart": "2001:db8::1"}, "RangeStart 2001:db8::1 not in network 10.1.2.0/24"),
        ({"gateway": "bogus"}, "invalid IP address: bogus"),
    ],
)
def test_bad_range_bounds_are_rejected(extra, message):
    with pytest.raises(RangeConfigError) as err:
        sets([subnet("10.1.2.0/24", **extra)])
    assert str(err.value) == f"invalid range set 0: {message}"


def test_legacy_keys_come_before_ranges_and_runtime_ranges_before_both():
    conf = {
        "type": "calico-ipam",
        "subnet": "10.1.2.0/24",
        "rangeStart": "10.1.2.20",
        "ranges": [[subnet("10.3.0.0/16")]],
    }
    got = parse_ranges(conf, [[subnet("2001:db8::/64")]], "1.0.0")
    assert [str(rs) for rs in got] == [
        "2001:db8::1-2001:db8::ffff:ffff:ffff:ffff",
        "10.1.2.20-10.1.2.254",
        "10.3.0.1-10.3.255.254",
    ]


def test_keys_match_case_insensitively_like_go_json():
    got = parse_ranges({"Subnet": "10.1.2.0/24", "RangeStart": "10.1.2.9"}, None, "1.0.0")
    assert str(got[0]) == "10.1.2.9-10.1.2.254"


def test_no_ranges_at_all_is_rejected():
    with pytest.raises(RangeConfigError, match=exactly("no IP ranges specified")):
        parse_ranges({"type": "calico-ipam"}, None, "1.0.0")


def test_mixed_families_in_one_set_are_rejected():
    message = "invalid range set 0: mixed address families"
    with pytest.raises(RangeConfigError, match=exactly(message)):
        sets([subnet("10.1.2.0/24"), subnet("2001:db8::/64")])


def test_empty_range_set_is_rejected():
    with pytest.raises(RangeConfigError, match=exactly("invalid range set 1: empty range set")):
        sets([subnet("10.1.2.0/24")], [])


def test_overlapping_ranges_in_a_set_are_rejected():
    with pytest.raises(RangeConfigError) as err:
        sets([subnet("10.1.2.0/24"), subnet("10.1.2.0/25")])
    assert str(err.value) == (
        "invalid range set 0: subnets 10.1.2.1-10.1.2.254 and 10.1.2.1-10.1.2.126 overlap"
    )


def test_overlapping_range_sets_are_rejected():
    with pytest.raises(RangeConfigError, match=exactly("range set 0 overlaps with 2")):
        sets([subnet("10.1.2.0/24")], [subnet("2001:db8::/64")], [subnet("10.1.2.128/25")])


def test_disjoint_ranges_of_one_subnet_are_allowed():
    got = sets(
        [subnet("10.1.2.0/24", rangeEnd="10.1.2.99")],
        [subnet("10.1.2.0/24", rangeStart="10.1.2.100")],
    )
    assert [str(rs) for rs in got] == ["10.1.2.1-10.1.2.99", "10.1.2.100-10.1.2.254"]


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_old_cni_versions_allow_one_address_per_family(version):
    with pytest.raises(RangeConfigError) as err:
        sets([subnet("10.1.2.0/24")], [subnet("10.2.2.0/24")], version=version)
    assert str(err.value) == (
        f"CNI version {version} does not support more than 1 address per family"
    )
    assert len(sets([subnet("10.1.2.0/24")], [subnet("2001:db8::/64")], version=version)) == 2


def test_from_cni_0_3_0_several_sets_per_family_are_allowed():
    assert len(sets([subnet("10.1.2.0/24")], [subnet("10.2.2.0/24")], version="0.3.0")) == 2


def test_oversized_legacy_file_is_still_read_whole_and_matched(store):
    (store.directory / "10.1.2.9").write_text("dummy" + " " * 10000)
    assert find(store, "dummy", "eth0") == [ip("10.1.2.9")]


# ------------------------------------------------------------------- round robin model

MODEL_SETS = [
    subnet("192.168.1.0/29", gateway="192.168.1.3"),
    subnet("192.168.2.0/30"),
    subnet("192.168.3.0/29", rangeStart="192.168.3.4"),
]
# Every allocatable address in host-local's iteration order: range order, gateways left out.
MODEL_ORDER = [
    *(f"192.168.1.{n}" for n in (1, 2, 4, 5, 6)),
    "192.168.2.2",
    *(f"192.168.3.{n}" for n in (4, 5, 6)),
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 11)), max_size=40))
def test_round_robin_matches_a_model_of_the_cyclic_order(operations):
    """Each ADD takes the first free address after the last one handed out, cycling through
    the ranges in order; each DEL frees exactly the container's address."""
    range_sets = sets(MODEL_SETS)
    held: dict[str, str] = {}
    last: str | None = None
    with tempfile.TemporaryDirectory() as data_dir:
        store = RangeStore(data_dir, "model")
        for is_add, n in operations:
            container = f"c{n}"
            if not is_add:
                assert release(store, container, "eth0") == (1 if container in held else 0)
                held.pop(container, None)
                continue
            if container in held:
                with pytest.raises(DuplicateAllocation):
                    allocate(store, range_sets, container, "eth0", [])
                continue
            start = MODEL_ORDER.index(last) + 1 if last else 0
            cycle = MODEL_ORDER[start:] + MODEL_ORDER[:start]
            expected = next((a for a in cycle if a not in held.values()), None)
            if expected is None:
                with pytest.raises(RangeExhausted):
                    allocate(store, range_sets, container, "eth0", [])
                continue
            (got,) = allocate(store, range_sets, container, "eth0", [])
            assert str(got.address.ip) == expected
            held[container] = last = expected
        assert sorted(ip_files(store)) == sorted(held.values())
