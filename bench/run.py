"""Benchmark: imgci side by side with Docker's BuildKit and buildah, build + push through one TLS registry.

Workloads (each on a busybox base image that every builder PULLS from the registry on a cold build):

* ``stages``, ``files``, ``steps``: those of ``cache_rebuild.py`` (4 stages, a 4,000-file context, 40 small steps);
* ``big-run``: one RUN writing 200 MiB (half random, half one repeated byte), then a COPY of a small file and a RUN;
* ``matrix``: the build.yaml matrix of ``matrix.py`` (4 entries sharing a base stage): ``imgci run`` builds every
  entry in one process; the peers have no such thing and build the 4 images one after another;
* ``push``: a 5-layer image (5 x 8 MiB, random) pushed to an empty repository, then to a second repository of the
  same registry (the blobs are there: a client that mounts across repositories uploads nothing).

For each workload, builder and scenario — **cold** (empty builder state, base pulled), **warm** (the same build
again), **one file changed** (a context file used late edited) — the build command(s), then a push of every image
built (to ``HOST/bench/<workload>-<builder>-r<round>:<scenario>``), each timed as the wall time of the command;
peak memory of the builder's processes (for BuildKit dockerd's tree too); bytes uploaded, counted by a TCP relay
in front of the registry. The table gives each peer's total and its ratio to imgci's; ``--json`` writes all of it.

Registry: one ``docker-registry`` (TLS, a test CA, ``tests/infra/registry.py``) for the whole run, in a network
namespace the run creates (``imgci-bench-PID``, a veth pair, the first free /30 of 10.213.47.0/24: .1 here, .2 inside,
no route out of it; removed at exit, Ctrl-C and SIGTERM included), listening on the namespace's address, with the
relay in the namespace too. Every builder connects to that address only (HOST = 10.213.47.2:RELAY_PORT), and
otherwise to loopback: never to this machine's own interface addresses or anywhere else. The address is not a
loopback one because BuildKit and containerd talk plain HTTP to a loopback registry; on it every builder verifies
TLS. A watch samples this machine's sockets during the run and the header says where they went. Without root (no
namespace, no peers) the registry listens on 127.0.0.1.
Trust: imgci through ``certs.d/HOST:PORT/ca.crt`` (``IMGCI_CERTS_D``; on top of the system CAs), dockerd through
``/etc/docker/certs.d/HOST/ca.crt`` (created for the run, removed after), buildah through ``--cert-dir``.

Usage::

    .venv/bin/python bench/run.py [--only WORKLOAD]... [--scenarios cold,warm,changed] [--repeat N]
                                  [--no-peers] [--json out.json] [--dir DIR]

Peers need root and are skipped when missing or with ``--no-peers``; imgci is always measured.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.matrix import DOCKERFILE as MATRIX_DOCKERFILE
from bench.peers import (
    PATH_ENV,
    ROOT,
    Buildah,
    Builder,
    BuildKit,
    CpuMeter,
    Imgci,
    Run,
    Workload,
    big_run_workload,
    combine,
    files_workload,
    imgci_env,
    machine_info,
    machine_line,
    peers_available,
    private_dockerd,
    rm_tree,
    stages_workload,
    startup_seconds,
    steps_workload,
)
from tests.infra import certs
from tests.infra.registry import REGISTRY_BINARY, RegistryServer
from tests.infra.rootfs import make_busybox_rootfs_tar

WORKLOAD_KEYS = ("stages", "files", "steps", "big-run", "matrix", "push")
SCENARIOS = {"cold": "cold", "warm": "warm", "changed": "one file changed"}
PUSH_SCENARIOS = {"empty": "to an empty repository", "full": "to a second repository"}
MATRIX_ENTRIES = 4
MATRIX_BASE_SECONDS = 3
PUSH_LAYERS, PUSH_LAYER_MIB = 5, 8
TIMES = "\N{MULTIPLICATION SIGN}"
MB = 1e6


# -- the network: a namespace of the run's own -------------------------------------------------------------------
CLONE_NEWNET = 0x40000000
SUBNETS = [ipaddress.IPv4Network(f"10.213.47.{4 * i}/30") for i in range(64)]


def ip(*args: str, check: bool = True) -> str:
    """``ip ARGS`` (iproute2); its stdout."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def free_subnet() -> ipaddress.IPv4Network:
    """The first /30 of :data:`SUBNETS` that no address or route of this machine's namespace overlaps."""
    used = [
        ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in json.loads(ip("-j", "-4", "addr", "show") or "[]")
        for a in link.get("addr_info", [])
    ]
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        if route.get("dst", "default") != "default":
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    for net in SUBNETS:
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /30 in {SUBNETS[0]}…{SUBNETS[-1]}")


def enter_netns(name: str) -> None:
    """Move the calling THREAD (not the process) into the network namespace ``name`` (setns(2); Python 3.11 has no
    ``os.setns``): sockets it creates from then on belong to that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (they are delivered right after)."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def on_exit(stack: ExitStack, fn: Callable[[], object]) -> None:
    """Run ``fn`` when ``stack`` unwinds (the normal end, an exception, Ctrl-C, SIGTERM/SIGHUP) and, if it did not
    finish then (a second Ctrl-C), once more at interpreter exit. ``fn`` must be idempotent."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            fn()
            done = True

    stack.callback(once)
    atexit.register(once)


class Netns:
    """A network namespace of this run (``imgci-bench-PID``) joined to this machine's namespace by a veth pair, the
    two ends addressed from a private /30 that nothing here uses (:func:`free_subnet`): ``host_address`` on this
    side, ``address`` inside. The namespace has its ``lo`` and the veth end, no other route: what runs in it (the
    registry, the relay) can reach nothing but this machine through the veth. IPv6 is off on both ends (no
    link-local addresses, no neighbour discovery). :meth:`close` removes it all; it is idempotent."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"imgci-bench-{pid}"
        self.host_if, self.ns_if = f"ibh{pid}", f"ibn{pid}"  # interface names: at most 15 characters
        self.subnet = free_subnet()
        host_address, address = self.subnet.hosts()
        self.host_address, self.address = str(host_address), str(address)
        self.closed = False
        try:
            with signals_held():
                self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        ip("netns", "add", self.name)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        ip("link", "set", self.ns_if, "netns", self.name)
        ends = (((), self.host_if, self.host_address), (("-n", self.name), self.ns_if, self.address))
        for netns, dev, address in ends:
            sysctl = ["sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1"]
            in_netns = ["ip", "netns", "exec", self.name] if netns else []
            subprocess.run([*in_netns, *sysctl], capture_output=True)  # fails only where IPv6 is off already
            ip(*netns, "link", "set", dev, "mtu", "65535")  # the most a veth takes: near loopback's 65536
            ip(*netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", dev)
            ip(*netns, "link", "set", dev, "up")
        ip("-n", self.name, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill what still runs in the namespace (only this run's processes can be there), delete the veth pair
        and the namespace."""
        if self.closed:
            return
        with signals_held():
            listed = ip("netns", "pids", self.name, check=False).split()
            for pid in {int(p) for p in listed if p.isdigit()} - {os.getpid()}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("link", "del", self.host_if, check=False)  # the peer inside goes with it
            ip("netns", "del", self.name, check=False)
            self.closed = True

    def describe(self) -> str:
        return (
            f"network namespace {self.name} ({self.address}/{self.subnet.prefixlen}; veth {self.host_if}"
            f" {self.host_address} here)"
        )


# -- the registry -------------------------------------------------------------------------------------------------
class BenchRegistry(RegistryServer):
    """The test registry (TLS), listening on ``address`` (its certificate names that address) — inside the network
    namespace ``netns`` when given: ``docker-registry serve`` is started through ``ip netns exec``."""

    def __init__(self, workdir: Path, address: str, netns: str | None = None) -> None:
        self.address = address
        binary = REGISTRY_BINARY
        if netns:
            wrapper = workdir / "docker-registry-in-netns"
            wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {REGISTRY_BINARY} "$@"\n')
            wrapper.chmod(0o755)
            binary = str(wrapper)  # ip netns exec execs: the registry keeps the pid of our child
        super().__init__(workdir, tls=True, binary=binary)

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def _make_tls(self) -> tuple[Path, Path]:
        ca_key = certs.generate_key("ec")
        ca_cert = certs.make_self_signed(ca_key, "imgci bench CA", ca=True)
        self.ca_path = certs.write_cert(self.workdir / "ca.pem", ca_cert)
        key = certs.generate_key("ec")
        cert = certs.make_server_cert(ca_key, ca_cert, key, ips=(self.address,), dns_names=())
        return (
            certs.write_cert(self.workdir / "server.pem", cert, ca_cert),
            certs.write_key(self.workdir / "server-key.pem", key),
        )

    def pid(self) -> int:
        """The registry process (our child) — its CPU time is the push's, not other load."""
        return self._proc.pid if self._proc else 0


class CountingRelay:
    """A TCP relay from ``address``:PORT to the registry that counts the bytes each way (TLS passes through: the
    counts are of TLS records, a fraction of a percent above the HTTP bytes, handshakes included).

    With ``netns`` its listening socket and its connections to the registry are made in that network namespace: one
    thread of this process joins it (setns(2) is per thread) and accepts; the threads that move the bytes only use
    the sockets it made."""

    def __init__(self, address: str, upstream: tuple[str, int], netns: str | None = None) -> None:
        self.upstream = upstream
        self.up = self.down = 0  # client → registry, registry → client
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.port = 0
        self.server: socket.socket | None = None
        ready: list[BaseException | None] = []
        started = threading.Event()

        def serve() -> None:
            try:
                if netns:
                    enter_netns(netns)
                self.server = socket.create_server((address, 0))
                self.port = self.server.getsockname()[1]
                ready.append(None)
            except BaseException as e:  # raised in the constructor
                ready.append(e)
                return
            finally:
                started.set()
            self._accept(self.server)

        threading.Thread(target=serve, daemon=True, name="relay").start()
        started.wait()
        if ready[0] is not None:
            raise ready[0]

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.upstream)  # in this thread's namespace
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                # As the builders' own sockets (Go's, urllib3's): no Nagle. Without it the relay, which writes what
                # it reads in pieces of its own, holds a small second piece until the first is acknowledged — up to
                # the peer's 40 ms delayed ACK on a request/response exchange that a direct connection does not pay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        """Move bytes from ``src`` to ``dst`` through a pipe with splice(2): the data never enters Python."""
        pipe_r, pipe_w = os.pipe()
        try:
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # the default pipe size (64 KiB) works too, with more system calls
        try:
            while n := os.splice(src.fileno(), pipe_w, 1 << 20, flags=os.SPLICE_F_MOVE):
                left = n
                while left:
                    left -= os.splice(pipe_r, dst.fileno(), left, flags=os.SPLICE_F_MOVE)
                with self.lock:
                    if up:
                        self.up += n
                    else:
                        self.down += n
        except OSError:
            pass
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if self.server is not None:
            try:
                self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the relay thread
            except OSError:
                pass
            self.server.close()
        with self.lock:
            for conn in self.conns:
                conn.close()


# -- checking where connections go ----------------------------------------------------------------------------------
TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT",
    "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


def _proc_net_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` (/proc/net/tcp: each 32-bit word in host order, little-endian here) → (127.0.0.1, 8080)."""
    hexaddr, hexport = text.split(":")
    raw = bytes.fromhex(hexaddr)
    addr = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr, int(hexport, 16)


class ConnectionWatch(threading.Thread):
    """Every 50 ms, every TCP and UDP socket of THIS machine's network namespace (``/proc/PID/net/{tcp,tcp6,udp,
    udp6}``, any process's) that has a peer: its remote address is recorded; one that is neither loopback nor in
    ``allowed`` is looked up (which process owns it) and reported. Closed TCP connections stay listed for 60 s in
    TIME_WAIT on the side that closed first (the clients, at the latest when they exit), so even short ones show."""

    def __init__(self, allowed: set[str], interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="connection-watch")
        self.allowed = allowed
        self.interval = interval
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, str, str], set[str]] = {}  # (proto, remote ip, remote port) → local endpoints
        self.offenders: dict[str, str] = {}  # "proto local → remote" → owner
        self.before: set[tuple[str, str, str]] | None = None  # sockets there before the run: not its
        self.samples = 0
        self.sample()  # the baseline
        self.start()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        now: set[tuple[str, str, str]] = set()
        for proto in ("tcp", "tcp6", "udp", "udp6"):
            try:
                lines = Path(f"/proc/{os.getpid()}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                continue  # no IPv6 here
            for line in lines:
                f = line.split()
                (laddr, lport), (raddr, rport) = _proc_net_address(f[1]), _proc_net_address(f[2])
                if raddr.is_unspecified or (proto.startswith("tcp") and f[3] == "0A"):
                    continue  # listening or unconnected
                now.add((proto, f[1], f[2]))
                if self.before is None or (proto, f[1], f[2]) in self.before:
                    continue
                key = (proto.rstrip("6"), str(raddr), str(rport))
                with self.lock:
                    self.seen.setdefault(key, set()).add(f"{laddr}:{lport}")
                if not (raddr.is_loopback or str(raddr) in self.allowed):
                    what = f"{proto} {laddr}:{lport} → {raddr}:{rport}"
                    if what not in self.offenders:
                        self.offenders[what] = f"{TCP_STATES.get(f[3], f[3])}, {_socket_owner(f[9])}"
        if self.before is None:
            self.before = now
        self.samples += 1

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join()

    def summary(self) -> dict[str, Any]:
        with self.lock:
            by_remote: dict[str, int] = {}
            for (proto, raddr, rport), locals_ in self.seen.items():
                kind = "loopback" if ipaddress.ip_address(raddr).is_loopback else f"{raddr}:{rport}"
                by_remote[f"{kind}/{proto}"] = by_remote.get(f"{kind}/{proto}", 0) + len(locals_)
            return {"samples": self.samples, "connections": by_remote, "elsewhere": dict(self.offenders)}


def _socket_owner(inode: str) -> str:
    """Which process holds the socket with this inode (``pid comm``), from /proc/*/fd."""
    if inode == "0":
        return "no owner (closed)"
    target = f"socket:[{inode}]"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == target:
                    pid = fd_dir.parent.name
                    return f"pid {pid} {Path(f'/proc/{pid}/comm').read_text().strip()}"
        except OSError:
            continue
    return "owner not found"


@contextmanager
def docker_trust(host: str, ca: Path) -> Iterator[Path]:
    """``/etc/docker/certs.d/HOST/ca.crt`` (dockerd reads it at start for BuildKit, at each push for itself)."""
    certs_d = Path("/etc/docker/certs.d")
    made = [p for p in (certs_d.parent, certs_d) if not p.exists()]
    target = certs_d / host

    def remove() -> None:
        shutil.rmtree(target, ignore_errors=True)
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass  # gone already, or something else put files there meanwhile

    atexit.register(remove)  # should the finally below not finish
    target.mkdir(parents=True)
    try:
        shutil.copy(ca, target / "ca.crt")
        yield target
    finally:
        remove()


# -- measuring ----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One (workload, builder, scenario) in one round: its build and push commands and the bytes they moved."""

    build: Run
    push: Run
    uploaded: int = 0  # client → registry during the push commands
    pulled: int = 0  # registry → client during the build commands

    @property
    def error(self) -> str:
        return self.build.error or self.push.error

    @property
    def total(self) -> float:
        return self.build.wall + self.push.wall

    @property
    def peak(self) -> int:
        return max(self.build.peak, self.push.peak)

    @property
    def daemon_peak(self) -> int:
        return max(self.build.daemon_peak, self.push.daemon_peak)


@dataclass
class Bench:
    work: Path
    host: str  # the registry as the builders see it (the relay)
    relay: CountingRelay
    meter: CpuMeter
    services: list[int]  # the registry process

    def ref(self, repo: str, tag: str) -> str:
        return f"{self.host}/bench/{repo}:{tag}"

    def measure(self, builder: Builder, build: Callable[[], Run] | None, push: Callable[[], Run]) -> Sample:
        """Time ``build`` (None: nothing to build), then ``push`` unless the build failed."""
        services = [*builder.daemons, *self.services]
        settle()
        _, down0 = self.relay.counts()
        with self.meter.window(services):
            built = build() if build else Run()
        up1, down1 = self.relay.counts()
        if built.error:
            return Sample(built, Run(error="not pushed: the build failed"), 0, down1 - down0)
        with self.meter.window(services):
            pushed = push()
        up2, _ = self.relay.counts()
        return Sample(built, pushed, up2 - up1, down1 - down0)

    def measure_one(self, builder: Builder, both: Callable[[], tuple[Run, Run]]) -> Sample:
        """One command that builds and pushes (imgci's ``build --push``): its bytes up count as the push's, down
        as the build's (the base image pulled; the push's few replies are in it too)."""
        services = [*builder.daemons, *self.services]
        settle()
        up0, down0 = self.relay.counts()
        with self.meter.window(services):
            built, pushed = both()
        up1, down1 = self.relay.counts()
        return Sample(built, pushed, up1 - up0, down1 - down0)

    def build_and_push(self, builder: Builder, ctx: Path, tag: str) -> Sample:
        if isinstance(builder, Imgci) and builder.one_command:
            return self.measure_one(builder, partial(builder.build_push, ctx, tag))
        return self.measure(builder, partial(builder.build, ctx, tag), partial(builder.push, tag))


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs; iowait counts as busy (a disk still writing is not quiet)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3], sum(fields[:8])


def settle(max_wait: float = 5.0, window: float = 0.1, idle: float = 0.9) -> float:
    """Before a timed command: write the previous commands' dirty pages out (``sync``), then wait until the CPUs
    were at least 90 % idle over a 0.1 s window — a daemon's garbage collection after ``builder prune``, ext4
    freeing blocks of a removed tree, writeback — or ``max_wait`` passed. Returns the seconds waited."""
    os.sync()
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        idle0, total0 = _cpu_times()
        time.sleep(window)
        idle1, total1 = _cpu_times()
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= idle:
            break
    return time.perf_counter() - start


def progress(workload: str, builder: Builder, scenario: str, s: Sample) -> None:
    b = s.build
    counts = f" ({b.executed} run, {b.cached} cached)" if b.cached is not None else ""
    shown = (
        f"build {b.wall:.2f}s{counts} + push {s.push.wall:.2f}s, peak {s.peak / MB:.0f} MB,"
        f" {s.uploaded / MB:.1f} MB up, {s.pulled / MB:.1f} MB pulled"
    )
    print(f"  {workload} · {builder.name} · {scenario}: {s.error or shown}", file=sys.stderr, flush=True)


def first_scenarios(wanted: list[str]) -> list[str]:
    """The scenarios to go through to reach the wanted ones (warm needs cold before it, and so on)."""
    last = max(list(SCENARIOS).index(s) for s in wanted)
    return list(SCENARIOS)[: last + 1]


def dockerfile_round(bench: Bench, w: Workload, b: Builder, rnd: int, wanted: list[str]) -> dict[str, Sample]:
    ctx = bench.work / f"ctx-{w.key}-{b.key}-{rnd}"
    w.materialise(ctx)
    b.reset()
    out: dict[str, Sample] = {}
    for scenario in first_scenarios(wanted):
        if scenario == "changed":
            w.change(ctx)
        tag = bench.ref(f"{w.key}-{b.key}-r{rnd}", scenario)
        out[scenario] = s = bench.build_and_push(b, ctx, tag)
        progress(w.name, b, SCENARIOS[scenario], s)
    rm_tree(ctx)
    return {k: v for k, v in out.items() if k in wanted}


MATRIX_YAML = """\
version: 1
targets:
  app:
    target: app
    args: {{N: "${{{{ matrix.n }}}}"}}
    tags: ["{repo}:${{{{ matrix.n }}}}-{scenario}"]
    matrix:
      n: {entries}
"""


def matrix_round(bench: Bench, base: str, b: Builder, rnd: int, wanted: list[str]) -> dict[str, Sample]:
    """imgci: ``imgci run --no-push`` then ``imgci run --push`` (the second builds nothing: every step is cached);
    a peer: ``build --target app --build-arg N=n`` for each entry in turn, then a push of each."""
    project = bench.work / f"matrix-{b.key}-{rnd}"
    dockerfile = MATRIX_DOCKERFILE.format(base_seconds=MATRIX_BASE_SECONDS)
    assert "localhost/busybox:latest" in dockerfile
    app = Workload(
        "matrix",
        f"build.yaml matrix, {MATRIX_ENTRIES} entries",
        dockerfile.replace("localhost/busybox:latest", base),
        {"app.txt": b"app\n"},
        "app.txt",
    )
    app.materialise(project)
    b.reset()
    repo = f"{bench.host}/bench/matrix-{b.key}-r{rnd}"
    out: dict[str, Sample] = {}
    for scenario in first_scenarios(wanted):
        if scenario == "changed":
            app.change(project)
        tags = [f"{repo}:{n}-{scenario}" for n in range(MATRIX_ENTRIES)]
        build: Callable[[], Run]
        push: Callable[[], Run]
        if isinstance(b, Imgci):
            config = project / "build.yaml"
            entries = json.dumps([str(n) for n in range(MATRIX_ENTRIES)])
            config.write_text(MATRIX_YAML.format(repo=repo, scenario=scenario, entries=entries))
            if b.one_command:
                out[scenario] = s = bench.measure_one(b, partial(b.run_matrix_push, config))
                progress(app.name, b, SCENARIOS[scenario], s)
                continue
            build, push = partial(b.run_matrix, config, push=False), partial(b.run_matrix, config, push=True)
        else:
            build, push = partial(build_one_by_one, b, project, tags), partial(push_one_by_one, b, tags)
        out[scenario] = s = bench.measure(b, build, push)
        progress(app.name, b, SCENARIOS[scenario], s)
    rm_tree(project)
    return {k: v for k, v in out.items() if k in wanted}


def build_one_by_one(b: Builder, project: Path, tags: list[str]) -> Run:
    """A peer's matrix: ``build --target app --build-arg N=n -t TAG`` for each entry in turn."""
    args = [["--target", "app", "--build-arg", f"N={n}"] for n in range(len(tags))]
    return combine([b.build(project, tag, a) for tag, a in zip(tags, args, strict=True)])


def push_one_by_one(b: Builder, tags: list[str]) -> Run:
    return combine([b.push(tag) for tag in tags])


def push_workload(base: str) -> Workload:
    runs = [f"RUN dd if=/dev/urandom of=/layer{i} bs=1M count={PUSH_LAYER_MIB} 2>/dev/null" for i in range(PUSH_LAYERS)]
    name = f"push of {PUSH_LAYERS} layers x {PUSH_LAYER_MIB} MiB"
    return Workload("push", name, "\n".join([f"FROM {base}", *runs]) + "\n", {}, "")


def push_round(bench: Bench, base: str, b: Builder, rnd: int) -> dict[str, Sample]:
    """Cold build, push to an empty repository; then (nothing built) the same image to a second repository."""
    w = push_workload(base)
    ctx = bench.work / f"ctx-push-{b.key}-{rnd}"
    w.materialise(ctx)
    b.reset()
    first, second = bench.ref(f"push-{b.key}-r{rnd}", "1"), bench.ref(f"push-{b.key}-r{rnd}-second", "1")
    out = {"empty": bench.build_and_push(b, ctx, first)}
    progress(w.name, b, PUSH_SCENARIOS["empty"], out["empty"])
    out["full"] = bench.measure(b, None, partial(b.push, first, second))
    progress(w.name, b, PUSH_SCENARIOS["full"], out["full"])
    rm_tree(ctx)
    return out


# -- results ------------------------------------------------------------------------------------------------------
def summary(samples: list[Sample]) -> dict[str, Any]:
    """Medians over the rounds that worked (every round kept under ``rounds``)."""
    rounds = [
        {
            "build_s": round(s.build.wall, 3),
            "push_s": round(s.push.wall, 3),
            "peak_mb": round(s.peak / MB, 1),
            "daemon_peak_mb": round(s.daemon_peak / MB, 1),
            "uploaded_mb": round(s.uploaded / MB, 3),
            "pulled_mb": round(s.pulled / MB, 3),
            "executed": s.build.executed,
            "cached": s.build.cached,
            **({"error": s.error} if s.error else {}),
        }
        for s in samples
    ]
    ok = [s for s in samples if not s.error]
    if not ok:
        return {"error": samples[0].error if samples else "not run", "rounds": rounds}

    def med(f: Callable[[Sample], float], scale: float = 1.0, digits: int = 3) -> float:
        return round(statistics.median(f(s) for s in ok) / scale, digits)

    return {
        "total_s": med(lambda s: s.total),
        "build_s": med(lambda s: s.build.wall),
        "push_s": med(lambda s: s.push.wall),
        "peak_mb": med(lambda s: s.peak, MB, 1),
        "daemon_peak_mb": med(lambda s: s.daemon_peak, MB, 1),
        "uploaded_mb": med(lambda s: s.uploaded, MB),
        "pulled_mb": med(lambda s: s.pulled, MB),
        "executed": ok[-1].build.executed,
        "cached": ok[-1].build.cached,
        "rounds": rounds,
    }


def _cells(me: dict[str, Any], cell: dict[str, Any], is_me: bool) -> list[str]:
    if "total_s" not in cell:
        return [f"error: {cell.get('error', '-')[:60]}", "", "", ""]
    total = f"{cell['total_s']:.2f}"
    if not is_me and me.get("total_s"):
        total += f" ({cell['total_s'] / me['total_s']:.2f}{TIMES})"
    return [
        total,
        f"{cell['build_s']:.2f} + {cell['push_s']:.2f}",
        f"{cell['peak_mb']:.0f}",
        f"{cell['uploaded_mb']:.{2 if cell['uploaded_mb'] < 10 else 1}f}",
    ]


def network_lines(net: dict[str, Any]) -> list[str]:
    """Where the builders connected: the rule (loopback, or the run's own namespace) and what the watch saw."""
    if net["namespace"]:
        lines = [
            f"network: every builder connects only to {net['address']}, inside the run's own network namespace"
            f" {net['namespace']} (veth {net['veth'][0]} {net['host_address']} ↔ {net['address']}, {net['subnet']};"
            " no route out of it), and to loopback; never to this machine's own interface addresses or elsewhere"
        ]
    else:
        lines = [f"network: loopback only (registry on {net['address']}; no network namespace)"]
    watch = net.get("watch")
    if watch:
        seen = ", ".join(f"{n} to {where}" for where, n in sorted(watch["connections"].items())) or "none"
        elsewhere = "a warning below" if watch["elsewhere"] else "none"
        lines.append(
            f"  checked: the TCP/UDP sockets of this machine's namespace, sampled every 50 ms during the run"
            f" ({watch['samples']} samples), new ones with a peer: {seen}; to any other address: {elsewhere}"
        )
        if watch["elsewhere"]:
            lines.append("warning: sockets to other addresses during the run (any process of this machine):")
            lines += [f"  {what} ({owner})" for what, owner in watch["elsewhere"].items()]
    return lines


def print_tables(result: dict[str, Any]) -> list[str]:
    """Print the header, a table per workload, the summary and the notes; returns the summary's target lines."""
    print(machine_line(result["machine"]))
    if result["machine"]["other_cpu_share"] > 0.1:
        print("warning: the machine was busy with other work; these numbers are not representative")
    print("builders: " + "; ".join(result["builders"].values()))
    print(f"registry: {result['registry']}")
    for name, how in result["trust"].items():
        print(f"  {name} trusts its CA through {how}")
    for line in network_lines(result["network"]):
        print(line)
    names = list(result["builders"])
    repeat = result["args"]["repeat"]
    what = f"median of {repeat}" if repeat > 1 else "one run"
    print(
        f"\nSeconds, build + push = total ({what}); a peer's total is followed by its ratio to imgci's (above 1:"
        " slower); peak MB: the builder's processes (BuildKit: with dockerd and containerd); up MB: bytes sent"
        " to the registry by the push"
    )
    for workload in result["workloads"]:
        rows = [r for r in result["rows"] if r["workload"] == workload["key"]]
        if not rows:
            continue
        print(f"\n### {workload['name']}\n")
        head = ["scenario"]
        for n in names:
            head += [f"{n} s", "build + push", "peak MB", "up MB"]
        print("| " + " | ".join(head) + " |")
        print("|---|" + "--:|" * (len(head) - 1))
        for row in rows:
            me = row["builders"].get("imgci", {})
            cells = [row["scenario_name"]]
            for n in names:
                cells += _cells(me, row["builders"].get(n, {}), n == "imgci")
            print("| " + " | ".join(cells) + " |")
    targets = print_summary(result)
    print()
    for note in result["notes"]:
        print(f"note: {note}")
    return targets


def print_summary(result: dict[str, Any]) -> list[str]:
    """One line per workload: every builder's totals, row by row (a peer's with its ratio to imgci's); then how
    imgci stands against the fastest peer of each row: at or below it on cold and one-file-change rows, within
    1.5x on warm rows (imgci a fresh process, BuildKit a daemon already running)."""
    names = list(result["builders"])
    print("\n### Summary (total seconds, build + push)\n")
    print("| workload | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    verdicts: list[str] = []
    for workload in result["workloads"]:
        rows = [r for r in result["rows"] if r["workload"] == workload["key"]]
        if not rows:
            continue
        cells = []
        for n in names:
            parts = []
            for row in rows:
                me, cell = row["builders"].get("imgci", {}), row["builders"].get(n, {})
                if "total_s" not in cell:
                    parts.append("error")
                elif n == "imgci" or not me.get("total_s"):
                    parts.append(f"{cell['total_s']:.2f}")
                else:
                    parts.append(f"{cell['total_s']:.2f} ({cell['total_s'] / me['total_s']:.2f}{TIMES})")
            cells.append(" · ".join(parts))
        print(f"| {workload['name']} | " + " | ".join(cells) + " |")
        for row in rows:
            me = row["builders"].get("imgci", {}).get("total_s")
            peers = [c["total_s"] for n, c in row["builders"].items() if n != "imgci" and "total_s" in c]
            if me is None or not peers:
                continue
            # warm rows, and the push to a second repository (nothing new to send: the push's own warm case),
            # are within 1.5x of the fastest peer; cold and one-file rows at most 1x (the targets)
            best, bound = min(peers), 1.5 if row["scenario"] in ("warm", "full") else 1.0
            ok = me <= best * bound
            verdicts.append(
                f"{'ok' if ok else 'MISSED'}: {workload['name']}, {row['scenario_name']}: imgci {me:.2f} s,"
                f" fastest peer {best:.2f} s ({me / best:.2f}{TIMES} of it; target {bound:g}{TIMES})"
            )
    for line in verdicts:
        print(f"target {line}")
    return verdicts


# -- main ---------------------------------------------------------------------------------------------------------
def publish_base(work: Path, base_tar: Path, ref: str, bundle: Path) -> None:
    """The busybox rootfs made an image (``imgci import``) and pushed as ``ref``, from a state of its own."""
    env = imgci_env() | {"IMGCI_STATE": str(work / "publisher-state"), "REQUESTS_CA_BUNDLE": str(bundle)}
    for args in (["import", str(base_tar), ref, "--change", f"ENV {PATH_ENV}"], ["push", ref]):
        subprocess.run([sys.executable, "-m", "imgci", *args], env=env, cwd=ROOT, check=True, capture_output=True)
    rm_tree(work / "publisher-state")


def start_peers(
    stack: ExitStack, work: Path, host: str, ca: Path, base: str, notes: list[str], trust: dict[str, str]
) -> list[Builder]:
    """BuildKit and buildah when they can run here, each checked by pulling the base once (untimed)."""
    out: list[Builder] = []
    available = peers_available()
    if available["BuildKit"]:
        if ipaddress.ip_address(host.rsplit(":", 1)[0]).is_loopback:
            notes.append(
                "BuildKit skipped: no network namespace for the registry, and BuildKit talks plain HTTP to a"
                " loopback one"
            )
        else:
            try:
                certs_dir = stack.enter_context(docker_trust(host, ca))
                buildkit = BuildKit(stack.enter_context(private_dockerd(work)))
                buildkit.docker("pull", base)
                buildkit.reset()
                out.append(buildkit)
                trust["BuildKit"] = f"{certs_dir}/ca.crt (dockerd's certs.d)"
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                notes.append(f"BuildKit skipped: {detail.strip()[-300:]}")
    if available["buildah"]:
        cert_dir = work / "buildah-certs"
        cert_dir.mkdir()
        shutil.copy(ca, cert_dir / "ca.crt")
        buildah = Buildah(work, cert_dir=cert_dir)
        stack.callback(buildah.close)
        check = subprocess.run([*buildah.base, "pull", "-q", *buildah.tls, base], capture_output=True, text=True)
        if check.returncode != 0:
            notes.append(f"buildah: --cert-dir failed ({_last(check.stderr)}); using --tls-verify=false")
            buildah.tls = ["--tls-verify=false"]
            check = subprocess.run([*buildah.base, "pull", "-q", *buildah.tls, base], capture_output=True, text=True)
        if check.returncode == 0:
            buildah.reset()
            out.append(buildah)
            trust["buildah"] = " ".join(buildah.tls)
        else:
            notes.append(f"buildah skipped: {_last(check.stderr)}")
    return out


def open_netns(notes: list[str]) -> Netns | None:
    """The run's network namespace for the registry; None (and a note) when it cannot be made: then the registry
    listens on loopback and BuildKit, which talks plain HTTP to a loopback registry, is skipped."""
    if os.geteuid() != 0:
        notes.append("not root: the registry listens on 127.0.0.1 (no network namespace without root)")
        return None
    try:
        return Netns()
    except (OSError, RuntimeError) as e:
        notes.append(f"no network namespace ({e}): the registry listens on 127.0.0.1")
        return None


def _last(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=WORKLOAD_KEYS, help="run this workload (repeatable)")
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated, of cold,warm,changed (default all; the push workload has its own two)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="rounds per measurement; medians reported (default 1)")
    ap.add_argument("--no-peers", action="store_true", help="measure imgci only")
    ap.add_argument(
        "--imgci-two-commands",
        action="store_true",
        help="imgci: `imgci build` then `imgci push` (two processes, as the peers) instead of `imgci build --push`",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--dir", type=Path, default=None, help="where to put states and contexts (default: $TMPDIR)")
    args = ap.parse_args()
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not wanted or not set(wanted) <= set(SCENARIOS):
        ap.error(f"--scenarios: give some of {','.join(SCENARIOS)}")
    wanted = [s for s in SCENARIOS if s in wanted]
    for sig in (signal.SIGTERM, signal.SIGHUP):  # run the cleanup below when killed (Ctrl-C: KeyboardInterrupt)
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    notes: list[str] = []
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="imgci-bench-", dir=args.dir))
        on_exit(stack, partial(rm_tree, work))  # last: the callbacks run in reverse
        netns = open_netns(notes)
        if netns:
            on_exit(stack, netns.close)
        address = netns.address if netns else "127.0.0.1"
        watch = ConnectionWatch({address})
        stack.callback(watch.stop)
        registry = BenchRegistry(work, address, netns.name if netns else None)
        stack.callback(registry.stop)
        assert registry.ca_path is not None
        relay = CountingRelay(address, (address, registry.port), netns.name if netns else None)
        stack.callback(relay.close)
        host = f"{address}:{relay.port}"
        bundle = work / "ca-bundle.pem"
        system_cas = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle.write_bytes((system_cas.read_bytes() if system_cas.exists() else b"") + registry.ca_path.read_bytes())
        base = f"{host}/bench/base:1"
        publish_base(work, make_busybox_rootfs_tar(work / "busybox.tar"), base, bundle)

        certs_d = work / "certs.d"  # docker's layout, as dockerd's /etc/docker/certs.d (see docker_trust)
        (certs_d / host).mkdir(parents=True)
        shutil.copyfile(registry.ca_path, certs_d / host / "ca.crt")
        imgci = Imgci(work, certs_d=certs_d, one_command=not args.imgci_two_commands)
        stack.callback(imgci.close)
        builders: list[Builder] = [imgci]
        trust = {"imgci": "IMGCI_CERTS_D: certs.d/HOST:PORT/ca.crt (the test CA, on top of the system's)"}
        if not args.no_peers:
            builders += start_peers(stack, work, host, registry.ca_path, base, notes, trust)
        bench = Bench(work, host, relay, CpuMeter(), [registry.pid()])
        keys = [k for k in WORKLOAD_KEYS if k in (args.only or WORKLOAD_KEYS)]
        workloads = {w.key: w for w in (stages_workload(base), files_workload(base), steps_workload(base))}
        workloads["big-run"] = big_run_workload(base)
        names = {k: w.name for k, w in workloads.items()}
        names["matrix"] = f"build.yaml matrix of {MATRIX_ENTRIES} entries sharing a base stage"
        names["push"] = push_workload(base).name
        result: dict[str, Any] = {
            "machine": machine_info(work),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
            "builders": {b.name: b.version() for b in builders},
            "registry": (
                f"{_registry_version()} over TLS{f' in the {netns.describe()}' if netns else ''}, reached as {host}"
                f" (a byte-counting TCP relay{' in the namespace' if netns else ''} to the registry at"
                f" {registry.host}); base image {base} pulled by each cold build"
            ),
            "network": {
                "namespace": netns.name if netns else None,
                "subnet": str(netns.subnet) if netns else None,
                "veth": [netns.host_if, netns.ns_if] if netns else None,
                "host_address": netns.host_address if netns else None,
                "address": address,
                "relay": host,
                "registry": registry.host,
            },
            "trust": trust,
            "imgci_startup_s": round(startup_seconds(), 3),
            "workloads": [{"key": k, "name": names[k]} for k in keys],
            "rows": [],
        }
        t0 = time.perf_counter()
        for key in keys:
            per: dict[str, dict[str, list[Sample]]] = {}  # builder → scenario → rounds
            for rnd in range(args.repeat):  # rounds interleave the builders: none always follows the same one
                for b in builders:
                    if key == "matrix":
                        got = matrix_round(bench, base, b, rnd, wanted)
                    elif key == "push":
                        got = push_round(bench, base, b, rnd)
                    else:
                        got = dockerfile_round(bench, workloads[key], b, rnd, wanted)
                    for scenario, sample in got.items():
                        per.setdefault(b.name, {}).setdefault(scenario, []).append(sample)
            scenario_names = PUSH_SCENARIOS if key == "push" else {s: SCENARIOS[s] for s in wanted}
            for scenario, scenario_name in scenario_names.items():
                row: dict[str, Any] = {"workload": key, "scenario": scenario, "scenario_name": scenario_name}
                row["builders"] = {b.name: summary(per.get(b.name, {}).get(scenario, [])) for b in builders}
                result["rows"].append(row)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        watch.stop()
        result["network"]["watch"] = watch.summary()
        result["imgci_sandbox"] = imgci.sandbox
        other, kernel = bench.meter.shares()
        result["machine"].update(other_cpu_share=round(other, 3), kernel_cpu_share=round(kernel, 3))
        notes += run_notes(result, keys)
        result["notes"] = notes
        result["targets"] = print_tables(result)
        print(f"\n(total {result['total_s']} s)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")


def run_notes(result: dict[str, Any], keys: list[str]) -> list[str]:
    if result["args"].get("imgci_two_commands"):
        how = "`imgci build -t TAG` then `imgci push TAG`, as the peers do"
    else:
        how = (
            "one command builds and pushes, as a CI step runs it (`imgci build --push -t TAG`, the matrix"
            " `imgci run --push`); its push seconds are those its metadata file reports (the matrix: the longest"
            " entry's push), its build the rest of the command's time"
        )
    notes = [
        f"imgci: a new `python -m imgci` process per command (`python -m imgci --help` alone:"
        f" {result['imgci_startup_s']:.2f}s); {how}; cold = a fresh state directory"
    ]
    if result.get("imgci_sandbox"):
        notes.append(f"imgci's sandbox: {result['imgci_sandbox']}")
    if "BuildKit" in result["builders"]:
        notes.append(
            "BuildKit: `docker build` and `docker push` are clients of a dockerd already running (its start-up is"
            " not timed; its memory and CPU are counted); cold = `docker rmi` of every image + `builder prune -af`"
        )
    if "buildah" in result["builders"]:
        notes.append("buildah: vfs storage, chroot isolation, layers stored uncompressed (compressed when pushed)")
    if "matrix" in keys:
        notes.append(
            "matrix: imgci builds every entry in one process"
            + (
                " (`imgci run --no-push`, then `imgci run --push`, which rebuilds nothing)"
                if result["args"].get("imgci_two_commands")
                else " (`imgci run --push`: each entry pushed as soon as it is built)"
            )
            + "; the peers have no one-process matrix: 4 builds one after another, then 4 pushes"
        )
    if "push" in keys:
        notes.append(
            "push: a cold build, then a push to an empty repository; then the same image to a second repository"
            " of the registry (no build), whose blobs a client can mount instead of uploading"
        )
    return notes


def _registry_version() -> str:
    out = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True).stdout.split()
    return f"docker-registry {out[-1]}" if out else "docker-registry"


if __name__ == "__main__":
    main()
