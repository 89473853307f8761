"""A pre-authentication flood against uplinkd's local listener (issue 12):
connections that never send CONNECT, and slowloris connections that send a
CONNECT one byte at a time, held open by a thread that reconnects whatever
the server closes, as an attacker would. Used by test_local_preauth.py and
bench/preauth; needs no broker and no harness, so the bench can use it too.

The caller raises its own RLIMIT_NOFILE first (raise_nofile()).
"""

import errno
import resource
import selectors
import socket
import struct
import threading
import time


def raise_nofile(need):
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft
    limit, which the caller compares with `need` (say so rather than fail
    obscurely with EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def connect_packet(client_id):
    """An MQTT 3.1.1 CONNECT (clean session, keepalive 30 s)."""
    def mqtt_str(b):
        return struct.pack(">H", len(b)) + b

    body = mqtt_str(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 30) + mqtt_str(client_id)
    return bytes([0x10, len(body)]) + body


class Flood:
    """`idle` connections that send nothing and `slow` ones that trickle a
    CONNECT one byte every `slow_interval` seconds, to 127.0.0.1:`port` or
    to the Unix socket `unix`. With `reconnect`, every connection the server
    closes is opened again (at most `burst` per 10 ms round), for as long as
    the flood runs; bounded by stop() and by `max_seconds`.

    Counters (read at any time): opened, closed_by_server, connect_failed.
    """

    def __init__(self, port=None, unix=None, idle=1000, slow=50, slow_interval=0.5,
                 reconnect=True, burst=200, max_seconds=300):
        assert (port is None) != (unix is None)
        self.port, self.unix = port, unix
        self.target = {"idle": idle, "slow": slow}
        self.slow_interval = slow_interval
        self.reconnect = reconnect
        self.burst = burst
        self.max_seconds = max_seconds
        self.opened = self.closed_by_server = self.connect_failed = 0
        self.last_error = None
        self.filled = threading.Event()  # every connection was opened once
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._open = {"idle": 0, "slow": 0}
        self._slow = {}  # socket -> state, the slowloris ones
        self._serial = 0
        self._thread = threading.Thread(target=self._run, name="preauth-flood", daemon=True)

    # -- public --------------------------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(30)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()

    def held(self):
        """Connections open on our side right now (the server may be closing
        some of them)."""
        return self._open["idle"] + self._open["slow"]

    # -- the thread ----------------------------------------------------------

    def _connect(self, kind):
        family = socket.AF_UNIX if self.unix else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect(self.unix if self.unix else ("127.0.0.1", self.port))
        except OSError as e:
            s.close()
            self.connect_failed += 1
            self.last_error = e
            return False
        s.setblocking(False)
        self._serial += 1
        state = {"kind": kind, "packet": connect_packet(b"slow-%d" % self._serial), "sent": 0,
                 "next": time.monotonic()}
        self._sel.register(s, selectors.EVENT_READ, state)
        if kind == "slow":
            self._slow[s] = state
        self._open[kind] += 1
        self.opened += 1
        return True

    def _drop(self, sock, state):
        self._sel.unregister(sock)
        self._slow.pop(sock, None)
        sock.close()
        self._open[state["kind"]] -= 1

    def _read(self, key):
        try:
            data = key.fileobj.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # closed (or reset) by the server
            self.closed_by_server += 1
            self._drop(key.fileobj, key.data)

    def _trickle(self, now):
        for sock, st in list(self._slow.items()):
            if now < st["next"] or st["sent"] >= len(st["packet"]) - 1:
                continue  # never the last byte: the CONNECT stays incomplete
            try:
                sock.send(st["packet"][st["sent"]:st["sent"] + 1])
                st["sent"] += 1
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    self.closed_by_server += 1
                    self._drop(sock, st)
                    continue
            st["next"] = now + self.slow_interval

    def _fill(self):
        budget = self.burst
        for kind in ("idle", "slow"):
            while self._open[kind] < self.target[kind] and budget > 0:
                budget -= 1
                if not self._connect(kind):
                    return

    def _run(self):
        end = time.monotonic() + self.max_seconds
        first = True
        while not self._stop.is_set() and time.monotonic() < end:
            if first or self.reconnect:
                self._fill()
                # Every connection tried once (the server may close some as
                # fast as they open, and a refused connect counts too).
                if first and (self.opened + self.connect_failed
                              >= self.target["idle"] + self.target["slow"]):
                    first = False
                    self.filled.set()
            for key, _ in self._sel.select(timeout=0.01):
                self._read(key)
            self._trickle(time.monotonic())
        self.filled.set()


def main():
    """python3 flood.py (--port N | --unix PATH) [--idle N] [--slow N]: hold a
    flood until SIGTERM (for running it as another uid, e.g. under setpriv)."""
    import argparse
    import signal

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--unix")
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=50)
    ap.add_argument("--max-seconds", type=float, default=300)
    args = ap.parse_args()
    raise_nofile(args.idle + args.slow + 50)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    flood = Flood(port=args.port, unix=args.unix, idle=args.idle, slow=args.slow,
                  max_seconds=args.max_seconds).start()
    flood.filled.wait(args.max_seconds)
    print("filled opened=%d connect_failed=%d last_error=%s"
          % (flood.opened, flood.connect_failed, flood.last_error), flush=True)
    done.wait(args.max_seconds)
    flood.stop()
    print("opened=%d closed_by_server=%d connect_failed=%d"
          % (flood.opened, flood.closed_by_server, flood.connect_failed), flush=True)


if __name__ == "__main__":
    main()
