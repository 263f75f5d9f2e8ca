"""All-to-all between the ranks of one host through POSIX shared memory.

`ShmTransport.all_to_all_single(out, x, recv_splits, send_splits)` has exactly the semantics of
`torch.distributed.all_to_all_single(out, x, recv_splits, send_splits, group)` (rows = dim 0,
variable splits, any dtype and trailing shape, zero-row messages) and gives bit-identical
results: bytes are copied, never reduced or converted. It is the CPU analogue of DeepEP's NVLink
buffers: a peer's receive buffer is mapped into every local rank, so a row crosses memory once
on the way in and once on the way out, without a socket or a copy through the kernel.

Layout. Group ranks are node-major: group rank g is on node g // ranks_per_node. Each rank owns
one segment (`/dev/shm/epruntime-shm-<uid>-<token>-g<rank>`, token random per transport, so
unique per job, group and rank), mapped by every local rank of the group:

    [0, 64)            header: magic, local ranks L, region bytes, pid, arrival[2] (below)
    [64, 128)          abort word: the call number this rank gave up on (0: none)
    [128, 1152)        abort message (utf-8), what the aborting rank raised
    [2048, ...)        per local source s: ready[s] (64-byte line), then ack[s] (64-byte line)
    [data, ...)        per local source s != owner: two regions of `region` bytes (call parity)

Protocol of call n (every rank of the group numbers its calls 1, 2, ... in the same order):

  sender s, for each local destination d (rotated, so the ranks don't all write one peer):
    wait ack[s] in d's segment >= n - 2    (d has read region n % 2 of call n - 2)
    copy its rows for d into d's region (s, n % 2)
    ready[s] in d's segment = n            (after a memory fence: the data lands first)
  receiver d, for each local source s in whatever order they arrive:
    wait ready[s] in its own segment >= n
    copy region (s, n % 2) into `out`, then ack[s] = n

A sender can never be more than one call ahead of a receiver (finishing call n needs every
local peer's call-n message), so with two regions per source the ack wait is almost never
taken, and no process-group barrier is on the fast path. A waiting rank spins briefly (~20 us),
then sleeps in the kernel on the flag's futex (the writer wakes it after every flag store; a
sleep lasts at most 50 ms so errors are noticed), so it doesn't steal the core a late peer
needs; without futex(2) it sched_yield()s, then sleeps 50 us growing to 1 ms. After
`timeout_s` it raises `ShmTimeoutError` naming the peer, and a peer process that has exited is
named within ~0.2 s.

Arrival stamps (for the phase timer, epruntime.dispatch.timing): on entering call n a rank writes
time.monotonic_ns() (CLOCK_MONOTONIC: one clock for every process of a host) into arrival[n % 2]
of its own segment before publishing anything; a receiver reads each local source's stamp after
that source's ready flag and before acking, so the stamp cannot be overwritten (call n + 2 waits
for the ack). `last_wait_s` = latest local peer's arrival - own arrival (>= 0): the time this rank
waited for its slowest local peer in the last call, with no barrier. Two stores per call.

Rows for ranks of other nodes go over the process group as point-to-point isend/irecv straight
into `out` (zero-row messages are skipped on both sides, which both know from the splits),
posted before the shared-memory part so the two overlap.

Sizing: a segment holds dispatch.shm_mib MiB of regions, two per local peer, so one message
(rows one rank sends one other in one call) is at most shm_mib / (2 * (L - 1)) MiB.

Errors never leave a local peer waiting: a rank that cannot take part in call n (a message
larger than a region, detected by the sender from its send splits and by the receiver from its
receive splits before anything is written; bad arguments; a timeout) writes n into its abort
word and the message beside it, and every local peer waiting on it raises the same error and
aborts in turn. Ranks on other nodes see the process group's error or timeout instead. After an
error the transport refuses further calls (the peers' call numbers no longer agree).

Lifetime: setup is collective over the group (gathers to agree on names and report errors on
every rank), each rank creates and fully allocates its segment (posix_fallocate, so a full
/dev/shm is an error now rather than a SIGBUS later), every local rank maps every local segment,
then every rank unlinks all of the node's names at once (whoever gets there first): the
mappings stay valid and a SIGKILLed rank leaves nothing in /dev/shm. The same `finally` unlinks
them when setup fails, and an atexit hook covers the window before. multiprocessing's
shared_memory is not used: its resource tracker would unlink or warn about segments another
process owns.
"""

from __future__ import annotations

import atexit
import ctypes
import math
import mmap
import os
import platform
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
PREFIX = "epruntime-shm-"
_MAGIC = 0x65707368  # "epsh"
_ARRIVAL_WORD = 4  # int64 index of arrival[0] (arrival[1] follows)
_ABORT_WORD = 8  # int64 index of the abort word
_ABORT_MSG, _ABORT_MSG_BYTES = 128, 1024
_FLAGS = 2048
_LINE = 64
_SPIN_POLLS = 300  # polls of a flag (~20 us) between checks for errors and sleeping
_YIELD_ROUNDS = 50  # without futexes: sched_yield()s before short sleeps
_FUTEX_WAIT_S = 0.05  # a futex sleep still wakes this often to check timeout and liveness
_LIVENESS_EVERY_S = 0.2


_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: taking a lock is a locked read-modify-write (x86: orders even
    non-temporal stores, as large memcpys use; arm64: acquire/release)."""
    _fence_lock.acquire()
    _fence_lock.release()


class _Futex:
    """futex(2) on a 32-bit word of a MAP_SHARED mapping: a waiter sleeps in the kernel until
    the writer wakes it (or the value already changed), instead of polling a core away."""

    _SYSCALL = {"x86_64": 202, "aarch64": 98}
    WAIT, WAKE = 0, 1

    def __init__(self):
        self.nr = self._SYSCALL[platform.machine()]
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def wait(self, addr: int, current: int, timeout_s: float) -> None:
        """Sleep while the low 32 bits at addr equal those of `current` (at most timeout_s)."""
        ts = _Timespec(int(timeout_s), int(timeout_s % 1 * 1e9))
        self.libc.syscall(ctypes.c_long(self.nr), ctypes.c_void_p(addr), ctypes.c_int(self.WAIT),
                          ctypes.c_uint32(current & 0xFFFFFFFF), ctypes.byref(ts), None,
                          ctypes.c_int(0))

    def wake(self, addr: int) -> None:
        self.libc.syscall(ctypes.c_long(self.nr), ctypes.c_void_p(addr), ctypes.c_int(self.WAKE),
                          ctypes.c_int(2**31 - 1), None, None, ctypes.c_int(0))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _make_futex() -> _Futex | None:
    try:
        return _Futex() if sys.platform == "linux" else None
    except (KeyError, OSError, AttributeError):
        return None


_futex = _make_futex()

# Names created by this process and not yet unlinked (the window before every rank attached).
_pending_unlink: set[str] = set()


class ShmTransportError(RuntimeError):
    """The shared-memory all-to-all could not complete; the message names the rank and why."""


class ShmOverflowError(ShmTransportError):
    """A message is larger than its receive region (dispatch.shm_mib)."""


class ShmTimeoutError(ShmTransportError):
    """A local peer did not arrive within the timeout, or exited."""


def _unlink_pending() -> None:
    for name in list(_pending_unlink):
        _unlink(name)


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    _pending_unlink.discard(name)


atexit.register(_unlink_pending)


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _alive(pid: int) -> bool:
    """False once `pid` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        return True


@dataclass
class _Segment:
    """One rank's mapped segment: int64 words for flags, uint8 tensor for data."""

    mm: mmap.mmap
    words: memoryview  # int64 view of the whole segment
    data: torch.Tensor  # uint8 view of the whole segment
    addr: int  # where it is mapped in this process (futex addresses)

    @classmethod
    def map(cls, fd: int, size: int) -> "_Segment":
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        data = torch.frombuffer(mm, dtype=torch.uint8)
        return cls(mm, memoryview(mm).cast("q"), data, data.data_ptr())

    def close(self) -> None:
        self.words.release()
        self.data = None  # drops the tensor's export of the buffer
        try:
            self.mm.close()
        except BufferError:  # a view still alive somewhere; the mapping goes with the process
            pass


@dataclass(frozen=True, eq=False)
class ShmCall:
    """One all-to-all between `ShmTransport.all_to_all_start` and `all_to_all_finish`."""

    n: int  # the call number
    out: torch.Tensor  # the receive buffer
    recv: list[int]  # rows from each group rank
    recv_off: list[int]  # where they land in `out`
    row: int  # bytes per row
    arrived: int  # this rank's arrival stamp (time.monotonic_ns)
    works: list  # point-to-point messages to and from other nodes


class ShmTransport:
    """Shared-memory all-to-all over the local ranks of `group` (see the module docstring).

    Collective: every rank of `group` constructs it, in the same order relative to other
    collectives. `ranks_per_node` (node-major group ranks) says which ranks share this host;
    each rank's segment holds `shm_mib` MiB of receive regions, two per local peer, so
    `self.region` bytes is the largest message one rank can send another per call; waits give
    up after `timeout_s`.
    """

    def __init__(self, group, ranks_per_node: int, shm_mib: int, timeout_s: float):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if ranks_per_node < 1 or self.size % min(ranks_per_node, self.size):
            raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the group size "
                             f"{self.size}")
        per_node = min(ranks_per_node, self.size)
        self.first = self.rank // per_node * per_node
        self.local = list(range(self.first, self.first + per_node))  # group ranks on this host
        self.me = self.rank - self.first  # index among them
        self.shm_mib, self.timeout_s = shm_mib, timeout_s
        nsrc = len(self.local) - 1
        self.region = (shm_mib * 2**20 // (2 * nsrc)) // _LINE * _LINE if nsrc else 0
        if nsrc and self.region == 0:
            raise ValueError(f"dispatch.shm_mib={shm_mib} leaves no room for {nsrc} peers")
        self.data_off = _align(_FLAGS + 2 * _LINE * len(self.local), 4096)
        self.seg_bytes = self.data_off + 2 * nsrc * self.region
        self.calls = 0
        self.last_wait_s = 0.0  # waited for the slowest local peer in the last call (see above)
        self.broken: str | None = None
        self.segs: list[_Segment | None] = []
        self.pids: list[int] = []
        self.check_alive: list[bool] = []
        self._setup()

    # ---- setup ---------------------------------------------------------------------------------
    def _gather(self, obj) -> list:
        everyone: list = [None] * self.size
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def _raise_if_any(self, everyone: list, what: str) -> None:
        bad = [(r, e) for r, e in enumerate(everyone) if e]
        if bad:
            detail = "; ".join(f"group rank {r}: {e}" for r, e in bad)
            raise ShmTransportError(f"shm transport setup failed while {what}: {detail}")

    def _name(self, token: str, group_rank: int) -> str:
        return f"{PREFIX}{os.getuid()}-{token}-g{group_rank}"

    def _setup(self) -> None:
        hello = self._gather((secrets.token_hex(8), os.getpid(), socket.gethostname()))
        token = self.token = hello[0][0]
        local = [hello[g] for g in self.local]
        self.pids = [pid for _, pid, _ in local]
        hosts = {host for _, _, host in local}
        if len(hosts) > 1:
            raise ShmTransportError(
                f"group ranks {self.local} should share a host (ranks_per_node={len(self.local)}) "
                f"but run on {sorted(hosts)}: set dispatch.ranks_per_node to the ranks per node")
        # Peers in another pid namespace can't be watched; the timeout still covers them.
        self.check_alive = [_alive(pid) for pid in self.pids]
        if len(self.local) == 1:
            self.segs = [None]
            return
        mine = self._name(token, self.rank)
        error = None
        fd = -1
        try:
            try:
                fd = os.open(os.path.join(SHM_DIR, mine), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                _pending_unlink.add(mine)
                os.posix_fallocate(fd, 0, self.seg_bytes)
                own = _Segment.map(fd, self.seg_bytes)
                for i, value in enumerate((_MAGIC, len(self.local), self.region, os.getpid())):
                    own.words[i] = value
            except OSError as err:
                error = (f"cannot create {self.seg_bytes} bytes in {SHM_DIR}/{mine} ({err}); "
                         f"free /dev/shm or lower dispatch.shm_mib={self.shm_mib}")
            finally:
                if fd >= 0:
                    os.close(fd)
            self._raise_if_any(self._gather(error), "creating segments")
            self.segs = []
            for i, g in enumerate(self.local):
                if i == self.me:
                    self.segs.append(own)
                    continue
                try:
                    fd = os.open(os.path.join(SHM_DIR, self._name(token, g)), os.O_RDWR)
                    try:
                        size = os.fstat(fd).st_size
                        if size != self.seg_bytes:  # mapping past its end would SIGBUS
                            error = (f"group rank {g}'s segment has {size} bytes, expected "
                                     f"{self.seg_bytes} (ranks disagree on dispatch.shm_mib?)")
                            break
                        self.segs.append(_Segment.map(fd, self.seg_bytes))
                    finally:
                        os.close(fd)
                except OSError as err:
                    error = f"cannot map group rank {g}'s segment ({err})"
                    break
                header = tuple(self.segs[-1].words[0:3])
                if header != (_MAGIC, len(self.local), self.region):
                    error = (f"group rank {g}'s segment has header {header}, expected "
                             f"{(_MAGIC, len(self.local), self.region)} (different shm_mib?)")
                    break
            self._raise_if_any(self._gather(error), "attaching to peers' segments")
        except BaseException:
            for seg in self.segs:
                if seg is not None:
                    seg.close()
            self.segs = []
            raise
        finally:
            # Every peer has mapped them (or setup failed): the names can go. Each rank unlinks
            # all the node's names, so one that died before unlinking its own leaves nothing.
            for g in self.local:
                _unlink(self._name(token, g))

    def close(self) -> None:
        """Unmap every segment (local; no collective). Further calls raise."""
        for seg in self.segs:
            if seg is not None:
                seg.close()
        self.segs = []
        self.broken = self.broken or "the transport was closed"

    # ---- one call --------------------------------------------------------------------------
    def _buffer(self, dest: int, src: int, parity: int, nbytes: int) -> torch.Tensor:
        """uint8 view of region (src, parity) in local rank `dest`'s segment."""
        slot = src - (src > dest)
        start = self.data_off + (2 * slot + parity) * self.region
        return self.segs[dest].data[start:start + nbytes]

    def _ready(self, src: int) -> int:
        return (_FLAGS + 2 * _LINE * src) // 8

    def _ack(self, src: int) -> int:
        return (_FLAGS + 2 * _LINE * src + _LINE) // 8

    def _abort(self, n: int, message: str) -> None:
        """Tell every local peer this rank gave up on call n, and why."""
        self.broken = message
        own = self.segs[self.me] if self.segs else None
        if own is not None:
            raw = message.encode()[:_ABORT_MSG_BYTES - 1] + b"\0"
            own.data[_ABORT_MSG:_ABORT_MSG + len(raw)].copy_(torch.frombuffer(bytearray(raw),
                                                                             dtype=torch.uint8))
            own.words[_ABORT_WORD] = n
            for peer in range(len(self.segs)):  # wake peers sleeping on this rank's flags
                if peer != self.me and _futex is not None:
                    _futex.wake(self.segs[peer].addr + 8 * self._ready(self.me))

    def _peer_error(self, peer: int, n: int) -> ShmTransportError | None:
        """The error to raise if local peer `peer` gave up (on call n, or any), else None."""
        seg = self.segs[peer]
        aborted = seg.words[_ABORT_WORD]  # any call: the peers' call numbers no longer agree
        if aborted:
            raw = bytes(seg.data[_ABORT_MSG:_ABORT_MSG + _ABORT_MSG_BYTES].numpy())
            text = raw.split(b"\0", 1)[0].decode(errors="replace")
            cls = ShmOverflowError if "dispatch.shm_mib" in text else ShmTransportError
            return cls(f"shm all-to-all call {n}: group rank {self.local[peer]} aborted call "
                       f"{aborted}: {text}")
        return None

    def _wait(self, n: int, peer: int, word_seg: int, word: int, at_least: int, what: str) -> None:
        """Wait until word `word` of local segment `word_seg` is >= at_least; local peer `peer`
        is the rank that writes it. Spin briefly, then sleep on the word's futex (woken by the
        writer) or, without futexes, back off with sched_yield and short sleeps."""
        words = self.segs[word_seg].words
        if words[word] >= at_least:
            _fence()
            return
        addr = self.segs[word_seg].addr + 8 * word
        start = checked = time.monotonic()
        rounds = 0
        while True:
            for _ in range(_SPIN_POLLS):
                if words[word] >= at_least:
                    _fence()
                    return
            rounds += 1
            err = self._peer_error(peer, n)
            if err is not None:  # pass it on: a peer may be waiting on this rank, not that one
                self._abort(n, str(err))
                raise err
            now = time.monotonic()
            g = self.local[peer]
            if now - checked > _LIVENESS_EVERY_S:
                checked = now
                if self.check_alive[peer] and not _alive(self.pids[peer]) \
                        and words[word] < at_least:
                    msg = (f"shm all-to-all call {n}: group rank {g} (pid {self.pids[peer]}) "
                           f"exited while group rank {self.rank} waited for {what}")
                    self._abort(n, msg)
                    raise ShmTimeoutError(msg)
            if now - start > self.timeout_s:
                msg = (f"shm all-to-all call {n}: group rank {g} did not arrive within "
                       f"parallel.timeout_s={self.timeout_s:g}s (group rank {self.rank} "
                       f"waited for {what})")
                self._abort(n, msg)
                raise ShmTimeoutError(msg)
            current = words[word]
            if current >= at_least:
                _fence()
                return
            if _futex is not None:
                _futex.wait(addr, current, _FUTEX_WAIT_S)
            elif rounds < _YIELD_ROUNDS:
                os.sched_yield()
            else:
                time.sleep(min(1e-3, 50e-6 * 2 ** min((rounds - _YIELD_ROUNDS) // 20, 5)))

    def _publish(self, seg: int, word: int, value: int) -> None:
        """Store `value` into a flag word of local segment `seg` and wake whoever sleeps on it."""
        _fence()  # the data (maybe written with non-temporal stores) before the flag
        self.segs[seg].words[word] = value
        if _futex is not None:
            _futex.wake(self.segs[seg].addr + 8 * word)

    def _check(self, out: torch.Tensor, x: torch.Tensor, recv: list[int], send: list[int]) -> int:
        """Argument errors as all_to_all_single would raise them; returns bytes per row."""
        if len(send) != self.size or len(recv) != self.size:
            raise ValueError(f"send_splits ({len(send)}) and recv_splits ({len(recv)}) need one "
                             f"entry per rank of the group ({self.size})")
        if min(send + recv, default=0) < 0:
            raise ValueError(f"negative split in send_splits={send} or recv_splits={recv}")
        if sum(send) != x.shape[0] or sum(recv) != out.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows for send_splits summing to {sum(send)}; "
                             f"out has {out.shape[0]} rows for recv_splits summing to {sum(recv)}")
        if out.dtype != x.dtype or out.shape[1:] != x.shape[1:]:
            raise ValueError(f"out {out.dtype} {tuple(out.shape)} does not match x {x.dtype} "
                             f"{tuple(x.shape)} beyond dim 0")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        if x.device.type != "cpu" or out.device.type != "cpu":
            raise ValueError(f"dispatch.transport=shm moves CPU tensors, got x on {x.device} and "
                             f"out on {out.device}")
        return math.prod(x.shape[1:]) * x.element_size()

    def all_to_all_single(self, out: torch.Tensor, x: torch.Tensor, recv_splits: list[int],
                          send_splits: list[int]) -> None:
        """out [sum(recv_splits), ...] <- rows of every rank's x [sum(send_splits), ...]: rows
        send_splits[r] of x go to rank r, rows from rank r land at offset sum(recv_splits[:r])."""
        self.all_to_all_finish(self.all_to_all_start(out, x, recv_splits, send_splits))

    def all_to_all_start(self, out: torch.Tensor, x: torch.Tensor, recv_splits: list[int],
                         send_splits: list[int]) -> "ShmCall":
        """The first half of `all_to_all_single`: post the other nodes' point-to-point messages,
        copy this rank's rows into its local peers' regions and publish them, copy its own rows
        into `out`. The peers' rows keep arriving in this rank's segment (their own copies) while
        the caller computes; `all_to_all_finish` collects them. One call at a time may be open
        per transport between start and finish only in call order (start n, start n+1, finish n,
        finish n+1 is fine: two regions per peer)."""
        if self.broken:
            raise ShmTransportError(f"shm transport unusable after an earlier error: {self.broken}")
        send, recv = [int(s) for s in send_splits], [int(s) for s in recv_splits]
        try:
            row = self._check(out, x, recv, send)
        except ValueError as err:  # this rank can't take part: tell the local peers at once
            self._abort(self.calls + 1, f"group rank {self.rank}: {err}")
            raise
        x = x.contiguous()
        n = self.calls = self.calls + 1
        arrived = time.monotonic_ns()
        send_off = [0] * self.size
        recv_off = [0] * self.size
        for r in range(1, self.size):
            send_off[r] = send_off[r - 1] + send[r - 1]
            recv_off[r] = recv_off[r - 1] + recv[r - 1]

        too_big = [f"{send[g] * row} bytes to group rank {g}" for g in self.local
                   if g != self.rank and send[g] * row > self.region]
        too_big += [f"{recv[g] * row} bytes from group rank {g}" for g in self.local
                    if g != self.rank and recv[g] * row > self.region]
        if too_big:
            msg = (f"shm all-to-all call {n}: group rank {self.rank} would exchange "
                   f"{', '.join(too_big)}, more than the {self.region}-byte region per peer "
                   f"(dispatch.shm_mib={self.shm_mib} over {len(self.local) - 1} local peers, "
                   f"double-buffered); raise dispatch.shm_mib")
            self._abort(n, msg)
            raise ShmOverflowError(msg)

        def rows(t: torch.Tensor, off: list[int], counts: list[int], g: int) -> torch.Tensor:
            return t[off[g]:off[g] + counts[g]]

        # Other nodes: point-to-point over the process group, overlapping the copies below.
        works = []
        for g in range(self.size):
            if g in self.local:
                continue
            if recv[g]:
                works.append(dist.irecv(rows(out, recv_off, recv, g), group=self.group,
                                        group_src=g))
            if send[g]:
                works.append(dist.isend(rows(x, send_off, send, g), group=self.group,
                                        group_dst=g))
        try:
            parity = n % 2
            peers = len(self.local)
            if peers > 1:  # before any ready flag of call n (their publish fences it)
                self.segs[self.me].words[_ARRIVAL_WORD + parity] = arrived
            for step in range(1, peers):  # one copy in, straight into the destination's region
                d = (self.me + step) % peers
                g = self.local[d]
                self._wait(n, d, d, self._ack(self.me), n - 2, f"its ack of call {n - 2}")
                nbytes = send[g] * row
                if nbytes:
                    self._buffer(d, self.me, parity, nbytes).copy_(
                        rows(x, send_off, send, g).reshape(-1).view(torch.uint8))
                self._publish(d, self._ready(self.me), n)
            rows(out, recv_off, recv, self.rank).copy_(rows(x, send_off, send, self.rank))
        except ShmTransportError:
            raise
        except BaseException as err:  # e.g. KeyboardInterrupt: don't leave peers waiting
            self._abort(n, f"group rank {self.rank} failed: {err!r}")
            raise
        return ShmCall(n, out, recv, recv_off, row, arrived, works)

    def all_to_all_finish(self, call: "ShmCall") -> None:
        """The second half: wait for every local peer's rows of `call` (at most timeout_s), copy
        them out of this rank's segment into `call.out`, ack them, and wait for the point-to-point
        messages (the group's timeout); sets `last_wait_s`."""
        n, out, recv, recv_off, row = call.n, call.out, call.recv, call.recv_off, call.row
        arrived = latest = call.arrived

        def rows(t: torch.Tensor, off: list[int], counts: list[int], g: int) -> torch.Tensor:
            return t[off[g]:off[g] + counts[g]]

        try:
            parity = n % 2
            peers = len(self.local)
            pending = [s for s in range(peers) if s != self.me]
            own = self.segs[self.me].words if peers > 1 else None
            while pending:  # one copy out, in whatever order the sources arrive
                s = next((s for s in pending if own[self._ready(s)] >= n), pending[0])
                self._wait(n, s, self.me, self._ready(s), n, f"its rows of call {n}")
                g = self.local[s]
                latest = max(latest, self.segs[s].words[_ARRIVAL_WORD + parity])
                nbytes = recv[g] * row
                if nbytes:
                    rows(out, recv_off, recv, g).reshape(-1).view(torch.uint8).copy_(
                        self._buffer(self.me, s, parity, nbytes))
                self._publish(self.me, self._ack(s), n)
                pending.remove(s)
        except ShmTransportError:
            raise
        except BaseException as err:  # e.g. KeyboardInterrupt: don't leave peers waiting
            self._abort(n, f"group rank {self.rank} failed: {err!r}")
            raise
        for work in call.works:
            work.wait(timedelta(seconds=self.timeout_s))
        self.last_wait_s = (latest - arrived) / 1e9
