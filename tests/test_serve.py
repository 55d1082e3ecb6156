"""The streaming server (jobs/serve.py, actors/streaming.py) as a real Ray Serve application on the
session's Ray cluster, over a tiny export, read over HTTP as a client reads it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.serve import APP_NAME
from pipeline.checkpoint import export_settings
from pipeline.config import load_config
from pipeline.generation import SHIPPED_STUDENT, ClipGenerator
from pipeline.live import LiveStream
from pipeline.streaming import RequestError, read_parts
from pipeline.toyworld.grader import grade_clip
from tests.conftest import _SECRET_PREFIX

REPO = Path(__file__).resolve().parents[1]
RED, BLUE = "a red square moving left, fast", "a blue circle moving up, slow"
EXPORT = str(SHIPPED_STUDENT)  # trained: the toy grader reads what it streams
WORLD = load_config(str(REPO / "configs" / "toy_teacher.yaml")).world  # the world it was trained in
TOKEN = f"{_SECRET_PREFIX}serve-token"  # a marker: the session fails if any file it wrote holds it
SERVE = ["serve.max_queued_streams=1", "serve.resources={CPU: 0.5}", "serve.max_blocks=512", "serve.max_streams_per_client=8",
         "generate.max_prompt_chars=200"]


class Client:
    def __init__(self, port: int, token: str = TOKEN) -> None:
        self.port, self.token = port, token

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
        connection = self._connection()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=payload, headers=headers)
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")

    def create(self, **request) -> str:
        status, body = self.call("POST", "/v1/streams", request)
        assert status == 201, body
        return body["id"]

    def open(self, stream_id: str, fmt: str = "png") -> http.client.HTTPResponse:
        connection = self._connection()
        connection.request("GET", f"/v1/streams/{stream_id}?format={fmt}", headers={"Authorization": f"Bearer {self.token}"})
        return connection.getresponse()


def chunks(reply: http.client.HTTPResponse):
    while chunk := reply.read1(65536):
        yield chunk


def frame_of(part) -> np.ndarray:
    from PIL import Image
    import io

    return np.asarray(Image.open(io.BytesIO(part.body)).convert("RGB"), dtype=np.float32) / 255


def jpeg_round_trip(frame: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image
    import io

    out = io.BytesIO()
    Image.fromarray(np.rint(frame * 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("RGB"), dtype=np.float32) / 255


@pytest.fixture(scope="module")
def server(ray_local, ray_cluster, tmp_path_factory):
    """The shipped toy student served on the session's cluster as users start it, `python jobs/serve.py
    --checkpoint ...` in the foreground, with a bearer token in its environment and logging to MLflow;
    (client, generator, MLflow store) where the generator is the same export loaded here, as the
    reference. At the end the job is stopped as `ray job stop` stops it (SIGTERM): it deletes its
    application and exits 0."""
    from ray import serve

    from tests.browser import free_port

    tmp = tmp_path_factory.mktemp("serve")
    store, port = f"sqlite:///{tmp / 'mlflow.db'}", free_port()
    overrides = [*SERVE, f"serve.port={port}", f"ray.address={ray_cluster[0]}", "serve.log_to_mlflow=true",
                 f"tracking.tracking_uri={store}", "tracking.experiment=serve"]
    cfg = load_config(None, overrides, base=export_settings(EXPORT))
    out = tmp / "serve.out"
    with open(out, "w") as sink:
        job = subprocess.Popen([sys.executable, "jobs/serve.py", "--checkpoint", EXPORT, *overrides], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=sink, env={**os.environ, cfg.serve.auth_env: TOKEN})
    try:
        url = f"http://127.0.0.1:{port}/"
        first = wait_for_line(job, "streaming ", timeout=240, log=out)
        assert first == f"streaming {EXPORT} at {url} (API: {url}v1/streams)", first
        yield Client(port), ClipGenerator.load(EXPORT, cfg), store
        job.send_signal(signal.SIGTERM)
        rest, _ = job.communicate(timeout=120)
        assert job.returncode == 0 and rest.strip().endswith("stopped: the application is deleted"), (job.returncode, rest, out.read_text()[-2000:])
        assert APP_NAME not in serve.status().applications
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        serve.shutdown()


def wait_for_line(job: subprocess.Popen, prefix: str, timeout: float, log: Path) -> str:
    """The first line of the job's stdout that starts with `prefix`; fails with its stderr if the job
    exits or `timeout` seconds pass first."""
    found: list[str] = []

    def read() -> None:
        for line in job.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"jobs/serve.py did not start (exit code {job.poll()}): {log.read_text()[-3000:]}"
    return found[0]


def stream_parts(client: Client, stream_id: str, fmt: str = "png") -> tuple[list, list[float]]:
    reply = client.open(stream_id, fmt)
    assert reply.status == 200 and reply.getheader("Content-Type").startswith("multipart/x-mixed-replace")
    parts, arrived = [], []
    for part in read_parts(chunks(reply)):
        parts.append(part)
        arrived.append(time.time())
    return parts, arrived


def test_a_stream_is_the_generated_clip_frame_by_frame_and_arrives_block_by_block(server):
    client, gen, _ = server
    parts, _ = stream_parts(client, client.create(prompt=RED, seed=3))
    *frames, end = parts
    assert end.content_type == "application/json" and end.json()["done"] and end.json()["frames"] == len(frames)
    clip = gen.generate(RED, seed=3)
    assert len(frames) == len(clip) and all(p.content_type == "image/png" for p in frames)
    np.testing.assert_allclose(np.stack([frame_of(p) for p in frames]), np.rint(clip * 255) / 255, atol=1e-6)  # PNG: exact bytes
    assert [int(p.headers["x-block"]) for p in frames] == [i // gen.settings.frames_per_block for i in range(len(clip))]
    # A longer stream: its first frame reached this client long before the replica made its last block.
    started = time.time()
    parts, arrived = stream_parts(client, client.create(prompt=RED, seed=3, frames=128, window=3))
    made_last = started + float(parts[-2].headers["x-ms"]) / 1000
    assert arrived[0] < made_last - 0.5 * (made_last - started), (arrived[0] - started, made_last - started)
    # JPEG, the default: each frame decodes to what PIL makes of the clip's frame at serve.jpeg_quality.
    parts, _ = stream_parts(client, client.create(prompt=RED, seed=3), fmt="jpeg")
    assert [p.content_type for p in parts[:-1]] == ["image/jpeg"] * len(clip)
    for part, want in zip(parts, clip):
        np.testing.assert_array_equal(frame_of(part), jpeg_round_trip(want, quality=90))


def test_a_prompt_switch_mid_stream_keeps_the_past_and_follows_the_new_prompt(server):
    client, gen, _ = server
    stream_id = client.create(prompt=RED, seed=5, frames=256, window=3, sink_frames=1)
    reply = client.open(stream_id)
    parts, stopped = [], False
    for part in read_parts(chunks(reply)):
        parts.append(part)
        if len(parts) == 1:
            assert client.call("POST", f"/v1/streams/{stream_id}/prompt", {"prompt": BLUE})[0] == 200
        elif not stopped and part.headers.get("x-prompt") == "1" and int(part.headers["x-block"]) >= switched_at(parts) + 2:
            assert client.call("DELETE", f"/v1/streams/{stream_id}")[0] == 200
            stopped = True
    *frames, end = parts
    assert end.json().get("stopped") and len(frames) < 256, end.json()
    k = switched_at(parts)
    assert 1 <= k < len(frames)
    # The reference: the same stream in this process, switched before block k.
    live = LiveStream(gen, RED, 5, 256, cache_window=3, sink_frames=1)
    want = []
    for block in range(len(frames)):
        if block == k:
            live.switch_prompt(BLUE)
        want.append(live.next_frames())
    np.testing.assert_allclose(np.stack([frame_of(p) for p in frames]), np.rint(np.concatenate(want) * 255) / 255, atol=1e-6)
    status, body = client.call("GET", f"/v1/streams/{stream_id}/status")
    assert status == 200 and body["state"] == "finished" and body["stats"]["stopped"]


def test_a_switch_scheduled_at_a_block_keeps_the_past_and_grades_as_the_new_prompt(server):
    """A switch to BLUE at block 4 of the clip, sent before the frames are asked for: frames 0-3 are
    RED's clip; all equal the in-process stream switched there; the toy grader reads RED's colour and
    shape before the switch and BLUE's after it."""
    client, gen, _ = server
    stream_id = client.create(prompt=RED, seed=1)
    assert client.call("POST", f"/v1/streams/{stream_id}/prompt", {"prompt": BLUE, "at_block": 4}) == (
        200, {"id": stream_id, "prompt": BLUE, "at_block": 4})
    parts, _ = stream_parts(client, stream_id)
    frames = np.stack([frame_of(p) for p in parts[:-1]])
    assert [int(p.headers["x-prompt"]) for p in parts[:-1]] == [0] * 4 + [1] * 5
    np.testing.assert_allclose(frames[:4], np.rint(gen.generate(RED, 1)[:4] * 255) / 255, atol=1e-6)
    live, want = LiveStream(gen, RED, 1), []
    for block in range(9):
        if block == 4:
            live.switch_prompt(BLUE)
        want.append(live.next_frames())
    np.testing.assert_allclose(frames, np.rint(np.concatenate(want) * 255) / 255, atol=1e-6)
    before, after = grade_clip(frames[:4], RED, WORLD), grade_clip(frames[4:], BLUE, WORLD)
    assert before.colour_ok and before.shape_ok and after.colour_ok and after.shape_ok, (before, after)


def switched_at(parts) -> int:
    """The first block made under the switched prompt (frames_per_block is 1 here)."""
    return next((int(p.headers["x-block"]) for p in parts if p.headers.get("x-prompt") == "1"), 10**9)


def test_a_long_stream_with_a_window_holds_flat_memory_and_follows_its_prompt(server):
    client, gen, _ = server
    blocks = 4 * gen.settings.num_blocks
    parts, _ = stream_parts(client, client.create(prompt=BLUE, seed=1, frames=blocks, window=3, sink_frames=1))
    *frames, end = parts
    held = [int(p.headers["x-held-bytes"]) for p in frames]
    assert len(frames) == blocks and end.json()["frames"] == blocks
    assert held[-1] == held[blocks // 3] > 0, held  # once the window is full, nothing grows
    clip = np.stack([frame_of(p) for p in frames])
    for start in range(0, blocks, gen.settings.num_blocks):  # each clip-length stretch, to the end
        score = grade_clip(clip[start:start + gen.settings.num_blocks], BLUE, WORLD)
        assert score.colour_ok and score.shape_ok, (start, score)


def test_each_stream_s_numbers_reach_the_replica_s_mlflow_run(server):
    import mlflow

    client, _, store = server
    stream_parts(client, client.create(prompt=RED, seed=7))
    runs = mlflow.MlflowClient(store).search_runs([mlflow.MlflowClient(store).get_experiment_by_name("serve").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "serve"
    history = mlflow.MlflowClient(store).get_metric_history(runs[0].info.run_id, "first_frame_ms")
    assert history and all(m.value > 0 for m in history) and sorted(m.step for m in history) == list(range(len(history)))
    frames = mlflow.MlflowClient(store).get_metric_history(runs[0].info.run_id, "frames")
    assert max(frames, key=lambda m: m.step).value == 9  # this stream's: the clip's 9 frames


def test_a_full_queue_is_503_at_once_and_the_stream_ahead_is_unharmed(server):
    client, _, _ = server
    running = client.open(client.create(prompt=RED, frames=512, window=3))  # the replica's one stream
    first = next(read_parts(chunks(running)))
    assert first.content_type == "image/png"
    queued_id, outcome = client.create(prompt=RED), {}
    waiter = threading.Thread(target=lambda: outcome.update(reply=client.open(queued_id)))
    waiter.start()
    time.sleep(1.0)  # it waits in the replica's queue (serve.max_queued_streams=1)
    start = time.time()
    status, body = client.call("GET", f"/v1/streams/{client.create(prompt=RED)}")
    assert status == 503 and "queue is full" in body["error"] and time.time() - start < 5
    running.close()  # the client leaves: the replica ends that stream and takes the queued one
    waiter.join(timeout=120)
    parts = list(read_parts(chunks(outcome["reply"])))
    assert parts[-1].json()["done"] and len(parts) > 1


@pytest.mark.parametrize("method,path,body,status,field", [
    ("POST", "/v1/streams", {"prompt": ""}, 400, "prompt"),
    ("POST", "/v1/streams", {"prompt": "x" * 201}, 400, "prompt"),
    ("POST", "/v1/streams", {"prompt": RED, "frames": 10_000}, 400, "frames"),
    ("POST", "/v1/streams", {"prompt": RED, "frames": 16}, 400, "frames"),  # past the clip without a window
    ("POST", "/v1/streams", {"prompt": RED, "frames": 8, "window": 3, "sink_frames": 3}, 400, "sink_frames"),
    ("POST", "/v1/streams", {"prompt": RED, "seed": "one"}, 400, "seed"),
    ("POST", "/v1/streams", {"prompt": RED, "colour": "red"}, 400, "colour"),
    ("POST", "/v1/streams", b"{not json", 400, "body"),
    ("POST", "/v1/streams", b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "body"),  # refused before it is all read
    ("GET", "/v1/streams/nope", None, 404, "id"),
    ("POST", "/v1/streams/nope/prompt", {"prompt": BLUE}, 404, "id"),
    ("POST", "/v1/streams/nope/prompt", {"prompt": BLUE, "at_block": -1}, 400, "at_block"),
    ("DELETE", "/v1/streams/nope", None, 404, "id"),
])
def test_bad_requests_are_one_line_json_naming_the_field(server, method, path, body, status, field):
    client, _, _ = server
    got, reply = client.call(method, path, raw=body) if isinstance(body, bytes) else client.call(method, path, body)
    assert (got, reply["field"]) == (status, field), reply
    assert "\n" not in reply["error"] and reply["error"].startswith(f"{field}:")


def test_without_the_token_every_call_is_401_and_a_stream_is_requested_once(server):
    client, _, _ = server
    stranger = Client(client.port, token="wrong")
    assert stranger.call("POST", "/v1/streams", {"prompt": RED})[0] == 401
    stream_id = client.create(prompt=RED)
    assert Client(client.port, token="").call("GET", f"/v1/streams/{stream_id}/status")[0] == 401
    stream_parts(client, stream_id)
    status, body = client.call("GET", f"/v1/streams/{stream_id}")
    assert status == 409 and body["field"] == "id"
    status, body = client.call("POST", f"/v1/streams/{stream_id}/prompt", {"prompt": BLUE})
    assert status == 409


def test_a_client_with_too_many_open_streams_gets_429_until_it_stops_one(server):
    client, _, _ = server
    opened = []
    while (reply := client.call("POST", "/v1/streams", {"prompt": RED}))[0] == 201:
        opened.append(reply[1]["id"])
        assert len(opened) <= 8  # serve.max_streams_per_client
    assert reply[0] == 429 and reply[1]["field"] == "client" and len(opened) == 8, (reply, len(opened))
    assert client.call("DELETE", f"/v1/streams/{opened.pop()}")[0] == 200  # a stream never started ends at once
    opened.append(client.create(prompt=RED))
    for stream_id in opened:
        assert client.call("DELETE", f"/v1/streams/{stream_id}")[0] == 200


def test_the_page_is_served_without_a_token(server):
    client, _, _ = server
    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    connection.request("GET", "/")
    reply = connection.getresponse()
    page = reply.read().decode()
    assert reply.status == 200 and "/v1/streams" in page and 'id="video"' in page


def test_the_page_plays_a_stream_in_headless_chromium(server, tmp_path):
    """The page at / in a real browser: the token and a stream 12x the clip typed in, Start clicked;
    every frame is painted on its canvas and the numbers shown."""
    from tests.browser import Page

    client, _, _ = server
    frames = 48
    fill = "; ".join(f"document.getElementById('{key}').value = '{value}'"
                     for key, value in {"token": TOKEN, "frames": frames, "window": 3, "prompt": BLUE}.items())
    with Page(900, 640) as page:
        page.open(f"http://127.0.0.1:{client.port}/")
        assert page.wait_for("document.readyState === 'complete' && !!document.getElementById('start')", 60)
        page.evaluate(f"{fill}; document.getElementById('start').click(); true")
        state = page.wait_for("['done', 'failed', 'refused'].includes(document.getElementById('state').textContent) "
                              "&& document.getElementById('state').textContent", 120)
        painted = int(page.evaluate("document.getElementById('count').textContent"))
        first_ms = float(page.evaluate("document.getElementById('first').textContent"))
        lit = page.evaluate("""(() => {
            const c = document.getElementById('video'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) n += (d[i] + d[i + 1] + d[i + 2]) > 0; return [c.width, n]; })()""")
        shot = page.screenshot(tmp_path / "serve.png")
    assert state == "done" and painted == frames, (state, painted)
    assert 0 < first_ms < 60_000 and lit[0] == 32 and lit[1] > 0.5 * 32 * 32, (first_ms, lit)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def alive_replicas(address: str) -> list:
    """The StreamReplica actors alive on the cluster, as Ray's state API lists them."""
    from ray.util.state import list_actors

    return [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")]) if "StreamReplica" in a.class_name]


def test_a_replica_killed_mid_stream_ends_it_with_an_error_and_the_next_stream_is_served(server, ray_cluster):
    client, gen, _ = server
    reply = client.open(client.create(prompt=RED, frames=512, window=3))
    parts = read_parts(chunks(reply))
    next(parts)
    [replica] = alive_replicas(ray_cluster[0])
    os.kill(replica.pid, signal.SIGKILL)
    end = list(parts)[-1]
    assert end.content_type == "application/json" and "error" in end.json(), end.body[:200]
    deadline = time.time() + 180
    while True:  # Serve replaces the replica; until it is up, a stream waits, or is refused (5xx)
        reply = client.open(client.create(prompt=BLUE, seed=2))
        parts_after = list(read_parts(chunks(reply))) if reply.status == 200 else []
        if parts_after and parts_after[-1].json().get("done"):
            break
        assert time.time() < deadline and (reply.status == 200 or reply.status >= 500), (reply.status, reply.read()[:300])
        time.sleep(1)
    np.testing.assert_allclose(np.stack([frame_of(p) for p in parts_after[:-1]]), np.rint(gen.generate(BLUE, 2) * 255) / 255, atol=1e-6)


def test_with_max_replicas_a_second_replica_starts_and_takes_the_stream_that_waits(server, ray_cluster):
    """The running application updated in place to `serve.max_replicas=2` (one replica to start, no
    delay before scaling up): while one stream holds the first replica, a second one waits in the
    queue, Serve's autoscaler adds a replica, and the waiting stream runs on it before the first one
    ends. (The job, stopped at the end of the module, deletes the updated application.)"""
    from ray import serve

    from jobs import serve as job

    client, gen, _ = server
    cfg = load_config(None, [*SERVE, f"serve.port={client.port}", "serve.num_replicas=1", "serve.max_replicas=2",
                             "serve.upscale_delay_s=0", "serve.max_blocks=100000"], base=export_settings(EXPORT))
    serve.run(job.build_app(cfg, EXPORT, TOKEN), name=APP_NAME, route_prefix="/")
    deadline = time.time() + 180  # the old one's graceful shutdown, on a slow machine
    while len(alive_replicas(ray_cluster[0])) != 1:  # the update replaced the replica (its config changed); the old one stops
        assert time.time() < deadline, alive_replicas(ray_cluster[0])
        time.sleep(0.5)
    # Holds the one replica until it is closed: at the toy's ~100 frames a second, minutes of frames.
    first_id = client.create(prompt=RED, frames=100_000, window=3)
    first = client.open(first_id)
    assert next(read_parts(chunks(first))).content_type == "image/png"
    waiting = client.create(prompt=BLUE, seed=2)
    outcome: dict = {}
    opener = threading.Thread(target=lambda: outcome.update(parts=stream_parts(client, waiting)[0]))
    opener.start()
    opener.join(timeout=240)  # the second replica's start, on a machine two tests may share
    assert not opener.is_alive(), "the waiting stream did not start while the first one ran"
    status, first_state = client.call("GET", f"/v1/streams/{first_id}/status")
    assert status == 200 and first_state["state"] == "streaming", first_state  # the two ran side by side
    assert len(alive_replicas(ray_cluster[0])) == 2
    first.close()
    np.testing.assert_allclose(np.stack([frame_of(p) for p in outcome["parts"][:-1]]), np.rint(gen.generate(BLUE, 2) * 255) / 255, atol=1e-6)


def test_a_checkpoint_that_does_not_exist_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "jobs/serve.py", "--checkpoint", str(tmp_path / "nowhere")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "nowhere" in result.stderr, result.stderr


def test_request_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(RequestError("frames", "too many", 400)))
    assert (err.field, err.status, str(err)) == ("frames", 400, "frames: too many")
