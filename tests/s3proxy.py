"""A TCP relay in front of the test S3 server that a test can take down, bring back, or stall per request.

Stopping ``moto_server`` itself would lose its buckets (it keeps them in memory); an object store
that goes away and comes back keeps its data. So the relay is what goes down: :meth:`down` closes
the listening socket and every open connection (clients see refused and reset connections, as
during a real outage), :meth:`up` listens on the same port again. :meth:`hold` stalls every request
whose bytes match a pattern (e.g. the PUT of one checkpoint's files) until :meth:`release`, to kill
a writer in the middle of an upload. Traffic is forwarded byte for byte otherwise.
"""

from __future__ import annotations

import re
import socket
import threading
import time


class S3Relay:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.host, self.target = host, target_port
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._holds: list[tuple[re.Pattern[bytes], threading.Event]] = []
        self._held: list[socket.socket] = []
        self._listener: socket.socket | None = None
        probe = socket.socket()
        probe.bind((host, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.outages: list[float] = []  # seconds of each outage, for the test's report
        self._down_since: float | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def up(self) -> None:
        """Accept connections again (on the same port)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        if self._down_since is not None:
            self.outages.append(time.monotonic() - self._down_since)
            self._down_since = None
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones: the object store is unreachable."""
        self._down_since = time.monotonic()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            _close(c)

    def hold(self, pattern: bytes) -> threading.Event:
        """Stall every request whose bytes match ``pattern`` (regex); the event is set on the first one."""
        event = threading.Event()
        self._holds.append((re.compile(pattern), event))
        return event

    def release(self) -> None:
        """Drop the holds and close the stalled connections."""
        self._holds.clear()
        with self._lock:
            held, self._held = self._held, []
        for c in held:
            _close(c)

    def close(self) -> None:
        self.release()
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection((self.host, self.target))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if upstream and any(self._matches(data, p, e) for p, e in list(self._holds)):
                    with self._lock:
                        self._held += [src, dst]
                    return  # stalled: nothing more is forwarded on this connection
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not any(src is h for h in self._held):
                _close(src)
                _close(dst)

    @staticmethod
    def _matches(data: bytes, pattern: re.Pattern[bytes], event: threading.Event) -> bool:
        if pattern.search(data):
            event.set()
            return True
        return False


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
