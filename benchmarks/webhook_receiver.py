"""A webhook receiver for the benchmark: answers 200 to every POST after a fixed latency, in its own process.

    python benchmarks/webhook_receiver.py --latency-ms 20      # prints "listening on http://127.0.0.1:PORT/hook"

It records the first arrival time (time.time(), before the latency) of each `webhook-id`; the benchmark reads
them from GET /__arrivals and joins them with stream_events.created_at for the commit -> delivery latency.
It does not verify signatures (the tests' receivers do): its CPU is the benchmark's, not the product's, and it
should stay small beside the workers'.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web


def make_app(latency: float) -> web.Application:
    arrivals: dict[str, float] = {}
    counts = {"requests": 0}

    async def hook(request: web.Request) -> web.Response:
        now = time.time()
        counts["requests"] += 1
        await request.read()
        arrivals.setdefault(request.headers.get("webhook-id", ""), now)
        if latency:
            await asyncio.sleep(latency)
        return web.Response(status=200)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"distinct": len(arrivals), "requests": counts["requests"]})

    async def all_arrivals(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/__stats", stats)
    app.router.add_get("/__arrivals", all_arrivals)
    return app


async def serve(latency_ms: int) -> None:
    runner = web.AppRunner(make_app(latency_ms / 1000), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on http://127.0.0.1:{port}/hook", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=int, default=20)
    asyncio.run(serve(parser.parse_args().latency_ms))


if __name__ == "__main__":
    main()
