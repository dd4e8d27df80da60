"""Tests for rlprim.remote: real FastAPI/uvicorn servers on 127.0.0.1 (free ports), in threads
or spawned processes, called through the standard-library client; real rollouts from a tiny
model; no mocks.

Servers in other processes (``in_subprocess=True``, the CLI) load their function by name from
a small module written to a temporary directory (``served_module``): importing it costs the
child only ``import rlprim``, not this test file's imports.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlprim as rp
from rlprim.remote import (
    RemoteServer,
    create_env_app,
    create_reward_app,
    remote_env_fn,
    remote_reward_fn,
    serve_env_fn,
    serve_reward_fn,
    start_env_server,
    start_reward_server,
    wait_for_server,
)
from rlprim.rewards import compute_batch_rewards, create_batched_reward_fn, weighted_sum
from rlprim.rollouts import create_batch_multiturn_rollouts, create_multiturn_rollout
from rlprim.serialization import to_json
from rlprim.testing import tiny_model, tiny_tokenizer
from rlprim.types import Conversation, Generation, GenerationConfig, Message, Rollout

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+3=", "answer": 5},
           {"prompt": "7*8=", "answer": 56}]


# =========================================================================== served functions


def checksum_reward(rollout: Rollout) -> float:
    """A reward that changes with any bit of the rollout: equal results mean the server saw
    the very rollout the client holds."""
    return float(zlib.crc32(to_json(rollout).encode("ascii")))


def vector_reward(rollout: Rollout) -> list[float]:
    ids = rollout.generation.token_ids
    return [float(len(rollout.generation.text)), float(sum(ids) % 5), -1.5]


def countdown_env(conversation: Conversation) -> list[Message] | None:
    """A deterministic user: replies "more k" until the assistant spoke ``wanted`` times,
    then ends the episode with ``None`` (odd ``wanted``) or no messages (even)."""
    wanted = {"a": 1, "b": 5, "c": 2}[conversation.messages[0].content]
    turns = sum(m.role == "assistant" for m in conversation.messages)
    if turns >= wanted:
        return None if wanted % 2 else []
    return [Message("user", f"more {turns}"), {"role": "user", "content": "go"}]


SERVED_SOURCE = '''"""Reward functions served by other processes in tests/test_remote.py."""
import os
import signal
import zlib

from rlprim.serialization import to_json


def checksum_reward(rollout):
    return float(zlib.crc32(to_json(rollout).encode("ascii")))


def dying_reward(rollout):
    """Logs each prompt it scores to metadata["log"]; kills its own process on "die"."""
    with open(rollout.metadata["log"], "a") as log:
        log.write(rollout.prompt + "\\n")
    if rollout.prompt == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return float(len(rollout.prompt))
'''


# =========================================================================== fixtures, helpers


@pytest.fixture
def served_module(tmp_path, monkeypatch):
    """``rlprim_test_served`` (SERVED_SOURCE), importable here and by spawned children (they
    inherit ``sys.path``)."""
    directory = tmp_path / "served"
    directory.mkdir()
    (directory / "rlprim_test_served.py").write_text(SERVED_SOURCE)
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, "rlprim_test_served", raising=False)
    module = importlib.import_module("rlprim_test_served")
    yield module
    sys.modules.pop("rlprim_test_served", None)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="module")
def rollouts(model, tokenizer):
    """Six real rollouts (3 prompts x 2 samples) with metadata and sampling log-probs."""
    config = GenerationConfig(max_new_tokens=6, num_samples=2, seed=0)
    return rp.create_batch_rollouts(model, tokenizer, PROMPTS, config)


@pytest.fixture
def serve():
    """``serve(kind, fn, **kw)`` starts a server and stops it after the test."""
    servers: list[RemoteServer] = []

    def start(kind, fn, **kwargs):
        starter = start_reward_server if kind == "reward" else start_env_server
        server = starter(fn, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def make_rollout(prompt: str, text: str = "ab", **metadata) -> Rollout:
    ids = tuple(range(3, 3 + len(text)))
    generation = Generation(text, prompt_ids=(1, 2), token_ids=ids,
                            logprobs=tuple(-0.25 * (i + 1) for i in range(len(ids))),
                            finish_reason="stop")
    return Rollout(prompt, generation, metadata=metadata or None)


def recording(score, sizes):
    """A ``.batched`` reward that records each request's size (the server runs it in a worker
    thread of this process, so a list is enough)."""
    def batch_fn(batch):
        sizes.append(len(batch))
        return [score(r) for r in batch]
    return create_batched_reward_fn(batch_fn)


def refused_port():
    """A port bound but not listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


# =========================================================================== rewards


def test_remote_rewards_equal_local_in_batch_size_requests(serve, rollouts):
    sizes: list[int] = []
    server = serve("reward", recording(checksum_reward, sizes))
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url) and server.port > 0
    assert server.pid is None
    remote = remote_reward_fn(server.url, timeout=10.0, batch_size=4)

    local = [checksum_reward(r) for r in rollouts]
    assert len(set(local)) == len(rollouts)  # the checksums tell the rollouts apart
    assert remote.batched(rollouts) == local
    assert sizes == [4, 2]  # ceil(6 / 4) requests

    sizes.clear()
    expected = compute_batch_rewards(rollouts, checksum_reward)
    assert torch.equal(compute_batch_rewards(rollouts, remote), expected)
    assert sizes == [4, 2]

    sizes.clear()
    assert remote(rollouts[5]) == local[5] and sizes == [1]
    sizes.clear()
    one_by_one = remote_reward_fn(server.url, batch_size=1)
    assert one_by_one.batched(rollouts) == local and sizes == [1] * 6
    sizes.clear()
    assert remote.batched([]) == [] and sizes == []


def test_vector_rewards_come_back_as_lists(serve, rollouts):
    server = serve("reward", vector_reward)  # no .batched: scored per rollout on the server
    remote = remote_reward_fn(server.url, batch_size=5)
    values = remote.batched(rollouts)
    assert values == [vector_reward(r) for r in rollouts]
    assert all(isinstance(v, list) and len(v) == 3 for v in values)
    aggregator = weighted_sum([1.0, 0.5, 2.0])
    assert torch.equal(compute_batch_rewards(rollouts, remote, aggregator),
                       compute_batch_rewards(rollouts, vector_reward, aggregator))
    assert remote(rollouts[0]) == vector_reward(rollouts[0])


@pytest.fixture(scope="module")
def echo_server():
    """A reward server returning ``metadata["r"]`` as the reward."""
    server = start_reward_server(lambda rollout: rollout.metadata["r"])
    yield server
    server.stop()


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(value=st.one_of(finite_or_not, st.integers(-2**53, 2**53), st.booleans(),
                       st.lists(finite_or_not, min_size=1, max_size=4)))
def test_reward_values_cross_the_wire_bit_for_bit(echo_server, value):
    remote = remote_reward_fn(echo_server.url)
    got = remote(make_rollout("p", r=value))
    expected = [float(v) for v in value] if isinstance(value, list) else float(value)
    assert type(got) is type(expected)
    pairs = zip(got, expected, strict=True) if isinstance(got, list) else [(got, expected)]
    for a, b in pairs:
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a)
                                                      == math.copysign(1, b))


def test_health_and_stop(serve):
    server = serve("reward", recording(len, []), max_concurrency=3)
    health = wait_for_server(server.url, timeout=5.0)
    assert health == {"status": "ok", "kind": "reward",
                      "function": "rlprim.rewards.create_batched_reward_fn.<locals>.reward_fn",
                      "batched": True, "max_concurrency": 3}
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1.0).close()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"no healthy server at {server.url}/health within "
                                           r"0\.3 s; last error: ConnectionRefusedError"):
        wait_for_server(server.url, timeout=0.3)
    assert time.monotonic() - start < 1.5


# =========================================================================== failures


@pytest.mark.slow
def test_a_server_that_dies_mid_batch_gives_a_clear_error_after_the_retries(tmp_path,
                                                                            served_module):
    log = tmp_path / "scored.txt"
    server = start_reward_server(served_module.dying_reward, in_subprocess=True)
    try:
        assert server.pid is not None and server.pid != os.getpid()
        health = wait_for_server(server.url, timeout=5.0)
        assert health["function"] == "rlprim_test_served.dying_reward"
        batch = [make_rollout(p, log=str(log)) for p in ("p0", "p1", "p2", "p3", "die", "p5")]
        remote = remote_reward_fn(server.url, timeout=5.0, retries=2, batch_size=2,
                                  backoff=0.05)
        start = time.monotonic()
        with pytest.raises(ConnectionError) as error:
            remote.batched(batch)
        elapsed = time.monotonic() - start
        message = str(error.value)
        assert message.startswith(f"remote reward at {server.url}/reward failed for rollouts "
                                  "4-5 of 6 after 3 attempts (retries=2, timeout=5 s, "
                                  "backoff=0.05 s); attempt 1: ")
        # The first attempt lost its connection when the process died; then nobody listens.
        assert "attempt 2: ConnectionRefusedError" in message
        assert "attempt 3: ConnectionRefusedError" in message and "attempt 4" not in message
        assert 0.15 <= elapsed < 3.0  # backoff 0.05 + 0.1, no timeout waited
        # The first two requests were served before the process died on the third.
        assert log.read_text().split() == ["p0", "p1", "p2", "p3", "die"]

        # Through compute_batch_rewards: a ValueError naming the batch, the cause chained.
        with pytest.raises(ValueError, match=r"reward_fn\.batched raised on the batch of 6 "
                                             r"rollouts: ConnectionError: remote reward at "):
            compute_batch_rewards(batch, remote)
    finally:
        server.stop()


def test_a_slow_server_hits_the_timeout(serve):
    def slow_reward(rollout):
        if rollout.prompt == "slow":
            time.sleep(1.5)
        return 1.0

    server = serve("reward", slow_reward, stop_timeout=2.0)
    timeout, retries, backoff = 0.3, 1, 0.1
    remote = remote_reward_fn(server.url, timeout=timeout, retries=retries, batch_size=1,
                              backoff=backoff)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as error:
        remote.batched([make_rollout("fast"), make_rollout("slow")])
    elapsed = time.monotonic() - start
    bound = (retries + 1) * timeout + backoff * (2**retries - 1)  # 0.7 s
    assert bound - 0.01 <= elapsed < bound + 1.0  # slack for a busy machine
    assert str(error.value) == (
        f"remote reward at {server.url}/reward timed out for rollout 1 of 2 after 2 attempts "
        "(retries=1, timeout=0.3 s, backoff=0.1 s); attempt 1: timed out after 0.3 s; "
        "attempt 2: timed out after 0.3 s"
    )
    # The slow call runs in a worker thread: the server still answers meanwhile.
    start = time.monotonic()
    assert wait_for_server(server.url, timeout=1.0)["status"] == "ok"
    assert time.monotonic() - start < 1.0


def test_server_side_exceptions_name_the_rollout_and_are_not_retried(serve):
    calls: list[str] = []

    def picky_reward(rollout):
        calls.append(rollout.prompt)
        if rollout.prompt == "boom":
            raise ValueError(f"cannot score {rollout.prompt!r}")
        return 0.5

    server = serve("reward", picky_reward)
    remote = remote_reward_fn(server.url, retries=3, batch_size=2, backoff=0.01)
    batch = [make_rollout(p) for p in ("p0", "p1", "p2", "boom", "p4")]
    with pytest.raises(RuntimeError) as error:
        remote.batched(batch)
    message = str(error.value)
    assert message.startswith(
        f"remote reward_fn at {server.url}/reward raised on rollout 3 of 5 (index 1 of the "
        "request with rollouts 2-3 of 5): ValueError: cannot score 'boom' (not retried: the "
        "function's own error). Server traceback:\nTraceback (most recent call last):"
    )
    assert "in picky_reward" in message
    assert calls == ["p0", "p1", "p2", "boom"]  # one attempt only, although retries=3

    with pytest.raises(RuntimeError, match=r"reward raised on the rollout: ValueError: cannot "
                                           r"score 'boom' \(not retried"):
        remote(make_rollout("boom"))


def test_batch_function_errors_and_bad_rewards_come_back_with_the_request(serve):
    def broken_batch(batch):
        if any(r.prompt == "boom" for r in batch):
            raise KeyError("no reference answer")
        short = any(r.prompt == "short" for r in batch)
        return [1.0] * (len(batch) - short)

    server = serve("reward", create_batched_reward_fn(broken_batch))
    remote = remote_reward_fn(server.url, batch_size=3)
    with pytest.raises(RuntimeError, match=r"raised on the request with rollouts 3-4 of 5 \(the "
                                           r"batch function raised as a whole\): ValueError: "
                                           r"reward_fn.batched returned 1 rewards for 2"):
        remote.batched([make_rollout(p) for p in ("a", "b", "c", "d", "short")])
    batch = [make_rollout(p) for p in ("a", "b", "c", "boom")]
    with pytest.raises(RuntimeError, match=r"raised on the request with rollout 3 of 4 .*"
                                           r"KeyError: 'no reference answer'"):
        remote.batched(batch)

    bad = serve("reward", lambda r: "high" if r.prompt == "b" else 1.0)
    with pytest.raises(RuntimeError, match=r"raised on rollout 1 of 3 .*TypeError: a reward "
                                           r"must be a number or a sequence of numbers, got str"):
        remote_reward_fn(bad.url).batched(batch[:3])


def test_requests_the_server_cannot_read_are_rejected_without_retry(serve):
    env_server = serve("env", countdown_env)
    # A reward client pointed at an environment server: 404, not retried.
    with pytest.raises(RuntimeError, match=rf"remote reward at {env_server.url}/reward rejected "
                                           r"the request with the rollout: HTTP 404: Not Found "
                                           r"\(not retried\)"):
        remote_reward_fn(env_server.url, retries=5, backoff=10.0)(make_rollout("x"))
    reward_server = serve("reward", len)
    connection = http.client.HTTPConnection("127.0.0.1", reward_server.port, timeout=5)
    connection.request("POST", "/reward", body=json.dumps({"rollouts": [{"prompt": 3}]}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 400
    assert body["error"].startswith("rollouts[0] is not an encoded Rollout: data: Rollout "
                                    "needs the keys ['generation']")


class _ScriptedHandler(BaseHTTPRequestHandler):
    """A plain HTTP server answering from the server's ``script`` list, in order (a proxy
    returning 503 while the reward service restarts)."""

    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append(self.path)
        status, body = self.server.script.pop(0)
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedHandler)
    server.requests, server.script = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_5xx_answers_are_retried_and_a_later_success_is_used(scripted_server):
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    scripted_server.script = [(503, "busy"), (502, "bad gateway"),
                              (200, json.dumps({"rewards": [0.25, [1.0, 2.0]]}))]
    remote = remote_reward_fn(url, retries=2, backoff=0.01)
    assert remote.batched([make_rollout("a"), make_rollout("b")]) == [0.25, [1.0, 2.0]]
    assert scripted_server.requests == ["/reward"] * 3

    scripted_server.requests.clear()
    scripted_server.script = [(503, "busy")] * 3
    with pytest.raises(RuntimeError, match=r"failed for rollouts 0-1 of 2 after 3 attempts "
                                           r".*attempt 1: HTTP 503: busy; attempt 2: HTTP 503"):
        remote.batched([make_rollout("a"), make_rollout("b")])
    assert len(scripted_server.requests) == 3

    scripted_server.script = [(200, json.dumps({"rewards": [1.0]}))]
    with pytest.raises(RuntimeError, match=r"malformed answer for rollouts 0-1 of 2: expected "
                                           r"a list of 2 rewards, got \[1\.0\]"):
        remote.batched([make_rollout("a"), make_rollout("b")])


def test_backoff_doubles_between_attempts_and_never_retries_forever():
    sock = refused_port()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        remote = remote_reward_fn(url, timeout=1.0, retries=3, backoff=0.1)
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=r"after 4 attempts \(retries=3") as error:
            remote(make_rollout("a"))
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert 0.7 - 0.01 <= elapsed < 0.7 + 1.0  # 0.1 + 0.2 + 0.4, then slack
    assert str(error.value).count("ConnectionRefusedError") == 4


@pytest.fixture
def hostile_server():
    """``start(mode)`` runs tests/scripts/trickle_server.py MODE in its own process and returns
    its URL; every server started is killed by its PID after the test."""
    processes: list[subprocess.Popen] = []

    def start(mode):
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "scripts" / "trickle_server.py"), mode],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        processes.append(process)
        port = int(process.stdout.readline())
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.parametrize("mode", ["headers", "body", "noread"])
def test_no_server_behaviour_stretches_the_deadline_of_a_request(hostile_server, mode):
    url = hostile_server(mode)
    timeout, retries, backoff = 0.5, 1, 0.1
    remote = remote_reward_fn(url, timeout=timeout, retries=retries, backoff=backoff)
    # A large body for "noread": the send blocks once the socket buffers are full.
    rollout = make_rollout("a", note="x" * (8 * 2**20 if mode == "noread" else 1))
    start = time.monotonic()
    with pytest.raises(TimeoutError) as error:
        remote(rollout)
    elapsed = time.monotonic() - start
    bound = (retries + 1) * timeout + backoff  # 1.1 s; a byte every 50 ms would go on for 30 s
    assert bound - 0.01 <= elapsed < bound + 1.0
    assert str(error.value) == (
        f"remote reward at {url}/reward timed out for the rollout after 2 attempts (retries=1, "
        "timeout=0.5 s, backoff=0.1 s); attempt 1: timed out after 0.5 s; attempt 2: timed "
        "out after 0.5 s")
    cause = error.value.__context__
    while cause is not None and "took longer than" not in str(cause):
        cause = cause.__context__
    assert cause is None or f"POST {url}/reward took longer than 0.5 s" in str(cause)


def test_wait_for_server_gives_up_on_a_trickling_server(hostile_server):
    url = hostile_server("headers")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"no healthy server at {url}/health within 0\.6 s; "
                                           rf"last error: TimeoutError: GET {url}/health took"):
        wait_for_server(url, timeout=0.6)
    assert time.monotonic() - start < 0.6 + 1.0


def _raw_post(port, head_lines, body_chunks):
    """Sends a raw HTTP/1.1 request; returns (status, decoded JSON body or None)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(["POST /reward HTTP/1.1", "Host: 127.0.0.1", *head_lines])
                      + "\r\n\r\n").encode())
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed: read what it said
                break
        reply = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
            if b"\r\n\r\n" in reply and reply.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
                break
    status = int(reply.split(b" ", 2)[1])
    body = reply.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(body) if body.startswith(b"{") else None


def test_oversized_request_bodies_are_answered_413_before_they_are_stored(serve):
    calls = []

    def reward(rollout):
        calls.append(rollout.prompt)
        return 1.0

    limit = 64 * 2**10
    server = serve("reward", reward, max_body_bytes=limit)
    remote = remote_reward_fn(server.url, timeout=10.0, retries=3, backoff=0.01)
    assert remote(make_rollout("small")) == 1.0
    # Through the client: a clear error, not retried (a 4xx), the function never called.
    with pytest.raises(RuntimeError) as error:
        remote(make_rollout("big", note="x" * (2 * limit)))
    message = str(error.value)
    assert message.startswith(f"remote reward at {server.url}/reward rejected the request with "
                              "the rollout: HTTP 413: request body of ")
    assert f"exceeds this server's limit of {limit} bytes (max_body_bytes)" in message
    assert message.endswith("(not retried)") and calls == ["small"]
    # A declared length far above the limit: refused without reading the body.
    status, body = _raw_post(server.port, ["Content-Type: application/json",
                                           f"Content-Length: {50 * 2**20}"], [b"{" * 1024])
    assert status == 413 and body["max_body_bytes"] == limit
    assert body["error"].startswith(f"request body of {50 * 2**20} bytes exceeds")
    # A chunked body (no length announced) is counted as it arrives.
    chunk = b"%x\r\n%s\r\n" % (16 * 2**10, b" " * (16 * 2**10))
    status, body = _raw_post(server.port, ["Content-Type: application/json",
                                           "Transfer-Encoding: chunked"], [chunk] * 8 + [b"0\r\n\r\n"])
    assert status == 413 and body["error"].startswith(f"request body of more than {limit} bytes")
    assert calls == ["small"]
    # At the limit exactly, a request is read and served.
    padding = limit - len(json.dumps({"rollouts": []}))
    status, body = _raw_post(server.port, ["Content-Type: application/json",
                                           f"Content-Length: {limit}"],
                             [b'{"rollouts": []' + b" " * padding + b"}"])
    assert (status, body) == (200, {"rewards": []})


def test_the_default_body_limit_is_8_mib(serve):
    server = serve("env", countdown_env)
    status, body = _raw_post(server.port, ["Content-Type: application/json",
                                           f"Content-Length: {9 * 2**20}"], [b" " * (9 * 2**20)])
    assert status == 413 and body["max_body_bytes"] == 8 * 2**20


# =========================================================================== environments


def test_multiturn_rollouts_with_a_remote_env_equal_the_local_ones(serve, model, tokenizer):
    server = serve("env", countdown_env)
    remote = remote_env_fn(server.url, timeout=10.0)
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    local = create_batch_multiturn_rollouts(model, tokenizer, ["a", "b", "c"], config,
                                            env_fn=countdown_env, max_turns=4)
    assert [r.metadata["turns"] for r in local] == [1, 4, 2]
    assert [r.metadata["finish_reason"] for r in local] == ["env_done", "max_turns", "env_done"]
    remote_rollouts = create_batch_multiturn_rollouts(model, tokenizer, ["a", "b", "c"], config,
                                                      env_fn=remote, max_turns=4)
    assert remote_rollouts == local  # ids, masks, log-probs, conversations: all equal
    single = create_multiturn_rollout(model, tokenizer, "b", config, env_fn=remote, max_turns=4)
    assert single.completion_ids == local[1].completion_ids

    # One request per turn for all the conversations awaiting an answer (remote_env_fn's
    # .batched), not one per conversation: the server sees 3, 2, 1, 1 conversations.
    sizes: list[int] = []

    def recorded_env(conversation):
        return countdown_env(conversation)

    def recorded_batch(conversations):
        sizes.append(len(conversations))
        return [countdown_env(c) for c in conversations]

    recorded_env.batched = recorded_batch
    recorded = serve("env", recorded_env)
    again = create_batch_multiturn_rollouts(model, tokenizer, ["a", "b", "c"], config,
                                            env_fn=remote_env_fn(recorded.url, timeout=10.0),
                                            max_turns=4)
    assert again == local and sizes == [3, 2, 1, 1]
    assert single.conversation == local[1].conversation

    # .batched answers many conversations in order, None / [] / messages as the local env.
    conversations = [Conversation(r.conversation.messages[:k])
                     for r in local for k in range(2, len(r.conversation.messages) + 1)]
    expected = [countdown_env(c) for c in conversations]
    expected = [None if e is None else [rp.Message(**m) if isinstance(m, dict) else m
                                        for m in e] for e in expected]
    assert remote_env_fn(server.url, batch_size=3).batched(conversations) == expected
    assert None in expected and [] in expected


def test_env_errors_name_the_conversation(serve):
    def strict_env(conversation):
        if len(conversation.messages) > 2:
            raise RuntimeError("episode too long")
        return None if conversation.messages[-1].content == "yo" else "not messages"

    server = serve("env", strict_env)
    remote = remote_env_fn(server.url, retries=2)
    short = Conversation((Message("user", "hi"), Message("assistant", "yo")))
    long = Conversation(short.messages + (Message("user", "again"),))
    with pytest.raises(RuntimeError, match=r"raised on conversation 1 of 2 \(index 1 of the "
                                           r"request with conversations 0-1 of 2\): "
                                           r"RuntimeError: episode too long"):
        remote.batched([short, long])
    assert remote(short) is None
    weird = Conversation((Message("user", "hi"), Message("assistant", "??")))
    with pytest.raises(RuntimeError, match=r"env raised on the conversation: TypeError: env_fn "
                                           r"must return a list of Message or None, got str"):
        remote(weird)


def test_an_env_with_batched_is_served_one_call_per_request(serve):
    calls: list[int] = []

    def env(conversation):
        raise AssertionError("the server must use env.batched")

    def batched(conversations):
        calls.append(len(conversations))
        return [None if len(c.messages) > 1 else [Message("user", "go")] for c in conversations]

    env.batched = batched
    server = serve("env", env)
    assert wait_for_server(server.url)["batched"] is True
    one = Conversation((Message("user", "hi"),))
    two = Conversation((Message("user", "hi"), Message("assistant", "yo")))
    assert remote_env_fn(server.url).batched([one, two, one]) == [
        [Message("user", "go")], None, [Message("user", "go")]
    ]
    assert calls == [3]
    env.batched = lambda conversations: [None]
    with pytest.raises(RuntimeError, match="returned 1 answers for 2 conversations"):
        remote_env_fn(server.url).batched([one, two])


# =========================================================================== training


@pytest.mark.slow
def test_train_with_a_remote_reward_equals_train_with_the_local_one(serve, tokenizer):
    def score(rollout):  # variance inside every group, so every iteration updates
        return float(sum(rollout.generation.token_ids) % 7) + 0.1 * len(rollout.generation.text)

    sizes: list[int] = []
    server = serve("reward", recording(score, sizes))
    config = rp.create_algorithm_config("grpo", {"kl_coef": 0.0})
    gen = GenerationConfig(max_new_tokens=6, num_samples=4, seed=3)
    runs = {}
    for name, reward_fn in [("local", score),
                            ("remote", remote_reward_fn(server.url, batch_size=3))]:
        torch.manual_seed(0)
        state = rp.create_training_state(tiny_model("qwen2", seed=0), tokenizer, config,
                                         learning_rate=1e-3)
        loader = rp.create_prompt_loader(["1+1=", "2+3=", "7*8=", "9-4="], batch_size=2,
                                         seed=0)
        log: list = []
        state = rp.train(state, loader, 2, gen, config, reward_fn, logger=log.append,
                         progress=False)
        runs[name] = ([p.detach().clone() for p in state.policy.parameters()], log)
    assert sizes == [3, 3, 2, 3, 3, 2]  # 2 iterations x 8 rollouts in requests of <= 3
    (local_params, local_log), (remote_params, remote_log) = runs["local"], runs["remote"]
    assert [s.reward_mean for s in remote_log] == [s.reward_mean for s in local_log]
    assert all(s.skipped_updates == 0 for s in local_log)
    assert all(torch.equal(a, b) for a, b in zip(local_params, remote_params, strict=True))
    initial = list(tiny_model("qwen2", seed=0).parameters())
    assert not all(torch.equal(a, b) for a, b in zip(initial, remote_params, strict=True))


# =========================================================================== command line


@pytest.mark.slow
def test_the_cli_serves_a_module_function(tmp_path, rollouts, served_module):
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:  # a file, not a pipe nobody drains
        process = subprocess.Popen(
            [sys.executable, "-m", "rlprim.remote", "reward",
             "rlprim_test_served:checksum_reward", "--app-dir",
             str(Path(served_module.__file__).parent), "--port", "0", "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp_path,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    try:
        line = process.stdout.readline()  # "" if the child exits first
        match = re.fullmatch(r"rlprim\.remote: serving reward "
                             r"rlprim_test_served\.checksum_reward at (http://127\.0\.0\.1:\d+)\n",
                             line)
        assert match, (line, stderr_path.read_text())
        url = match.group(1)
        assert wait_for_server(url, timeout=30.0)["kind"] == "reward"
        remote = remote_reward_fn(url, batch_size=4)
        assert remote.batched(rollouts) == [checksum_reward(r) for r in rollouts]
        assert served_module.checksum_reward(rollouts[0]) == checksum_reward(rollouts[0])
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop and exit status 0
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode == 0, stderr_path.read_text()


# =========================================================================== validation


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"url": "localhost:8000"}, ValueError, r"url must be an http:// or https:// URL"),
    ({"url": "ftp://host:21"}, ValueError, r"url must be an http:// or https:// URL"),
    ({"url": "http://"}, ValueError, r"with a host, .* got 'http://'"),
    ({"url": "http://h:99999"}, ValueError, r"url has an invalid port"),
    ({"url": "http://h:1/?a=1"}, ValueError, r"without a query or fragment"),
    ({"url": 8000}, TypeError, r"url must be a str .* got int 8000"),
    ({"timeout": 0}, ValueError, r"timeout must be a finite number of seconds > 0, got 0"),
    ({"timeout": -1.0}, ValueError, r"timeout must be .* > 0, got -1\.0"),
    ({"timeout": float("inf")}, ValueError, r"timeout must be .* got inf"),
    ({"timeout": "5"}, TypeError, r"timeout must be a number of seconds, got str"),
    ({"retries": -1}, ValueError, r"retries must be >= 0, got -1"),
    ({"retries": 1.5}, TypeError, r"retries must be an int, got float"),
    ({"retries": True}, TypeError, r"retries must be an int, got bool"),
    ({"batch_size": 0}, ValueError, r"batch_size must be >= 1, got 0"),
    ({"backoff": -0.5}, ValueError, r"backoff must be a finite number of seconds >= 0"),
])
@pytest.mark.parametrize("factory", [remote_reward_fn, remote_env_fn])
def test_client_arguments_are_validated(factory, kwargs, error, pattern):
    arguments = {"url": "http://127.0.0.1:8000", **kwargs}
    with pytest.raises(error, match=pattern):
        factory(**arguments)


def test_client_inputs_are_validated_before_any_request():
    sock = refused_port()  # nothing would answer: the errors must come first
    try:
        remote = remote_reward_fn(f"http://127.0.0.1:{sock.getsockname()[1]}", retries=0)
        with pytest.raises(TypeError, match=r"rollouts must be a list or tuple of Rollout, "
                                            r"got Rollout"):
            remote.batched(make_rollout("a"))
        with pytest.raises(TypeError, match=r"rollouts\[1\] must be a Rollout, got str"):
            remote.batched([make_rollout("a"), "b"])
        with pytest.raises(TypeError, match=r"rollouts\[1\] cannot be sent to the remote "
                                            r"server: .*metadata\['fn'\]"):
            remote.batched([make_rollout("a"), make_rollout("b", fn=len)])
        env = remote_env_fn(f"http://127.0.0.1:{sock.getsockname()[1]}", retries=0)
        with pytest.raises(TypeError, match=r"conversation must be a Conversation, got list"):
            env([Message("user", "hi")])
        with pytest.raises(TypeError, match=r"rollout must be a Rollout, got dict"):
            remote({"prompt": "a"})
    finally:
        sock.close()


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"fn": 42}, TypeError, r"reward_fn must be callable, got int"),
    ({"host": ""}, TypeError, r"host must be a non-empty str"),
    ({"port": -1}, ValueError, r"port must be in \[0, 65535\], got -1"),
    ({"port": 70000}, ValueError, r"port must be in \[0, 65535\], got 70000"),
    ({"max_concurrency": 0}, ValueError, r"max_concurrency must be >= 1, got 0"),
    ({"max_body_bytes": 0}, ValueError, r"max_body_bytes must be >= 1, got 0"),
    ({"max_body_bytes": 1.5}, TypeError, r"max_body_bytes must be an int, got float"),
    ({"log_level": "loud"}, ValueError, r"log_level must be one of .* got 'loud'"),
])
@pytest.mark.parametrize("entry", [serve_reward_fn, start_reward_server])
def test_server_arguments_are_validated(entry, kwargs, error, pattern):
    arguments = {"fn": len, **kwargs}
    fn = arguments.pop("fn")
    with pytest.raises(error, match=pattern):
        entry(fn, **arguments)


def test_server_specific_arguments_are_validated():
    with pytest.raises(TypeError, match=r"env_fn must be callable, got str"):
        serve_env_fn("env")
    with pytest.raises(TypeError, match=r"reward_fn.batched must be callable"):
        start_reward_server(_with_bad_batched())
    with pytest.raises(TypeError, match=r"in_subprocess must be a bool, got int"):
        start_reward_server(len, in_subprocess=1)
    with pytest.raises(ValueError, match=r"stop_timeout must be .* > 0, got 0"):
        start_env_server(countdown_env, stop_timeout=0)
    with pytest.raises(TypeError, match=r"in_subprocess=True .* must be importable"):
        start_reward_server(lambda rollout: 1.0, in_subprocess=True)
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:"
                                          rf"{busy.getsockname()[1]}"):
            start_reward_server(len, port=busy.getsockname()[1])
    finally:
        busy.close()


def _with_bad_batched():
    def reward_fn(rollout):
        return 1.0
    reward_fn.batched = "not a function"
    return reward_fn


# =========================================================================== own deployment


def _serve_app_in_thread(app):
    """Runs a FastAPI app with uvicorn directly, as a user deploying it would; returns
    ``(url, stop)``."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


def test_the_apps_serve_under_a_plain_uvicorn(rollouts):
    url, stop = _serve_app_in_thread(create_reward_app(checksum_reward))
    try:
        assert wait_for_server(url, timeout=20.0)["kind"] == "reward"
        remote = remote_reward_fn(url, timeout=10.0, batch_size=4)
        assert remote.batched(rollouts) == [checksum_reward(r) for r in rollouts]
    finally:
        stop()
    url, stop = _serve_app_in_thread(create_env_app(countdown_env))
    try:
        assert wait_for_server(url, timeout=20.0)["kind"] == "env"
        chat = Conversation((Message("user", "b"), Message("assistant", "x")))
        local = [m if isinstance(m, Message) else Message(**m) for m in countdown_env(chat)]
        assert remote_env_fn(url, timeout=10.0)(chat) == local
    finally:
        stop()
    with pytest.raises(TypeError):
        create_reward_app("not a function")

