"""Delay packets by a fixed time: an NFQUEUE listener that gives each packet its verdict late.

This kernel has no netem; iptables sends a host's outgoing packets to queue ``--queue`` (the
rule ``-j NFQUEUE --queue-num N``) and this process, run inside the host's namespace, accepts
each one ``--delay`` seconds after it arrived, in order, so that every packet between two hosts
takes that much longer one way. The nfnetlink queue protocol is spoken with the standard
library (``linux/netfilter/nfnetlink_queue.h``): bind the queue, ask for metadata only, read
each packet's id, send the verdict. Used by the many-hosts tier (tests/netns.py).
"""

from __future__ import annotations

import argparse
import collections
import select
import socket
import struct
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
QUEUE_MAXLEN = 65536


def attribute(kind: int, payload: bytes) -> bytes:
    """A netlink attribute: length, type, payload padded to four bytes."""
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def message(kind: int, queue: int, attributes: bytes, seq: int) -> bytes:
    """An nfnetlink queue message: the netlink header, then nfgenmsg (family, version, queue)."""
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", queue) + attributes
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, NLM_F_REQUEST, seq, 0) + body


def bind(queue: int) -> bytes:
    return message(NFQNL_MSG_CONFIG, queue, attribute(NFQA_CFG_CMD, struct.pack("=BB", NFQNL_CFG_CMD_BIND, 0)
                                                       + struct.pack(">H", socket.AF_UNSPEC)), 1)


def metadata_only(queue: int) -> bytes:
    return message(NFQNL_MSG_CONFIG, queue,
                   attribute(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))
                   + attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", QUEUE_MAXLEN)), 2)


def verdict(queue: int, packet_id: int) -> bytes:
    return message(NFQNL_MSG_VERDICT, queue, attribute(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet_id)), 0)


def packet_ids(data: bytes) -> list[int]:
    """The ids of the packets announced in one read (several netlink messages may share it)."""
    ids = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            if code:
                raise OSError(-code, f"nfnetlink refused a request: {code}")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            at = offset + 20  # past the netlink header and nfgenmsg
            while at + 4 <= offset + length:
                size, attr = struct.unpack_from("=HH", data, at)
                if size < 4:
                    break
                if attr & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from(">I", data, at + 4)[0])
                at += (size + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def run(queue: int, delay: float) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    sock.send(bind(queue))
    sock.send(metadata_only(queue))
    held: collections.deque[tuple[float, int]] = collections.deque()
    while True:
        wait = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            now = time.monotonic()
            try:
                data = sock.recv(1 << 16)
            except OSError:  # ENOBUFS: the kernel dropped notices (as a loss would); go on
                data = b""
            held.extend((now + delay, packet_id) for packet_id in packet_ids(data))
        now = time.monotonic()
        while held and held[0][0] <= now:
            sock.send(verdict(queue, held.popleft()[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay", type=float, required=True, help="seconds")
    arguments = parser.parse_args()
    run(arguments.queue, arguments.delay)


if __name__ == "__main__":
    main()
