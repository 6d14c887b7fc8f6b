"""host-local compatible range allocation (`ipam.subnet` / `ipam.ranges`, `usePodCidr`).

The on-disk state is exactly the Go `host-local` plugin's, so both plugins can share one
`<dataDir>/<network>/` directory without ever handing out one IP twice: one file per IP
named by the canonical IP string holding `<containerID>\\r\\n<ifname>`, a
`last_reserved_ip.<rangeSetIndex>` file per range set, and an empty `lock` file that both
plugins `flock` exclusively around each range set's allocation, each release and each scan.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ipam_plugin.lock import acquire_flock, lock_holder

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LOCK_FILE_NAME = "lock"
LAST_RESERVED_PREFIX = "last_reserved_ip."
LINE_BREAK = "\r\n"
FILE_MODE = 0o600
DIR_MODE = 0o755
_READ_SIZE = 4096


class RangeError(Exception):
    """Base of every error this module raises; its text is host-local's where one exists."""


class RangeConfigError(RangeError):
    """The ranges or requested IPs in the config are invalid (CNI code 7)."""


class AllocationError(RangeError):
    """An allocation could not be made; `range_set_index` says which set failed, if one did.

    The message is host-local's inner text; the caller adds host-local's
    "failed to allocate for range <idx>: " prefix when `range_set_index` is not None.
    """

    def __init__(self, message: str, range_set_index: int | None = None) -> None:
        super().__init__(message)
        self.range_set_index = range_set_index


class RangeExhausted(AllocationError):
    """Every address of a range set is taken."""


class RequestedIPUnavailable(AllocationError):
    """A requested IP is the gateway, already taken, or in no configured range set."""


class DuplicateAllocation(AllocationError):
    """(container ID, ifname) already holds an address in this range set."""


class RangeStoreError(RangeError):
    """The data directory could not be read or written; the message names the path."""


class LockTimeout(RangeStoreError):
    """The directory's lock file stayed locked longer than the bounded wait."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Range:
    """One allocatable range of a subnet, canonicalised with host-local's defaults."""

    subnet: IPNetwork
    range_start: IPAddress
    range_end: IPAddress
    gateway: IPAddress

    def contains(self, ip: IPAddress) -> bool:
        return (
            ip.version == self.subnet.version
            and ip in self.subnet
            and self.range_start <= ip <= self.range_end
        )

    def overlaps(self, other: Range) -> bool:
        if self.subnet.version != other.subnet.version:
            return False
        return (
            self.contains(other.range_start)
            or self.contains(other.range_end)
            or other.contains(self.range_start)
            or other.contains(self.range_end)
        )

    def __str__(self) -> str:
        return f"{self.range_start}-{self.range_end}"


@dataclass(frozen=True)
class RangeSet:
    """Alternative ranges of one family; each range set yields exactly one IP."""

    ranges: tuple[Range, ...]

    @property
    def version(self) -> int:
        return self.ranges[0].subnet.version

    def range_for(self, ip: IPAddress) -> Range | None:
        return next((r for r in self.ranges if r.contains(ip)), None)

    def contains(self, ip: IPAddress) -> bool:
        return self.range_for(ip) is not None

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.ranges)


def _field(obj: dict, key: str) -> object:
    """Look a key up the way Go's encoding/json does: exact first, then case-insensitively."""
    if key in obj:
        return obj[key]
    lowered = key.lower()
    return next((value for name, value in obj.items() if name.lower() == lowered), None)


def _canonical(ip: IPAddress) -> IPAddress:
    """Go's To4(): an IPv4-mapped IPv6 address is the IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_ip(text: object) -> IPAddress:
    """Parse one IP address in Go's canonical form."""
    if isinstance(text, str):
        try:
            return _canonical(ipaddress.ip_address(text))
        except ValueError:
            pass
    raise RangeConfigError(f"invalid IP address: {text}")


def parse_requested_ip(text: object) -> IPAddress:
    """Parse `ip` or `ip/prefix`: both forms reach us from CNI_ARGS, args and runtimeConfig."""
    return parse_ip(text.partition("/")[0] if isinstance(text, str) else text)


def _parse_cidr(text: object) -> IPInterface:
    """Parse a subnet keeping its host bits, as Go's types.ParseCIDR does, so they can be
    reported rather than silently masked off."""
    if isinstance(text, str) and text.partition("/")[2].isdigit():
        try:
            return ipaddress.ip_interface(text)
        except ValueError:
            pass
    raise RangeConfigError(f"invalid CIDR address: {text}")


def _optional_ip(conf: dict, key: str) -> IPAddress | None:
    value = _field(conf, key)
    return None if value in (None, "") else parse_ip(value)


def _last_ip(subnet: IPNetwork) -> IPAddress:
    """The subnet's last address, minus the IPv4 broadcast address."""
    last = subnet.broadcast_address
    return last - 1 if subnet.version == 4 else last


def _build_range(conf: object) -> Range:
    """host-local's Range.Canonicalize: validate and fill in start, end and gateway."""
    if not isinstance(conf, dict):
        raise RangeConfigError(f"a range must be an object, not {conf!r}")
    if _field(conf, "subnet") in (None, ""):
        raise RangeConfigError("IP <nil> not v4 nor v6")
    iface = _parse_cidr(_field(conf, "subnet"))
    subnet = iface.network
    if subnet.prefixlen > subnet.max_prefixlen - 2:
        raise RangeConfigError(f"Network {iface} too small to allocate from")
    if iface.ip != subnet.network_address:
        raise RangeConfigError(
            f"Network has host bits set. For a subnet mask of length {subnet.prefixlen} "
            f"the network address is {subnet.network_address}"
        )
    first = subnet.network_address + 1
    gateway = _optional_ip(conf, "gateway") or first
    start = _optional_ip(conf, "rangeStart") or first
    if start.version != subnet.version or start not in subnet:
        raise RangeConfigError(f"RangeStart {start} not in network {iface}")
    end = _optional_ip(conf, "rangeEnd") or _last_ip(subnet)
    if end.version != subnet.version or end not in subnet or end < start:
        raise RangeConfigError(f"RangeEnd {end} not in network {iface}")
    return Range(subnet=subnet, range_start=start, range_end=end, gateway=gateway)


def _build_range_set(conf: object) -> RangeSet:
    """host-local's RangeSet.Canonicalize: one family, no overlap inside the set."""
    if not isinstance(conf, list):
        raise RangeConfigError(f"a range set must be a list of ranges, not {conf!r}")
    if not conf:
        raise RangeConfigError("empty range set")
    ranges = tuple(_build_range(r) for r in conf)
    if len({r.subnet.version for r in ranges}) > 1:
        raise RangeConfigError("mixed address families")
    for i, first in enumerate(ranges):
        for second in ranges[i + 1 :]:
            if first.overlaps(second):
                raise RangeConfigError(f"subnets {first} and {second} overlap")
    return RangeSet(ranges)


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    """Go's version.GreaterThanOrEqualTo: an unparsable version is not at least anything."""
    try:
        return tuple(int(part) for part in version.split(".")) >= minimum
    except ValueError:
        return False


def parse_ranges(
    ipam_conf: dict, runtime_ip_ranges: list | None, cni_version: str
) -> list[RangeSet]:
    """Build the final list of range sets exactly as host-local's LoadIPAMConfig does:
    `runtimeConfig.ipRanges`, then the legacy top-level `subnet` range, then `ranges`."""
    configured = _field(ipam_conf, "ranges") or []
    if not isinstance(configured, list):
        raise RangeConfigError(f"ranges must be a list of range sets, not {configured!r}")
    legacy = [[ipam_conf]] if _field(ipam_conf, "subnet") not in (None, "") else []
    raw_sets = list(runtime_ip_ranges or []) + legacy + configured
    if not raw_sets:
        raise RangeConfigError("no IP ranges specified")

    range_sets = []
    for index, raw in enumerate(raw_sets):
        try:
            range_sets.append(_build_range_set(raw))
        except RangeConfigError as err:
            raise RangeConfigError(f"invalid range set {index}: {err}") from None

    versions = [rs.version for rs in range_sets]
    if max(versions.count(4), versions.count(6)) > 1 and not _version_at_least(
        cni_version, (0, 3, 0)
    ):
        raise RangeConfigError(
            f"CNI version {cni_version} does not support more than 1 address per family"
        )

    for i, first in enumerate(range_sets):
        for j in range(i + 1, len(range_sets)):
            if any(a.overlaps(b) for a in first.ranges for b in range_sets[j].ranges):
                raise RangeConfigError(f"range set {i} overlaps with {j}")
    return range_sets


# --------------------------------------------------------------------------- disk store


def _owner_key(container_id: str, ifname: str) -> str:
    """A file's content for this attachment; host-local trims only the container ID."""
    return f"{container_id.strip()}{LINE_BREAK}{ifname}"


def _parse_owner(content: str) -> tuple[str, str | None]:
    """(container ID, ifname) of a file; ifname is None in the legacy ID-only format."""
    container_id, sep, ifname = content.partition(LINE_BREAK)
    return container_id, ifname if sep else None


class RangeStore:
    """The files of one network in one data directory, in host-local's exact format.

    Every method that reads or changes allocations expects the caller to hold `locked()`,
    the flock that Go's host-local takes on the same file.
    """

    def __init__(
        self, data_dir: str | os.PathLike | None, network: str, timeout: float = 30.0
    ) -> None:
        if not network or network in (".", "..") or "/" in network:
            raise RangeConfigError(f"invalid network name {network!r}")
        self.directory = Path(data_dir or DEFAULT_DATA_DIR) / network
        self.lock_path = self.directory / LOCK_FILE_NAME
        self.timeout = timeout
        try:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as err:
            raise RangeStoreError(f"cannot create {self.directory}: {err.strerror}") from None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's exclusive flock, waiting at most `timeout` seconds.

        Polling with LOCK_NB is what bounds the wait: a blocking flock cannot be
        interrupted from a worker thread."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise RangeStoreError(f"cannot open {self.lock_path}: {err.strerror}") from None
        try:
            self._acquire(fd)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _acquire(self, fd: int) -> None:
        if not acquire_flock(fd, self.timeout):
            raise LockTimeout(
                f"timed out after {self.timeout:g}s waiting for lock {self.lock_path} "
                f"(held by {lock_holder(fd)})"
            )

    def reserve(self, ip: IPAddress, owner_key: str, range_set_index: int) -> bool:
        """Claim `ip` with an O_EXCL create; False if it is already taken."""
        path = self.directory / str(ip)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return False
        except OSError as err:
            raise RangeStoreError(f"cannot create {path}: {err.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(owner_key)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise RangeStoreError(f"cannot write {path}: {err.strerror}") from None
        self._write_last_reserved(ip, range_set_index)
        return True

    def _write_last_reserved(self, ip: IPAddress, range_set_index: int) -> None:
        path = self.directory / f"{LAST_RESERVED_PREFIX}{range_set_index}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(str(ip))
        except OSError as err:
            raise RangeStoreError(f"cannot write {path}: {err.strerror}") from None

    def last_reserved_ip(self, range_set_index: int) -> IPAddress | None:
        """Where round robin resumes; None when absent or unreadable (host-local goes on)."""
        path = self.directory / f"{LAST_RESERVED_PREFIX}{range_set_index}"
        try:
            return parse_ip(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, RangeConfigError):
            return None

    def contents(self) -> dict[str, str]:
        """File name -> trimmed content of every allocation file, in name order as Go walks
        them. Every ADD and DEL scans them all (as host-local does), so this stays on bare
        descriptors: at 10,000 allocations pathlib and eager IP parsing cost several times
        the reads themselves."""
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise RangeStoreError(f"cannot open {self.directory}: {err.strerror}") from None
        try:
            with os.scandir(dir_fd) as entries:
                names = sorted(
                    entry.name
                    for entry in entries
                    if entry.is_file(follow_symlinks=False) and _may_hold_allocation(entry.name)
                )
            found = {}
            for name in names:
                content = self._read(dir_fd, name)
                if content is not None:
                    found[name] = content.strip()
            return found
        finally:
            os.close(dir_fd)

    def _read(self, dir_fd: int, name: str) -> str | None:
        """A file's text, or None when it vanished; other failures name the path."""
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise RangeStoreError(f"cannot read {self.directory / name}: {err.strerror}") from None
        try:
            data = chunk = os.read(fd, _READ_SIZE)
            while len(chunk) == _READ_SIZE:  # one read for every file host-local writes
                chunk = os.read(fd, _READ_SIZE)
                data += chunk
        finally:
            os.close(fd)
        return data.decode("utf-8", "surrogateescape")

    def remove(self, ip: IPAddress) -> None:
        path = self.directory / str(ip)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise RangeStoreError(f"cannot remove {path}: {err.strerror}") from None


def _may_hold_allocation(name: str) -> bool:
    """Skip host-local's bookkeeping files without reading them."""
    return name != LOCK_FILE_NAME and not name.startswith(LAST_RESERVED_PREFIX)


def _ip_file_name(name: str) -> IPAddress | None:
    """The IP an allocation file is named after, or None for a stray file."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return None
    return ip if str(ip) == name else None


def _ips_holding(contents: dict[str, str], *wanted: str) -> list[IPAddress]:
    """IPs of the files whose content is one of `wanted`; only their names are parsed."""
    return [
        ip
        for name, content in contents.items()
        if content in wanted and (ip := _ip_file_name(name)) is not None
    ]


def _allocations(contents: dict[str, str]) -> dict[IPAddress, str]:
    """Every allocation file's IP and content."""
    return {
        ip: content for name, content in contents.items() if (ip := _ip_file_name(name)) is not None
    }


# --------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Allocation:
    """One IP handed out: the address with its range's prefix, and that range's gateway."""

    address: IPInterface
    gateway: IPAddress
    range_set_index: int


def _candidates(range_set: RangeSet, last: IPAddress | None) -> Iterator[tuple[Range, IPAddress]]:
    """host-local's round robin: every address once, starting after `last` (or at the first
    range's start when `last` is not in the set), wrapping across ranges, never a gateway."""
    ranges = range_set.ranges
    index, first = 0, ranges[0].range_start
    current = range_set.range_for(last) if last is not None else None
    if current is not None:
        index = ranges.index(current)
        if last == current.range_end:
            index = (index + 1) % len(ranges)
            first = ranges[index].range_start
        else:
            first = last + 1
    for step in range(len(ranges) + 1):
        r = ranges[(index + step) % len(ranges)]
        low = first if step == 0 else r.range_start
        high = int(r.range_end) if step < len(ranges) else int(first) - 1
        for value in range(int(low), high + 1):
            ip = type(r.range_start)(value)
            if ip != r.gateway:
                yield r, ip


def _allocation(r: Range, ip: IPAddress, range_set_index: int) -> Allocation:
    return Allocation(
        address=ipaddress.ip_interface(f"{ip}/{r.subnet.prefixlen}"),
        gateway=r.gateway,
        range_set_index=range_set_index,
    )


def _allocate_requested(
    store: RangeStore, range_set: RangeSet, index: int, owner_key: str, ip: IPAddress
) -> Allocation:
    r = next(r for r in range_set.ranges if r.contains(ip))  # routed here because it is in
    if ip == r.gateway:
        raise RequestedIPUnavailable(f"requested ip {ip} is subnet's gateway", index)
    if not store.reserve(ip, owner_key, index):
        raise RequestedIPUnavailable(
            f"requested IP address {ip} is not available in range set {range_set}", index
        )
    return _allocation(r, ip, index)


def _allocate_next(
    store: RangeStore, range_set: RangeSet, index: int, container_id: str, ifname: str
) -> Allocation:
    owner_key = _owner_key(container_id, ifname)
    held = _ips_holding(store.contents(), owner_key, container_id.strip())
    duplicate = next((ip for ip in held if range_set.contains(ip)), None)
    if duplicate is not None:
        raise DuplicateAllocation(
            f"{duplicate} has been allocated to {container_id}, "
            "duplicate allocation is not allowed",
            index,
        )
    for r, ip in _candidates(range_set, store.last_reserved_ip(index)):
        if store.reserve(ip, owner_key, index):
            return _allocation(r, ip, index)
    raise RangeExhausted(f"no IP addresses available in range set: {range_set}", index)


def _route_requested(
    range_sets: list[RangeSet], requested_ips: list[str]
) -> list[IPAddress | None]:
    """Give each range set the first requested IP it contains (at most one per set), and
    fail before touching the disk when a requested IP would be left over."""
    pending = list(dict.fromkeys(parse_requested_ip(text) for text in requested_ips))
    routed: list[IPAddress | None] = []
    for range_set in range_sets:
        ip = next((ip for ip in pending if range_set.contains(ip)), None)
        if ip is not None:
            pending.remove(ip)
        routed.append(ip)
    if pending:
        raise RequestedIPUnavailable(
            "failed to allocate all requested IPs: " + " ".join(str(ip) for ip in pending)
        )
    return routed


def allocate(
    store: RangeStore,
    range_sets: list[RangeSet],
    container_id: str,
    ifname: str,
    requested_ips: list[str],
) -> list[Allocation]:
    """One IP from each range set, each under its own hold of the lock as host-local does.

    If a later range set fails, the IPs this call already took are released again."""
    routed = _route_requested(range_sets, requested_ips)
    owner_key = _owner_key(container_id, ifname)
    done: list[Allocation] = []
    try:
        for index, (range_set, requested) in enumerate(zip(range_sets, routed, strict=True)):
            with store.locked():
                if requested is not None:
                    done.append(_allocate_requested(store, range_set, index, owner_key, requested))
                else:
                    done.append(_allocate_next(store, range_set, index, container_id, ifname))
    except BaseException:
        _release_own(store, [a.address.ip for a in done], owner_key)
        raise
    return done


def _release_own(store: RangeStore, ips: list[IPAddress], owner_key: str) -> None:
    """Undo a partial ADD: remove only the files this call created and still owns."""
    if not ips:
        return
    with store.locked():
        for ip in _ips_holding(store.contents(), owner_key):
            if ip in ips:
                store.remove(ip)


def _owned(contents: dict[str, str], container_id: str, ifname: str) -> list[IPAddress]:
    """host-local's match: (id, ifname) files, or failing those, legacy ID-only files."""
    return _ips_holding(contents, _owner_key(container_id, ifname)) or _ips_holding(
        contents, container_id.strip()
    )


def release(store: RangeStore, container_id: str, ifname: str) -> int:
    """Remove every file of this attachment (DEL); returns how many. Unknown IDs are fine."""
    with store.locked():
        owned = _owned(store.contents(), container_id, ifname)
        for ip in owned:
            store.remove(ip)
    return len(owned)


def find(store: RangeStore, container_id: str, ifname: str) -> list[IPAddress]:
    """The IPs this attachment holds, for CHECK."""
    with store.locked():
        return _owned(store.contents(), container_id, ifname)


def list_attachments(store: RangeStore) -> dict[IPAddress, tuple[str, str | None]]:
    """Every allocated IP and its (container ID, ifname); ifname is None for legacy files."""
    with store.locked():
        allocations = _allocations(store.contents())
        return {ip: _parse_owner(content) for ip, content in allocations.items()}


def gc(store: RangeStore, valid: set[tuple[str, str]]) -> list[IPAddress]:
    """Release every file whose attachment is not in `valid` (CNI GC); returns those IPs.

    A legacy ID-only file carries no ifname, so it stays while any valid attachment has
    its container ID."""
    keep = {_owner_key(container_id, ifname) for container_id, ifname in valid}
    keep |= {container_id.strip() for container_id, _ in valid}
    removed = []
    with store.locked():
        for ip, content in _allocations(store.contents()).items():
            if content not in keep:
                store.remove(ip)
                removed.append(ip)
    return removed
