"""A TCP proxy on loopback that delays every chunk by a fixed time in each direction: a relay
across the network, where ``tc netem`` is not available (this kernel has no such qdisc).

Each chunk read from one side is written to the other ``delay`` seconds after it arrived,
in the order it arrived. Chunks wait in a queue per direction with one timer for its head:
nothing sleeps per chunk in series, so a stream of chunks keeps its throughput and only
gains the delay, as on a real link. An end of stream is forwarded after the delay too.

    with LatencyProxy(target_port=2525, delay=0.010) as proxy:   # 20 ms round trip
        smtp_url = f"smtp://127.0.0.1:{proxy.port}"
"""

import asyncio
import os
import socket
import threading
from collections import deque
from types import TracebackType


class _Direction:
    """One direction of one connection: chunks queued with the moment they may go."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter, delay: float) -> None:
        self.loop, self.writer, self.delay = loop, writer, delay
        self.queue: deque[tuple[float, bytes | None]] = deque()  # None: the end of the stream
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes | None) -> None:
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is None:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
            elif not self.writer.is_closing():
                self.writer.write(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)


class LatencyProxy:
    """Listens on 127.0.0.1:``port`` and forwards to 127.0.0.1:``target_port``, ``delay``
    seconds later in each direction (a round trip gains twice the delay)."""

    def __init__(self, target_port: int, delay: float = 0.010, target_host: str = "127.0.0.1") -> None:
        self.target_host, self.target_port, self.delay = target_host, target_port, delay
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.connections = 0
        # Round trips, counted where they happen: each time the client speaks after the
        # server did (or first), a new one begins.
        self.round_trips = 0

    def _run(self) -> None:
        # A busy machine (the test suite on every core) would add its scheduling delay to the
        # link's: the proxy's thread goes first where the system allows it (root, here).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        except OSError:
            pass
        self._loop.run_forever()

    def __enter__(self) -> "LatencyProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", self.port), self._loop).result(10)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)  # the connections end here, quietly

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, upstream_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        turn = ["server"]  # who spoke last on this connection
        try:
            await asyncio.gather(
                self._pump(client_reader, _Direction(loop, upstream_writer, self.delay), turn, "client"),
                self._pump(upstream_reader, _Direction(loop, client_writer, self.delay), turn, "server"),
                return_exceptions=True)
        except asyncio.CancelledError:  # the proxy is closing: end the connection without a traceback
            pass
        for writer in (client_writer, upstream_writer):
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, direction: _Direction, turn: list[str], side: str) -> None:
        while data := await reader.read(65536):
            if side == "client" and turn[0] != "client":
                self.round_trips += 1
            turn[0] = side
            direction.push(data)
        direction.push(None)
        while direction.queue:  # what is still on its way arrives before the connection closes
            await asyncio.sleep(direction.delay)
