#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpus (fuzz/corpus/TARGET/).

Each input is guest memory from address 0 as fuzz_targets/common.rs lays it
out: queue i's descriptor table at 0x4000 * (i + 1), its available ring
right after (16 entries), buffers below 0x4000. block_request inputs start
with a read-only flag byte, net_frames inputs with the incoming-frames byte.
The broken-ring inputs are regressions: an available index the queue
refuses once made the device loop forever.

state_container inputs are state files (the container around a payload);
checkpoint_layers inputs are a 2-byte length and checkpoint b's meta.json,
a 2-byte length and its page map, then its memory file (its parent a is
the target's own). The `tiny-vm` seeds of state_container and state_decode
are the state file and its payload of a real saved VM (a tiny guest of
16 MiB, one vCPU, one disk): they are not written here.

migration_wire inputs start with a mode byte (0: the receiver's handshake, 1:
the sender's, 2: chunks, 3: a page batch), then what the peer sends
(crates/vmm/src/migration/frame.rs).
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def desc(addr, ln, flags, nxt):
    return struct.pack('<QIHH', addr, ln, flags, nxt)


def memory(queues, extra=(), avail_idx=None):
    m = bytearray(0x10000)
    for base, chains in queues:
        avail = base + 16 * 16
        di, heads = 0, []
        for chain in chains:
            heads.append(di)
            for i, (a, ln, w) in enumerate(chain):
                fl = (2 if w else 0) | (1 if i + 1 < len(chain) else 0)
                m[base + 16 * di:base + 16 * di + 16] = desc(a, ln, fl, di + 1)
                di += 1
        idx = len(heads) if avail_idx is None else avail_idx
        m[avail:avail + 4] = struct.pack('<HH', 0, idx)
        for i, h in enumerate(heads):
            m[avail + 4 + 2 * i:avail + 6 + 2 * i] = struct.pack('<H', h)
    for addr, b in extra:
        m[addr:addr + len(b)] = b
    return bytes(m).rstrip(b'\0')


def write(target, name, data):
    os.makedirs(os.path.join(HERE, 'corpus', target), exist_ok=True)
    with open(os.path.join(HERE, 'corpus', target, name), 'wb') as f:
        f.write(data)


write('virtqueue', 'two-chains', memory(
    [(0x4000, [[(0x100, 64, False), (0x200, 64, True)], [(0x300, 32, True)]])],
    [(0x100, b'x' * 64)]))
write('virtqueue', 'broken-avail-idx', memory(
    [(0x4000, [[(0x100, 64, False)]])], avail_idx=0x8000))


def header(kind, sector):
    return struct.pack('<IIQ', kind, 0, sector)


for name, kind, ro, data in [('read', 0, 0, (512, True)), ('write', 1, 0, (512, False)),
                             ('write-ro', 1, 1, (512, False)), ('flush', 4, 0, None),
                             ('getid', 8, 0, (20, True))]:
    chain = [(0x100, 16, False)]
    if data:
        chain.append((0x200, data[0], data[1]))
    chain.append((0x400, 1, True))
    write('block_request', name,
          bytes([ro]) + memory([(0x4000, [chain])], [(0x100, header(kind, 3))]))
write('block_request', 'broken-avail-idx', bytes([0]) + memory(
    [(0x4000, [[(0x100, 16, False), (0x400, 1, True)]])], [(0x100, header(0, 0))],
    avail_idx=0x8000))

MAC = bytes([0x52, 0x56, 0, 0, 0, 1])
own = bytes(12) + b'\xff' * 6 + MAC + b'\x08\x00' + b'p' * 46
spoofed = bytes(12) + b'\xff' * 6 + bytes([0x52, 0x56, 9, 9, 9, 9]) + b'\x08\x00' + b'p' * 46
write('net_frames', 'tx-own-and-spoofed', bytes([0x01]) + memory(
    [(0x4000, [[(0x1000, 2048, True)]]),
     (0x8000, [[(0x100, len(own), False)], [(0x200, len(spoofed), False)]])],
    [(0x100, own), (0x200, spoofed)]))
write('net_frames', 'rx-two-frames', bytes([0x42]) + memory(
    [(0x4000, [[(0x1000, 4096, True)], [(0x2000, 100, True)]])]))
write('net_frames', 'rx-broken-avail-idx', bytes([0x41]) + memory(
    [(0x4000, [[(0x1000, 4096, True)]])], avail_idx=0x8000))


def crc64(data):
    crc = 0xffffffffffffffff
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xc96c5795d7870f42 if crc & 1 else crc >> 1
    return crc ^ 0xffffffffffffffff


def container(payload, version=1):
    return (b'NESTVMSS' + struct.pack('<IIQQ', version, 0, len(payload), crc64(payload))
            + payload)


for d in ('state_container', 'checkpoint_layers', 'state_decode'):
    os.makedirs(os.path.join(HERE, 'corpus', d), exist_ok=True)
write('state_container', 'small', container(b'{"config":{}}'))
write('state_container', 'version-2', container(b'{}', version=2))
write('state_container', 'truncated', container(b'0123456789')[:-3])


def layers(meta, pages, memory):
    m = json.dumps(meta).encode()
    return struct.pack('<H', len(m)) + m + struct.pack('<H', len(pages)) + pages + memory


def meta(parent, pages=16):
    return {'name': 'b', 'parent': parent, 'created': 0,
            'memory_bytes': pages * 4096, 'written_bytes': 4096}


page = lambda fill: bytes([fill]) * 4096
write('checkpoint_layers', 'child-of-a',
      layers(meta('a'), bytes([0b10, 0]), page(0) + page(2) + bytes(14 * 4096)))
write('checkpoint_layers', 'root', layers(meta(None), bytes([0b1, 0]), page(7)))
write('checkpoint_layers', 'loop', layers(meta('b'), bytes([0, 0]), b''))
write('checkpoint_layers', 'path-parent', layers(meta('../a'), bytes([0, 0]), b''))
write('checkpoint_layers', 'short-memory',
      layers(meta('a'), bytes([0xff, 0xff]), page(1)))

VERSION = struct.pack('<I', 2)
write('migration_wire', 'init', bytes([0, 1, 52, 0]) + VERSION + bytes(range(48)))
write('migration_wire', 'init-old-version', bytes([0, 1, 52, 0]) + struct.pack('<I', 1) + bytes(48))
write('migration_wire', 'init-oversized', bytes([0, 1, 0xff, 0xff]) + bytes(64))
write('migration_wire', 'reply', bytes([1, 2, 48, 0]) + bytes(range(48)))
write('migration_wire', 'refused-key', bytes([1, 3, 1, 0, 2]))
write('migration_wire', 'refused-version', bytes([1, 3, 5, 0, 1]) + struct.pack('<I', 9))
write('migration_wire', 'chunks-hello', bytes([2, 2, 1, 0x10, 0]) + b'h' * 64 + bytes([2, 0, 4, 0]) + b'}' * 4)
write('migration_wire', 'chunks-interleaved', bytes([2, 5, 1, 8, 0]) + b'p' * 8 + bytes([6, 0, 1, 0, 0]))
write('migration_wire', 'pages-two', bytes([3]) + struct.pack('<IQQ', 2, 0x1000, 0x2001) + b'\x07' * 4096)
