"""A hostile HTTP server for tests/test_remote.py: every loop is bounded, the test kills it by PID.

    python trickle_server.py MODE

Listens on 127.0.0.1 (a free port, printed as the first line), serves at most 20 connections,
then exits. MODE:
  headers  reads the request, then sends the status line and headers one byte every 50 ms
  body     reads the request, sends headers announcing 10000 bytes, then one byte every 50 ms
  noread   accepts and never reads: a large request body fills the socket buffers
Each connection is abandoned after 30 s at most.
"""

import socket
import sys
import threading
import time

BYTE_INTERVAL = 0.05
CONNECTION_SECONDS = 30.0
MAX_CONNECTIONS = 20


def read_request(connection: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 1 << 20:
        chunk = connection.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return
        body += chunk


def trickle(connection: socket.socket, data: bytes, end: float) -> None:
    for i in range(len(data)):
        if time.monotonic() > end:
            return
        connection.sendall(data[i:i + 1])
        time.sleep(BYTE_INTERVAL)


def handle(connection: socket.socket, mode: str) -> None:
    end = time.monotonic() + CONNECTION_SECONDS
    try:
        if mode == "noread":
            time.sleep(CONNECTION_SECONDS)
            return
        read_request(connection)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
        if mode == "headers":
            trickle(connection, head, end)
        else:
            connection.sendall(head)
            trickle(connection, b"x" * 10000, end)
    except OSError:
        pass
    finally:
        connection.close()


def main() -> None:
    mode = sys.argv[1]
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(CONNECTION_SECONDS)
    print(server.getsockname()[1], flush=True)
    for _ in range(MAX_CONNECTIONS):
        try:
            connection, _ = server.accept()
        except OSError:
            break
        if mode == "noread":  # a tiny receive buffer, so the client's send blocks soon
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        threading.Thread(target=handle, args=(connection, mode), daemon=True).start()
    server.close()


if __name__ == "__main__":
    main()
