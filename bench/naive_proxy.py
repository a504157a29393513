"""The TCP proxy a Python user would write with asyncio streams: the benchmark's baseline."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import sys


async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF or error, then close the destination."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen: tuple[str, int], backends: list[tuple[str, int]]) -> None:
    rr = itertools.cycle(backends)

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        host, port = next(rr)
        try:
            u_reader, u_writer = await asyncio.open_connection(host, port)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(copy(c_reader, u_writer), copy(u_reader, c_writer))

    server = await asyncio.start_server(handle, listen[0], listen[1], backlog=4096)
    print("naive proxy: ready to proxy client requests", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen-addr", required=True, help="host:port to listen on")
    parser.add_argument("--endpoints", required=True, help="comma-separated host:port list")
    args = parser.parse_args()
    # The idle workload holds thousands of connections (two fds each).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    backends = [parse_addr(e) for e in args.endpoints.split(",")]
    try:
        asyncio.run(serve(parse_addr(args.listen_addr), backends))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
