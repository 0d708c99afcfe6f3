"""The ingest baseline: a bare aiohttp server that reads the body and answers 200.

`python -m tests.bench.bare --port P` serves `POST /webhook` and `POST /v1/{route}` the
way `relay serve` is served (AppRunner, TCPSite, no access log), doing nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

_OK = b'{"success":true}'


async def _accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_OK, content_type="application/json")


async def _serve(host: str, port: int) -> None:
    app = web.Application(client_max_size=600 * 1024)
    app.router.add_post("/webhook", _accept)
    app.router.add_post("/v1/{route}", _accept)
    app.router.add_get("/livez", _livez)
    runner = web.AppRunner(app, auto_decompress=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare handler on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def _livez(_: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
