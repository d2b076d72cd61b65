"""The latency proxy the relay-across-the-network tests and the benchmark use: a ping-pong
through it takes its round trip, and a stream keeps its order and its throughput."""

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.latency_proxy import LatencyProxy


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on loopback: its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=reply, args=(connection,), daemon=True).start()

    def reply(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_a_ping_pong_takes_the_round_trip(echo: int) -> None:
    with LatencyProxy(echo, delay=0.010) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        trips = []
        for n in range(30):
            start = time.perf_counter()
            client.sendall(b"ping %d\r\n" % n)
            assert client.recv(100) == b"ping %d\r\n" % n
            trips.append(time.perf_counter() - start)
    assert abs(statistics.median(trips) - 0.020) <= 0.002  # 10 ms each way
    assert min(trips) >= 0.020


def test_a_stream_keeps_its_order_and_gains_only_the_delay(echo: int) -> None:
    chunks = [bytes([n % 251]) * 1000 for n in range(2000)]  # 2 MB in 2,000 writes
    with LatencyProxy(echo, delay=0.010) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as client:
        received = bytearray()
        reader = threading.Thread(target=lambda: _read(client, received, sum(map(len, chunks))))
        start = time.perf_counter()
        reader.start()
        for chunk in chunks:
            client.sendall(chunk)
        reader.join(30)
        seconds = time.perf_counter() - start
    assert bytes(received) == b"".join(chunks)
    # 2,000 chunks delayed one after the other would take 40 s; delayed alongside, a round trip more.
    assert seconds < 2.0


def _read(client: socket.socket, into: bytearray, size: int) -> None:
    while len(into) < size and (data := client.recv(65536)):
        into.extend(data)
