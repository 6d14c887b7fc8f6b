"""What crosses the fabric: every IPv4 frame on the fabric netns' interfaces, captured with
an AF_PACKET socket inside that netns while a block of test code runs, parsed far enough to
tell underlay addresses, UDP ports and the VXLAN header's VNI."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.felix.netns_support import NetnsThread
from tests.harness import Netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
IPPROTO_UDP = 17


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    protocol: int
    dport: int = 0
    vni: int | None = None
    inner: tuple[str, str] | None = None  # the encapsulated IPv4 packet's addresses

    @classmethod
    def parse(cls, frame: bytes) -> Packet | None:
        if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
            return None
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        src, dst = (str(ipaddress.IPv4Address(ip[o : o + 4])) for o in (12, 16))
        if ip[9] != IPPROTO_UDP:
            return cls(src, dst, ip[9])
        udp = ip[header:]
        dport = struct.unpack("!H", udp[2:4])[0]
        vxlan = udp[8:16]
        if len(vxlan) < 8 or not vxlan[0] & 0x08:
            return cls(src, dst, IPPROTO_UDP, dport)
        vni = int.from_bytes(vxlan[4:7], "big")
        inner_ip = udp[16 + 14 :]
        inner = None
        if len(inner_ip) >= 20 and inner_ip[0] >> 4 == 4:
            inner = tuple(str(ipaddress.IPv4Address(inner_ip[o : o + 4])) for o in (12, 16))
        return cls(src, dst, IPPROTO_UDP, dport, vni, inner)  # type: ignore[arg-type]


@contextmanager
def fabric_capture(fabric: Netns) -> Iterator[list[Packet]]:
    """Packets seen (on any interface of `fabric`: each forwarded frame twice) while the
    block runs; the list is complete when the block ends."""
    packets: list[Packet] = []
    stop = threading.Event()
    worker = NetnsThread(fabric)
    sock = worker.run(
        lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    )
    sock.settimeout(0.2)

    def read() -> None:
        while not stop.is_set():
            try:
                frame, address = sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] == socket.PACKET_OUTGOING:
                continue  # the same frame is seen arriving on the ingress port
            packet = Packet.parse(frame)
            if packet is not None:
                packets.append(packet)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield packets
    finally:
        stop.set()
        reader.join(5)
        sock.close()
        worker.close()
