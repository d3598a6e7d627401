"""Streaming a decode that runs on a thread of its own to an async HTTP response."""

from __future__ import annotations

import asyncio
import queue
import threading

from ..errors import UserError


def background(run):
    """Run ``run(on_text)`` on a thread of its own; yield ``("text", piece)`` as the decode streams, then
    ``("done", result)`` or ``("error", error body)``. A failure reaches the client and the server keeps
    serving."""
    pieces: queue.Queue = queue.Queue()

    def work():
        try:
            pieces.put(("done", run(lambda piece: pieces.put(("text", piece)))))
        except UserError as e:
            pieces.put(("error", {"type": "invalid_request", "message": e.problem, "fix": e.fix}))
        except Exception as e:
            pieces.put(("error", {"type": "internal_error", "message": f"{type(e).__name__}: {e}"}))

    threading.Thread(target=work, daemon=True).start()
    while True:
        kind, data = pieces.get()
        yield kind, data
        if kind in ("done", "error"):
            return


async def iterate_in_thread(gen):
    """An async view of a generator whose steps block (each waits on the decode thread)."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, gen, done)
        if item is done:
            return
        yield item
