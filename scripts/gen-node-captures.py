#!/usr/bin/env python3
# One node's captures of an ambient pod, for the benchmarks (scripts/bench-analyze, scripts/bench-instructions):
#   gen-node-captures.py DIR PACKETS   writes DIR/any.pcap (LINUX_SLL: lo and eth0) and DIR/nflog.pcap (meshtrace's
#   NFLOG twins), ~PACKETS packets in all, with the mix AMBIENT.md describes (see scripts/bench-analyze).
#   gen-node-captures.py DIR PACKETS --syn-flood   writes DIR/flood.pcap instead: PACKETS SYNs from outside to the
#   pod's port 80 within one second, none answered (a scan, a flood: each a connection that stays until the idle timeout).
import random, struct, sys

out_dir, target = sys.argv[1], int(sys.argv[2])
syn_flood = sys.argv[3:] == ["--syn-flood"]
random.seed(1337)

POD = (10 << 24) | (244 << 16) | (1 << 8) | 10          # 10.244.1.10, the pod
LO = (127 << 24) | 1
PROBE = (169 << 24) | (254 << 16) | (7 << 8) | 127
DNS = (10 << 24) | (96 << 16) | 10
def peer(i): return (10 << 24) | (244 << 16) | ((2 + i % 50) << 8) | (10 + i % 200)
def external(i): return (93 << 24) | (184 << 16) | (216 << 8) | (i % 250 + 1)

SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
HOOK_PRE, HOOK_IN, HOOK_OUT, HOOK_POST = 0, 1, 3, 4

def prefix(table, chain, pos, h="-"):
    return ("mt:4:%s:%s:%s:%s" % (table, chain, pos, h)).encode()
# Text hashes as meshtrace computes them over the seed ruleset's rule text (FNV-1a folded to 16 bits).
def fnv(s):
    h = 0x811c9dc5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & 0xffffffff
    return "%04x" % ((h ^ (h >> 16)) & 0xffff)
R_REDIRECT_OUT = prefix("nat", "ISTIO_OUTPUT", 4, fnv("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"))
R_REDIRECT_IN = prefix("nat", "ISTIO_PRERT", 2, fnv("-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"))
R_CONNMARK_SET = prefix("mangle", "ISTIO_PRERT", 1, fnv("-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"))
R_CONNMARK_RESTORE = prefix("mangle", "ISTIO_OUTPUT", 1, fnv("-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"))
R_ZTUNNEL_REPLY = prefix("nat", "ISTIO_OUTPUT", 2, fnv("-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT"))
OBSERVE_OUT = prefix("mangle", "POSTROUTING", "out")

ipid = [1]
def ip4(src, dst, proto, l4):
    ipid[0] = (ipid[0] + 1) & 0xffff
    return struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(l4), ipid[0], 0x4000, 64, proto, 0, src, dst) + l4
def tcp(sp, dp, seq, ack, flags, payload):
    return struct.pack("!HHIIBBHHH", sp, dp, seq & 0xffffffff, ack & 0xffffffff, 5 << 4, flags, 64240, 0, 0) + b"\0" * payload
def udp(sp, dp, payload):
    return struct.pack("!HHHH", sp, dp, 8 + payload, 0) + b"\0" * payload

def sll(pkt_type, loopback, ip):
    return struct.pack("!HHH8sH", pkt_type, 772 if loopback else 1, 6, b"\0" * 8, 0x0800) + ip
def tlv(t, v):
    pad = (-len(v)) % 4
    return struct.pack("<HH", 4 + len(v), t) + v + b"\0" * pad
def nflog(ip, hook, pfx, mark=None, outdev=None, indev=None):
    body = tlv(1, struct.pack("!HBB", 0x0800, hook, 0))
    if mark is not None: body += tlv(2, struct.pack("!I", mark))
    if indev is not None: body += tlv(4, struct.pack("!I", indev))
    if outdev is not None: body += tlv(5, struct.pack("!I", outdev))
    body += tlv(10, pfx + b"\0")
    body += tlv(9, ip[:128])
    return struct.pack("!BBH", 2, 0, 42) + body

def pcap_file(name, linktype):
    f = open(out_dir + "/" + name, "wb")
    f.write(struct.pack("<IHHiIII", 0xa1b23c4d, 2, 4, 0, 0, 262144, linktype))   # nanosecond pcap
    return f
def pcap_record(f, t, data, wire):
    f.write(struct.pack("<IIII", t // 1_000_000_000, t % 1_000_000_000, len(data), wire) + data)

class Files:
    def __init__(self):
        self.any = pcap_file("any.pcap", 113)
        self.nf = pcap_file("nflog.pcap", 239)
        self.count = 0
    def write_chunk(self, items):
        items.sort(key=lambda x: x[0])
        for t, which, data, wire in items:
            pcap_record(self.nf if which else self.any, t, data, wire)
        self.count += len(items)

if syn_flood:
    t0 = 1_790_000_000 * 1_000_000_000
    with pcap_file("flood.pcap", 113) as f:
        for i in range(target):
            ip = ip4(external(i // 60000), POD, 6, tcp(1024 + i % 60000, 80, i * 7919, 0, SYN, 0))   # a source each
            frame = sll(0, False, ip)   # to this host, on eth0
            pcap_record(f, t0 + i * 1_000_000_000 // target, frame, len(frame))
    print("generated %d SYNs" % target, file=sys.stderr)
    sys.exit(0)

files = Files()

def tcp_conversation(ev, t, c_ep, s_ep, views, exchanges, close=True):
    """One TCP connection: views(c2s: bool) gives the (src, dst) tuple as captured and where; returns end time."""
    cseq, sseq = random.getrandbits(32), random.getrandbits(32)
    def send(c2s, flags, payload, dt):
        nonlocal t, cseq, sseq
        t += dt
        seq, ack = (cseq, sseq) if c2s else (sseq, cseq)
        for emit in views(c2s):
            emit(t, seq, ack, flags, payload)
        step = payload + (1 if flags & (SYN | FIN) else 0)
        if c2s: cseq = (cseq + step) & 0xffffffff
        else: sseq = (sseq + step) & 0xffffffff
    send(True, SYN, 0, 0)
    send(False, SYN | ACK, 0, 30_000)
    send(True, ACK, 0, 20_000)
    for _ in range(exchanges):
        send(True, PSH | ACK, random.choice((80, 120, 300, 600)), 50_000)
        send(False, ACK, 0, 20_000)
        send(False, PSH | ACK, random.choice((200, 900, 1400)), 400_000)
        send(True, ACK, 0, 20_000)
    if close:
        send(True, FIN | ACK, 0, 100_000)
        send(False, FIN | ACK, 0, 30_000)
        send(True, ACK, 0, 20_000)
    return t

def wire(ev, t, src, dst, sp, dp, seq, ack, flags, payload, lo, outgoing):
    ip = ip4(src[0], dst[0], 6, tcp(sp, dp, seq, ack, flags, payload))
    ev.append((t, 0, sll(0 if lo or not outgoing else 4, lo, ip), 16 + len(ip)))
    return ip

def nf(ev, t, ip, hook, pfx, **kw):
    # libpcap stamps NFLOG records on receipt, in batches: up to a few ms late here.
    ev.append((t + random.randint(50_000, 5_000_000), 1, nflog(ip, hook, pfx, **kw), 0))

def app_outbound(ev, t, i, passthrough=False):
    app = (POD, 20000 + i % 40000); dst = (external(i), 443) if passthrough else (peer(i), 80)
    zt = (POD, 30000 + (i * 7) % 30000); inner_dst = dst if passthrough else (dst[0], 15008)
    n = random.randint(3, 8)
    def app_views(c2s):
        def e(t, seq, ack, flags, payload):
            if c2s:
                if flags == SYN:
                    pre = ip4(app[0], dst[0], 6, tcp(app[1], dst[1], seq, ack, flags, payload))
                    ipid[0] -= 1
                    nf(ev, t, pre, HOOK_OUT, R_REDIRECT_OUT, outdev=2)
                wire(ev, t, app, (LO,), app[1], 15001, seq, ack, flags, payload, True, True)
            else:
                wire(ev, t, dst, app, dst[1], app[1], seq, ack, flags, payload, True, True)
        return [e]
    def zt_views(c2s):
        def e(t, seq, ack, flags, payload):
            if c2s:
                ip = wire(ev, t, zt, inner_dst, zt[1], inner_dst[1], seq, ack, flags, payload + (40 if payload else 0), False, True)
                if flags == SYN: nf(ev, t, ip, HOOK_POST, OBSERVE_OUT, mark=0x539, outdev=2)
            else:
                wire(ev, t, inner_dst, zt, inner_dst[1], zt[1], seq, ack, flags, payload + (40 if payload else 0), False, False)
        return [e]
    end1 = tcp_conversation(ev, t, app, dst, app_views, n)
    end2 = tcp_conversation(ev, t + 120_000, zt, inner_dst, zt_views, n)
    return max(end1, end2)

def inbound(ev, t, i, hbone=True):
    client = (peer(i), 40000 + i % 20000)
    port = 15008 if hbone else 8080
    leg = (client[0], 50000 + (i * 3) % 15000)
    n = random.randint(3, 8)
    def outer(c2s):
        def e(t, seq, ack, flags, payload):
            if c2s:
                ip = wire(ev, t, client, (POD,), client[1], port, seq, ack, flags, payload + (40 if payload and hbone else 0), False, False)
                if not hbone and flags == SYN: nf(ev, t, ip, HOOK_PRE, R_REDIRECT_IN, indev=2)
            else:
                wire(ev, t, (POD,), client, port, client[1], seq, ack, flags, payload + (40 if payload and hbone else 0), False, True)
        return [e]
    def app_leg(c2s):
        def e(t, seq, ack, flags, payload):
            if c2s:
                ip = wire(ev, t, leg, (POD,), leg[1], 8080, seq, ack, flags, payload, True, True)
                nf(ev, t, ip, HOOK_PRE, R_CONNMARK_SET, mark=0x539, indev=1)
            else:
                ip = wire(ev, t, (POD,), leg, 8080, leg[1], seq, ack, flags, payload, True, True)
                nf(ev, t, ip, HOOK_OUT, R_CONNMARK_RESTORE, outdev=1)
                if flags & SYN: nf(ev, t, ip, HOOK_OUT, R_ZTUNNEL_REPLY, mark=0x111, outdev=1)
        return [e]
    end1 = tcp_conversation(ev, t, client, (POD, port), outer, n)
    end2 = tcp_conversation(ev, t + 150_000, leg, (POD, 8080), app_leg, n)
    return max(end1, end2)

def dns(ev, t, i):
    q = ip4(POD, DNS, 17, udp(33000 + i % 30000, 53, 40))
    ev.append((t, 0, sll(4, False, q), 16 + len(q)))
    a = ip4(DNS, POD, 17, udp(53, 33000 + i % 30000, 120))
    ev.append((t + 300_000, 0, sll(0, False, a), 16 + len(a)))
    return t + 300_000

def udp_other(ev, t, i):
    for k in range(4):
        d = ip4(POD, external(i), 17, udp(41000 + i % 20000, 9999, 200))
        ev.append((t + k * 10_000_000, 0, sll(4, False, d), 16 + len(d)))
    return t + 40_000_000

def local(ev, t, i):
    a = (POD, 45000 + i % 15000)
    def views(c2s):
        def e(t, seq, ack, flags, payload):
            if c2s: wire(ev, t, a, (POD,), a[1], 9090, seq, ack, flags, payload, True, True)
            else: wire(ev, t, (POD,), a, 9090, a[1], seq, ack, flags, payload, True, True)
        return [e]
    return tcp_conversation(ev, t, a, (POD, 9090), views, 2)

def escape(ev, t, i):
    a = (POD, 47000 + i % 10000); d = (external(i), 80)
    def views(c2s):
        def e(t, seq, ack, flags, payload):
            if c2s:
                ip = wire(ev, t, a, d, a[1], 80, seq, ack, flags, payload, False, True)
                if flags == SYN: nf(ev, t, ip, HOOK_POST, OBSERVE_OUT, mark=0x539, outdev=2)
            else: wire(ev, t, d, a, 80, a[1], seq, ack, flags, payload, False, False)
        return [e]
    return tcp_conversation(ev, t, a, d, views, 2)

kinds = [(app_outbound, 52), (lambda ev, t, i: app_outbound(ev, t, i, True), 6), (inbound, 22),
         (lambda ev, t, i: inbound(ev, t, i, False), 6), (dns, 8), (udp_other, 3), (local, 3)]
weights = [w for _, w in kinds]
t0 = 1_790_000_000 * 1_000_000_000
i = 0
chunk_start = t0
connections = 0
while files.count < target:
    ev = []
    for k in range(500):
        start = chunk_start + k * 2_000_000
        fn = random.choices([f for f, _ in kinds], weights)[0]
        if i % 4000 == 3999: fn = escape
        fn(ev, start, i)
        i += 1
        connections += 1
    files.write_chunk(ev)
    chunk_start += 500 * 2_000_000 + 200_000_000
files.any.close(); files.nf.close()
print("generated %d packets, %d connections (+ ztunnel legs)" % (files.count, connections), file=sys.stderr)
