"""The streaming server's Ray Serve deployments (`jobs/serve.py` binds and runs them).

- `StreamIngress` (FastAPI): the HTTP API and the page. It checks requests, keeps nothing itself, and
  relays each stream from a replica as multipart frames (`pipeline/streaming.py`).
- `StreamRegistry` (one replica): every stream's state, so that a prompt switch or a stop reaches the
  replica making the stream whichever ingress replica received it: created, claimed (its frames
  requested once), a pending prompt, a stop, finished.
- `StreamReplica`: the student, its text encoder and codec on `serve.resources`, one stream at a time
  (`max_ongoing_requests=1`). It makes a stream block by block (`pipeline/live.py`), asking the
  registry between blocks for a new prompt or a stop. Streams beyond the replicas wait in a bounded
  queue (`serve.max_queued_streams` per replica); past it Serve refuses at once and the ingress
  answers 503.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (`Request`) as
# objects, and Serve's ingress wrapper would leave it strings it cannot resolve.
import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from pipeline.failures import cause
from pipeline.streaming import CONTENT_TYPE, FORMATS, Limits, RequestError, encode_frame, json_part, parse_request, parse_switch, part

UNCLAIMED_TTL_S = 120  # a stream created and never requested frees its client's slot after this
AHEAD_BLOCKS = 8  # blocks a replica makes ahead of what it has handed to Serve
SEND_EVERY_S = 0.025  # after the first frame, a stream's parts go to Serve at most this often, as one chunk
POLL_EVERY_S = 0.05  # a replica asks the registry for its stream's switches and stop at most this often


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class StreamRegistry:
    def __init__(self, max_streams_per_client: int) -> None:
        self.max_per_client = max_streams_per_client
        self.streams: dict[str, dict[str, Any]] = {}

    def _get(self, stream_id: str) -> dict[str, Any]:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise RequestError("id", f"no stream {stream_id!r}", status=404)
        return stream

    def _forget_old(self) -> None:
        now = time.time()
        for key, s in list(self.streams.items()):
            if s["state"] == "created" and now - s["created"] > UNCLAIMED_TTL_S:
                s["state"] = "finished"
            if s["state"] == "finished" and now - s["created"] > 3600:
                del self.streams[key]

    def create(self, request: dict[str, Any], client: str) -> str:
        self._forget_old()
        open_ = sum(1 for s in self.streams.values() if s["client"] == client and s["state"] != "finished")
        if open_ >= self.max_per_client:
            raise RequestError("client", f"{open_} streams open from {client}, the limit is {self.max_per_client}", status=429)
        stream_id = uuid.uuid4().hex
        self.streams[stream_id] = {"request": request, "client": client, "state": "created", "created": time.time(),
                                   "prompts": [], "stop": False, "stats": {}}
        return stream_id

    def claim(self, stream_id: str) -> dict[str, Any]:
        stream = self._get(stream_id)
        if stream["state"] != "created":
            raise RequestError("id", f"stream {stream_id} is {stream['state']}: its frames are requested once", status=409)
        stream["state"] = "streaming"
        return stream["request"]

    def switch(self, stream_id: str, prompt: str, at_block: int | None) -> None:
        """`prompt` from the next block the replica starts, or from block `at_block` (scripted)."""
        stream = self._get(stream_id)
        if stream["state"] == "finished":
            raise RequestError("id", f"stream {stream_id} has finished", status=409)
        stream["prompts"].append((-1 if at_block is None else at_block, prompt))

    def stop(self, stream_id: str) -> None:
        stream = self._get(stream_id)
        stream["stop"] = True
        if stream["state"] == "created":
            stream["state"] = "finished"

    def poll(self, stream_id: str) -> dict[str, Any]:
        """For the replica: the switches asked since it last asked, handed over once, as (block, prompt)
        in the order they came (block -1: the next block it starts), and whether to stop."""
        stream = self._get(stream_id)
        prompts, stream["prompts"] = stream["prompts"], []
        return {"prompts": prompts, "stop": stream["stop"]}

    def finish(self, stream_id: str, stats: dict[str, Any]) -> None:
        stream = self._get(stream_id)
        stream["state"], stream["stats"] = "finished", stats

    def status(self, stream_id: str) -> dict[str, Any]:
        stream = self._get(stream_id)
        return {"state": stream["state"], "stats": stream["stats"], **stream["request"]}


@serve.deployment(max_ongoing_requests=1)
class StreamReplica:
    def __init__(self, checkpoint: str, config: dict[str, Any], registry: Any) -> None:
        import torch

        from pipeline.config import load_config
        from pipeline.generation import ClipGenerator

        self.cfg = load_config(base=config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = ClipGenerator.load(checkpoint, self.cfg, device=device)
        self.registry, self.quality = registry, self.cfg.serve.jpeg_quality
        self.tracker, self.streams_logged = None, 0
        if self.cfg.serve.log_to_mlflow:  # one run per replica; each stream is a step of its metrics
            import tempfile

            from pipeline.tracking import open_tracker

            run_dir = tempfile.mkdtemp(prefix="oneforce-serve-")  # holds only the MLflow run id
            self.tracker = open_tracker(self.cfg.tracking, run_dir, self.cfg.to_dict(), "serve")

    def __del__(self) -> None:  # Serve's graceful shutdown of the replica
        if self.tracker is not None:
            self.tracker.close("FINISHED")

    async def run(self, stream_id: str, request: dict[str, Any], fmt: str, started: float) -> AsyncIterator[bytes]:
        """The stream's frames as multipart parts, then a JSON part with its numbers. Blocks are made by
        `_produce` into a queue at most `AHEAD_BLOCKS` deep, so the next block is being made while
        Serve carries this one's parts to the client (a generator that makes a block only when asked
        for its next part runs at the pace of the transport), and the blocks that are ready when the
        transport asks leave together, as one chunk (fewer hops through Serve when the client is the
        slower side)."""
        from pipeline.live import LiveStream

        stats: dict[str, Any] = {"frames": 0, "blocks": 0, "switches": 0}
        producer = None
        try:
            live = LiveStream(self.generator, request["prompt"], request["seed"], request["blocks"],
                              request["cache_window"], request["sink_frames"])
            blocks: asyncio.Queue = asyncio.Queue(maxsize=AHEAD_BLOCKS)
            producer = asyncio.ensure_future(self._produce(stream_id, live, fmt, blocks, stats))
            first, ended, sent_at = None, False, 0.0
            while not ended:
                ready = [await blocks.get()]
                if first is not None and (wait := sent_at + SEND_EVERY_S - time.monotonic()) > 0:
                    await asyncio.sleep(wait)  # the blocks made meanwhile go in this chunk
                while ready[-1] is not None and not isinstance(ready[-1], BaseException) and not blocks.empty():
                    ready.append(blocks.get_nowait())
                chunk = []
                for made in ready:  # what the transport has not taken yet goes as one chunk
                    if made is None:
                        ended = True
                        break
                    if isinstance(made, BaseException):
                        raise made
                    images, block, switches, held = made
                    for image in images:
                        elapsed_ms = (time.time() - started) * 1000
                        first = elapsed_ms if first is None else first
                        headers = {"X-Frame": stats["frames"], "X-Block": block, "X-Prompt": switches,
                                   "X-Ms": f"{elapsed_ms:.1f}", "X-Held-Bytes": held}
                        chunk.append(part(image, FORMATS[fmt], headers))
                        stats["frames"] += 1
                if chunk:
                    sent_at = time.monotonic()
                    yield b"".join(chunk)
            seconds = time.time() - started
            stats.update(first_frame_ms=first or 0.0, frames_per_s=stats["frames"] / max(seconds - (first or 0) / 1000, 1e-9),
                         seconds=seconds)
            yield json_part({"done": True, **stats})
        finally:
            if producer is not None:
                producer.cancel()
            await self.registry.finish.remote(stream_id, stats)
            self._log(stats)

    async def _produce(self, stream_id: str, live: Any, fmt: str, blocks: asyncio.Queue, stats: dict[str, Any]) -> None:
        """Make the stream's blocks into `blocks` (then None, or the error). Before the first block the
        replica waits for the registry's answer (a switch scheduled before the frames were asked for);
        after it, the registry is asked at most every POLL_EVERY_S while blocks are made, and its answer
        applies from the next block: a Serve call per block cost a replica a quarter of its CPU when blocks
        take milliseconds. A switch reaches the stream within about 50 ms; one scheduled at a block is
        handed over ahead of it and taken at that block."""
        pending: list[tuple[int, str]] = []  # (from block, prompt), in the order they were asked
        asked, asked_at = asyncio.ensure_future(self.registry.poll.remote(stream_id)), time.monotonic()
        try:
            control = await asked
            asked = None
            while True:
                if control is not None:
                    if control["stop"]:
                        stats["stopped"] = True
                        break
                    pending += [(live.blocks if block < 0 else block, prompt) for block, prompt in control["prompts"]]
                    control = None
                if live.done:
                    break
                due = [prompt for block, prompt in pending if block <= live.blocks]
                if due:
                    pending = [(block, prompt) for block, prompt in pending if block > live.blocks]
                    live.switch_prompt(due[-1])
                    stats["switches"] += 1
                if asked is None and time.monotonic() - asked_at >= POLL_EVERY_S:
                    asked, asked_at = asyncio.ensure_future(self.registry.poll.remote(stream_id)), time.monotonic()
                # Made and encoded in a thread: the event loop keeps relaying parts and answering Serve.
                images, held = await asyncio.to_thread(self._block, live, fmt)
                stats["blocks"] = live.blocks
                await blocks.put((images, live.blocks - 1, stats["switches"], held))
                if asked is not None and asked.done():
                    control, asked = asked.result(), None
            await blocks.put(None)
        except Exception as err:  # noqa: BLE001 - handed to the generator, which raises it
            await blocks.put(err)
        finally:
            if asked is not None:
                asked.cancel()

    def _block(self, live: Any, fmt: str) -> tuple[list[bytes], int]:
        """The next block's frames, encoded, and what the stream holds after it."""
        return [encode_frame(frame, fmt, self.quality) for frame in live.next_frames()], live.held_bytes()

    def _log(self, stats: dict[str, Any]) -> None:
        """A stream that ran to its end or to a stop (not one cut off by its client) as the next step."""
        if self.tracker is not None and "first_frame_ms" in stats:
            self.tracker.log_metrics({k: float(stats[k]) for k in ("first_frame_ms", "frames_per_s", "frames")}, self.streams_logged)
            self.streams_logged += 1


app = FastAPI(title="oneforce streaming")


# Helpers of the ingress stand above it: `serve.ingress` takes the class as it is when decorated.
def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _json_body(request: Request, limits: Limits) -> Any:
    """The request's JSON, read up to a bound (a prompt at its limit, four bytes a character, and
    room for the other fields): a larger body is refused before it is all read."""
    import json

    bound = 4 * limits.max_prompt_chars + 1024
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > bound:
            raise RequestError("body", f"over {bound} bytes", status=413)
    try:
        return json.loads(body)
    except ValueError:
        raise RequestError("body", "must be JSON") from None


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class StreamIngress:
    def __init__(self, registry: Any, replica: Any, limits: dict[str, int], token_sha256: str, page: str) -> None:
        self.registry, self.replica, self.limits = registry, replica, Limits(**limits)
        self.token_sha256, self.page = token_sha256, page

    def _authorize(self, request: Request) -> None:
        """With a token set, /v1 wants `Authorization: Bearer <token>`; only its hash is held here."""
        if not self.token_sha256:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.token_sha256):
            raise RequestError("authorization", "a valid bearer token is required", status=401)

    async def _call(self, method: Any, *args: Any) -> Any:
        """A registry call; its RequestError (raised in the registry) comes back as the original."""
        from ray.exceptions import RayTaskError

        try:
            return await method.remote(*args)
        except RayTaskError as err:
            if isinstance(err.cause, RequestError):
                raise err.cause from None
            raise

    @app.get("/")
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.post("/v1/streams")
    async def create(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            body = await _json_body(request, self.limits)
            parsed = parse_request(body, self.limits)
            client = request.client.host if request.client else "unknown"
            stream_id = await self._call(self.registry.create, parsed.to_dict(), client)
        except RequestError as err:
            return _error(err)
        return JSONResponse({"id": stream_id, **parsed.to_dict()}, status_code=201)

    @app.get("/v1/streams/{stream_id}")
    async def frames(self, stream_id: str, request: Request, format: str = "jpeg"):  # noqa: A002 - the query's name
        from ray.serve.exceptions import BackPressureError

        try:
            self._authorize(request)
            if format not in FORMATS:
                raise RequestError("format", f"must be one of {', '.join(FORMATS)}, got {format!r}")
            claimed = await self._call(self.registry.claim, stream_id)
        except RequestError as err:
            return _error(err)
        started = time.time()
        parts = self.replica.options(stream=True).run.remote(stream_id, claimed, format, started)
        try:
            first = await parts.__anext__()
        except BackPressureError:
            await self.registry.finish.remote(stream_id, {"refused": "busy"})
            return JSONResponse({"error": "every replica is busy and its queue is full: retry later", "field": "replicas"},
                                status_code=503)
        except Exception as err:  # the replica could not start the stream
            await self.registry.finish.remote(stream_id, {"error": str(err)})
            return JSONResponse({"error": cause(err).line(), "field": "replica"}, status_code=500)
        return StreamingResponse(self._relay(first, parts, stream_id), media_type=CONTENT_TYPE,
                                 headers={"Cache-Control": "no-store", "X-Stream": stream_id})

    async def _relay(self, first: bytes, parts: Any, stream_id: str) -> AsyncIterator[bytes]:
        yield first
        try:
            async for chunk in parts:
                yield chunk
        except Exception as err:  # the replica died mid-stream: the stream ends with the error
            line = cause(err).line()
            await self.registry.finish.remote(stream_id, {"error": line})
            yield json_part({"error": line})

    @app.post("/v1/streams/{stream_id}/prompt")
    async def switch(self, stream_id: str, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            body = await _json_body(request, self.limits)
            prompt, at_block = parse_switch(body, self.limits)
            await self._call(self.registry.switch, stream_id, prompt, at_block)
        except RequestError as err:
            return _error(err)
        return JSONResponse({"id": stream_id, "prompt": prompt, "at_block": at_block})

    @app.get("/v1/streams/{stream_id}/status")
    async def status(self, stream_id: str, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            return JSONResponse(await self._call(self.registry.status, stream_id))
        except RequestError as err:
            return _error(err)

    @app.delete("/v1/streams/{stream_id}")
    async def stop(self, stream_id: str, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            await self._call(self.registry.stop, stream_id)
        except RequestError as err:
            return _error(err)
        return JSONResponse({"id": stream_id, "stopped": True})
