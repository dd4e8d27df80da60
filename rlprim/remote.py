"""Remote rewards and environments: serve a ``reward_fn`` or an ``env_fn`` over HTTP, and call
one from the training process as if it were local.

A reward function or an environment that needs its own machine, GPU, sandbox or Python
environment (a reward model, a code runner, a simulated user) runs behind a small HTTP service;
the trainer gets back an ordinary function and changes one argument, not its code::

    # on the reward machine (or: python -m rlprim.remote reward my_rewards:score --port 8000)
    serve_reward_fn(score, host="0.0.0.0", port=8000)

    # in the trainer
    reward_fn = remote_reward_fn("http://reward-host:8000", timeout=30.0, retries=2,
                                 batch_size=64)
    state = rp.train(state, loader, 100, gen_config, config, reward_fn)

**Run models.** ``serve_reward_fn`` / ``serve_env_fn`` block (a server process; the CLI
``python -m rlprim.remote {reward,env} module:function`` calls them) and print one line
``rlprim.remote: serving <kind> <function> at <url>`` once the socket listens.
``start_reward_server`` / ``start_env_server`` start the same server in a background thread
(default) or, with ``in_subprocess=True``, in a spawned process (then the function must be
importable: a module-level function, not a lambda) and return a ``RemoteServer(url, host,
port, pid, stop)`` handle for tests, notebooks and examples. ``port=0`` picks a free port; the
handle (and the printed line) report the real one. ``create_reward_app`` / ``create_env_app``
return the FastAPI application for your own ASGI deployment. The server needs FastAPI and
uvicorn (``pip install 'rlprim[remote]'``); the client needs only the standard library
(``http.client``: one fresh connection per request, no state, safe to call from several threads;
``HTTP(S)_PROXY`` variables are not consulted).

**Wire protocol** (JSON; records encoded with ``rlprim.serialization.to_dict``, so a rollout
crosses the wire losslessly — token ids, log-probs, metadata, tensors — and ``from_dict``
rebuilds it exactly)::

    GET  /health  -> {"status": "ok", "kind": "reward" | "env", "function": "...",
                      "batched": bool, "max_concurrency": int}
    POST /reward  {"rollouts": [Rollout, ...]}           -> {"rewards": [r_0, r_1, ...]}
    POST /env     {"conversations": [Conversation, ...]} -> {"messages": [[Message...] | null]}

A scalar reward travels as a number, a vector reward as a list of numbers (NaN/±inf as
``to_dict``'s tagged floats, so a bad reward reaches ``compute_batch_rewards``'s checks
unchanged). The server scores a request with ``reward_fn.batched(rollouts)`` once when the
function carries ``.batched`` (``create_batched_reward_fn``), else ``reward_fn`` per rollout;
likewise ``env_fn.batched(conversations)``. Multi-turn rollouts send one ``/env`` request per
turn for all the conversations awaiting an answer (``remote_env_fn`` has ``.batched``). An
environment step is stateless on the server: the conversation carries the whole episode, so any
replica can answer any step and a retried step gives the same answer. ``max_concurrency``
(default 1) bounds how many requests run the function at once (a reward model is rarely
thread-safe); further requests wait.

**Errors.** The function's own failure is an HTTP 500 whose JSON body holds ``"error"``
(``"ValueError: ..."``), ``"index"`` (the failing rollout / conversation within the request,
``null`` when ``.batched`` raised for the whole request) and ``"traceback"``. The client turns
it into ``RuntimeError`` naming the URL, the *global* index within the batch the caller passed,
the error text and the server's traceback, and does not retry it (the function would fail
again). A request the server cannot read is a 4xx, also not retried; so is a request body above the
server's ``max_body_bytes`` (default 8 MiB, checked before the body is stored), answered
``413`` with an ``"error"`` naming both sizes — send smaller batches (``batch_size``). Connection failures (refused,
reset, the server died mid-request), other 5xx answers (a proxy's 502/503/504) and timeouts are
retried ``retries`` times, sleeping ``backoff · 2^(k-1)`` seconds before retry ``k``; then the
client raises ``TimeoutError`` (the last attempt timed out), ``ConnectionError`` (it could not
connect or lost the connection) or ``RuntimeError`` (5xx), naming the URL, the indices of the
rollouts in the failed chunk, the attempts made and every attempt's error. ``timeout`` is the
deadline of one attempt — connecting, sending and receiving together: a watchdog shuts the
socket down when it passes, so no server behaviour (silence, an answer trickled one byte at a
time, a body never read) stretches it, and one call gives up after at most
``(retries + 1) · timeout + backoff · (2^retries - 1)`` seconds (plus a few milliseconds).
Retrying re-sends the same request, so the served function must be idempotent — a reward
function is pure, and a stateless environment step is too. ``compute_batch_rewards`` and the
rollout functions wrap a reward function's exception in ``ValueError("reward_fn.batched raised
on the batch of N rollouts: TimeoutError: ...")`` with the original chained as ``__cause__``.
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import math
import multiprocessing
import numbers
import os
import pickle
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from rlprim.serialization import from_dict, to_dict
from rlprim.types import Conversation, Message, Rollout

__all__ = [
    "RemoteServer",
    "create_reward_app",
    "create_env_app",
    "serve_reward_fn",
    "serve_env_fn",
    "start_reward_server",
    "start_env_server",
    "remote_reward_fn",
    "remote_env_fn",
    "wait_for_server",
]

HEALTH_PATH = "/health"
REWARD_PATH = "/reward"
ENV_PATH = "/env"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_EXTRA_HINT = "pip install 'rlprim[remote]'"
_TRACEBACK_LIMIT = 4000  # characters of the server's traceback kept in an error message
_DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # a request body above this is answered 413
# An oversized body up to this many times the limit is read and dropped before the 413, so the
# client, which sends its whole body before reading the answer, gets the 413 rather than a reset.
_DRAIN_FACTOR = 16


class RemoteServer(NamedTuple):
    """A running reward or environment server, as returned by ``start_reward_server`` /
    ``start_env_server``.

    Attributes:
      url: the base URL to give ``remote_reward_fn`` / ``remote_env_fn``
        (``http://127.0.0.1:PORT``).
      host: the address the server listens on.
      port: the real port (the one picked when ``port=0`` was asked for).
      pid: the server process's id with ``in_subprocess=True``; ``None`` for a thread server
        (it lives in the caller's process).
      stop: ``stop()`` shuts the server down and waits for it (idempotent). A request still
        running gets part of ``stop_timeout`` to finish; then a thread server cancels it (the
        function's own worker thread runs on to its end) and a server process is killed.
    """

    url: str
    host: str
    port: int
    pid: int | None
    stop: Callable[[], None]


# --------------------------------------------------------------------------- argument checks


def _check_callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__} {fn!r:.80}")


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.80}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_seconds(name: str, value: object, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__} "
                        f"{value!r:.80}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {expected}, got {value!r}")
    return seconds


def _check_host(host: object) -> str:
    if not isinstance(host, str) or not host:
        raise TypeError(f"host must be a non-empty str (e.g. '127.0.0.1'), got {host!r:.80}")
    return host


def _check_log_level(log_level: object) -> str:
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {log_level!r}")
    return str(log_level)


def _check_reward_fn(reward_fn: object) -> None:
    _check_callable("reward_fn", reward_fn)
    batched = getattr(reward_fn, "batched", None)
    if batched is not None:
        _check_callable("reward_fn.batched", batched)


def _check_url(url: object) -> urllib.parse.SplitResult:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str like 'http://127.0.0.1:8000', got "
                        f"{type(url).__name__} {url!r:.80}")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"url must be an http:// or https:// URL with a host, like "
                         f"'http://127.0.0.1:8000', got {url!r}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"url must be the server's base URL without a query or fragment, "
                         f"got {url!r}")
    try:
        parsed.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as error:
        raise ValueError(f"url has an invalid port: {url!r} ({error})") from error
    return parsed


def _function_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{name}" if module else name


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- server side


def _require_server_libraries() -> tuple[Any, Any]:
    try:
        import fastapi
        import uvicorn
    except ImportError as error:
        raise ImportError(
            "serving a reward or environment function needs FastAPI and uvicorn: "
            f"{_EXTRA_HINT} (the client, remote_reward_fn / remote_env_fn, needs neither)"
        ) from error
    return fastapi, uvicorn


class _FunctionError(NamedTuple):
    """The served function failed on item ``index`` (``None``: the whole request)."""

    error: str
    index: int | None
    traceback: str


def _function_error(error: BaseException, index: int | None) -> _FunctionError:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return _FunctionError(f"{type(error).__name__}: {error}", index, text[-_TRACEBACK_LIMIT:])


def _decode_items(payload: object, key: str, record: type) -> list[Any] | str:
    """The request's records, or the reason the request is malformed (answered with 400)."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get(key), list):
        return f"the request body must be a JSON object {{{key!r}: [...]}}"
    items = []
    for index, data in enumerate(payload[key]):
        try:
            items.append(from_dict(data, record))
        except (TypeError, ValueError) as error:
            return f"{key}[{index}] is not an encoded {record.__name__}: {error}"
    return items


def _wire_reward(value: Any) -> float | list[float]:
    """A reward as JSON data: a scalar as a float, a vector as a list of floats."""
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # tensors and arrays
        value = value.tolist()
    if isinstance(value, (bool, numbers.Real)):
        return float(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        vector = []
        for component in value:
            if isinstance(component, (bool, numbers.Real)):
                vector.append(float(component))
            else:
                raise TypeError(f"a vector reward must hold numbers, got {_short(value)}")
        return vector
    raise TypeError(f"a reward must be a number or a sequence of numbers, got "
                    f"{type(value).__name__} {_short(value)}")


def _score_request(
    reward_fn: Callable[..., Any], payload: object
) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` for a POST /reward request."""
    rollouts = _decode_items(payload, "rollouts", Rollout)
    if isinstance(rollouts, str):
        return 400, {"error": rollouts, "index": None}
    batched = getattr(reward_fn, "batched", None)
    if batched is not None:
        try:
            values = list(batched(rollouts))
        except Exception as error:
            return 500, {"rlprim_error": True, **_function_error(error, None)._asdict()}
        if len(values) != len(rollouts):
            message = (f"ValueError: reward_fn.batched returned {len(values)} rewards for "
                       f"{len(rollouts)} rollouts")
            return 500, {"rlprim_error": True, "error": message, "index": None, "traceback": ""}
    else:
        values = []
        for index, rollout in enumerate(rollouts):
            try:
                values.append(reward_fn(rollout))
            except Exception as error:
                return 500, {"rlprim_error": True, **_function_error(error, index)._asdict()}
    rewards = []
    for index, value in enumerate(values):
        try:
            rewards.append(_wire_reward(value))
        except TypeError as error:
            return 500, {"rlprim_error": True, **_function_error(error, index)._asdict()}
    return 200, {"rewards": to_dict(rewards)}


def _as_messages(value: Any) -> list[Message] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"env_fn must return a list of Message or None, got "
                        f"{type(value).__name__} {_short(value)}")
    messages = []
    for message in value:
        if isinstance(message, Message):
            messages.append(message)
        elif isinstance(message, Mapping):
            messages.append(from_dict(dict(message), Message))
        else:
            raise TypeError(f"env_fn must return Message or dict items, got "
                            f"{type(message).__name__} {_short(message)}")
    return messages


def _step_request(env_fn: Callable[..., Any], payload: object) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` for a POST /env request."""
    conversations = _decode_items(payload, "conversations", Conversation)
    if isinstance(conversations, str):
        return 400, {"error": conversations, "index": None}
    batched = getattr(env_fn, "batched", None)
    if batched is not None:  # one call for the whole request, as for a batched reward
        try:
            raw = batched(conversations)
            if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
                raise TypeError(f"env_fn.batched must return a list, got {type(raw).__name__}")
            if len(raw) != len(conversations):
                raise ValueError(f"env_fn.batched returned {len(raw)} answers for "
                                 f"{len(conversations)} conversations")
        except Exception as error:
            return 500, {"rlprim_error": True, **_function_error(error, None)._asdict()}
    answers: list[Any] = []
    for index, conversation in enumerate(conversations):
        try:
            messages = _as_messages(env_fn(conversation) if batched is None else raw[index])
        except Exception as error:
            return 500, {"rlprim_error": True, **_function_error(error, index)._asdict()}
        answers.append(None if messages is None else [to_dict(m) for m in messages])
    return 200, {"messages": answers}


async def _send_too_large(send: Callable[..., Any], size: str, limit: int) -> None:
    message = (f"request body of {size} bytes exceeds this server's limit of {limit} bytes "
               f"(max_body_bytes): send smaller batches (batch_size) or start the server with "
               f"a larger max_body_bytes")
    body = json.dumps({"error": message, "max_body_bytes": limit}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _limit_request_body(app: Callable[..., Any], max_body_bytes: int) -> Callable[..., Any]:
    """ASGI middleware: reads a request's body with a bound, answers 413 above it.

    A ``Content-Length`` above the bound is refused before reading (the body is read and
    dropped, up to ``_DRAIN_FACTOR`` times the bound, so the client can read the answer); a
    chunked body is counted as it arrives. The body read is handed to ``app`` in one piece.
    """

    async def limited(scope: dict[str, Any], receive: Callable[..., Any],
                      send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not (declared.isdigit() and int(declared) <= max_body_bytes):
            if declared.isdigit() and int(declared) <= _DRAIN_FACTOR * max_body_bytes:
                more = True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    more = message.get("more_body", False)
            await _send_too_large(send, declared.decode("latin-1")[:20], max_body_bytes)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > max_body_bytes:
                await _send_too_large(send, f"more than {max_body_bytes}", max_body_bytes)
                return
            more = message.get("more_body", False)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()  # waits for the client to disconnect
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await app(scope, replay, send)

    return limited


def _create_app(
    kind: str, fn: Callable[..., Any], max_concurrency: int, batched: bool,
    max_body_bytes: int,
) -> Any:
    fastapi, _ = _require_server_libraries()
    from fastapi.responses import JSONResponse

    handle = _score_request if kind == "reward" else _step_request
    path = REWARD_PATH if kind == "reward" else ENV_PATH
    # Bounds concurrent calls of fn across the server's worker threads.
    limiter = threading.BoundedSemaphore(max_concurrency)
    info = {"status": "ok", "kind": kind, "function": _function_name(fn), "batched": batched,
            "max_concurrency": max_concurrency}
    app = fastapi.FastAPI(title=f"rlprim {kind} server: {info['function']}")
    body = fastapi.Body(...)

    def health():
        """Liveness and what this server serves."""
        return JSONResponse(dict(info))

    # A sync endpoint: FastAPI runs it in a worker thread, so a slow function never blocks
    # the event loop (the health endpoint keeps answering).
    def call(payload: dict[str, Any] = body):
        with limiter:
            status, content = handle(fn, payload)
        return JSONResponse(content, status_code=status)

    call.__name__ = kind
    call.__doc__ = f"Runs the served {kind} function on a batch (see rlprim.remote)."
    app.get(HEALTH_PATH, response_model=None)(health)
    app.post(path, response_model=None)(call)
    app.add_middleware(_limit_request_body, max_body_bytes=max_body_bytes)
    return app


def create_reward_app(reward_fn: Callable[[Rollout], Any], max_concurrency: int = 1,
                      max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES) -> Any:
    """The FastAPI application serving ``reward_fn`` (``GET /health``, ``POST /reward``).

    For your own ASGI deployment (``uvicorn module:app``, behind a proxy, several workers);
    ``serve_reward_fn`` and ``start_reward_server`` run it with uvicorn for you. The protocol
    and the error bodies are in the module docstring. A request is scored with
    ``reward_fn.batched(rollouts)`` when ``reward_fn`` carries ``.batched``, else with
    ``reward_fn(rollout)`` for each rollout in order.

    Args:
      reward_fn: ``fn(rollout) -> float | Sequence[float]``, optionally with ``.batched``.
      max_concurrency: how many requests may run ``reward_fn`` at the same time (>= 1).
      max_body_bytes: the largest request body read (default 8 MiB); a larger one is
        answered ``413`` with a JSON ``"error"`` naming both sizes, before it is stored.
    Returns:
      A ``fastapi.FastAPI`` application.
    Raises:
      TypeError: ``reward_fn`` (or its ``.batched``) is not callable.
      ValueError: ``max_concurrency < 1`` or ``max_body_bytes < 1``.
      ImportError: FastAPI is not installed (``pip install 'rlprim[remote]'``).
    """
    _check_reward_fn(reward_fn)
    max_concurrency = _check_int("max_concurrency", max_concurrency, 1)
    max_body_bytes = _check_int("max_body_bytes", max_body_bytes, 1)
    batched = getattr(reward_fn, "batched", None) is not None
    return _create_app("reward", reward_fn, max_concurrency, batched, max_body_bytes)


def create_env_app(
    env_fn: Callable[[Conversation], Sequence[Message] | None], max_concurrency: int = 1,
    max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES,
) -> Any:
    """The FastAPI application serving an environment step ``env_fn`` (``GET /health``,
    ``POST /env``).

    ``env_fn(conversation) -> Sequence[Message] | None`` is the environment's answer after a
    model turn (``None`` or no messages: the episode is over), as ``create_multiturn_rollout``
    calls it. Each conversation of a request is answered independently — by one call of
    ``env_fn.batched(conversations)`` for the whole request when ``env_fn`` carries it (a
    simulated user that batches its own model), else by ``env_fn`` per conversation; messages
    may be ``Message`` records or ``{"role", "content", ...}`` dicts.

    Args:
      env_fn: the environment step function.
      max_concurrency: how many requests may run ``env_fn`` at the same time (>= 1).
      max_body_bytes: the largest request body read (default 8 MiB; larger: ``413``).
    Returns:
      A ``fastapi.FastAPI`` application.
    Raises:
      TypeError: ``env_fn`` is not callable.
      ValueError: ``max_concurrency < 1`` or ``max_body_bytes < 1``.
      ImportError: FastAPI is not installed (``pip install 'rlprim[remote]'``).
    """
    _check_callable("env_fn", env_fn)
    batched = getattr(env_fn, "batched", None)
    if batched is not None:
        _check_callable("env_fn.batched", batched)
    max_concurrency = _check_int("max_concurrency", max_concurrency, 1)
    max_body_bytes = _check_int("max_body_bytes", max_body_bytes, 1)
    return _create_app("env", env_fn, max_concurrency, batched is not None, max_body_bytes)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``(host, port)``; port 0 lets the OS pick a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as error:
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from error


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _ServerOptions(NamedTuple):
    kind: str
    fn: Callable[..., Any]
    host: str
    port: int
    max_concurrency: int
    log_level: str
    stop_timeout: float
    max_body_bytes: int


def _check_server_options(
    kind: str, fn: object, host: object, port: object, max_concurrency: object,
    log_level: object, stop_timeout: object, max_body_bytes: object,
) -> _ServerOptions:
    if kind == "reward":
        _check_reward_fn(fn)
    else:
        _check_callable("env_fn", fn)
    return _ServerOptions(
        kind=kind, fn=fn, host=_check_host(host), port=_check_int("port", port, 0, 65535),
        max_concurrency=_check_int("max_concurrency", max_concurrency, 1),
        log_level=_check_log_level(log_level),
        stop_timeout=_check_seconds("stop_timeout", stop_timeout, allow_zero=False),
        max_body_bytes=_check_int("max_body_bytes", max_body_bytes, 1),
    )


def _uvicorn_server(options: _ServerOptions, configure_logging: bool) -> Any:
    _, uvicorn = _require_server_libraries()
    if options.kind == "reward":
        app = create_reward_app(options.fn, options.max_concurrency, options.max_body_bytes)
    else:
        app = create_env_app(options.fn, options.max_concurrency, options.max_body_bytes)
    extra: dict[str, Any] = {} if configure_logging else {"log_config": None}
    config = uvicorn.Config(
        app, log_level=options.log_level, access_log=options.log_level in ("debug", "trace"),
        timeout_graceful_shutdown=max(1, math.ceil(options.stop_timeout / 2)), lifespan="off",
        **extra,
    )
    return uvicorn.Server(config)


def _serve_blocking(options: _ServerOptions) -> None:
    server = _uvicorn_server(options, configure_logging=True)
    sock = _bind(options.host, options.port)
    port = sock.getsockname()[1]
    print(f"rlprim.remote: serving {options.kind} {_function_name(options.fn)} at "
          f"{_url(options.host, port)}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def serve_reward_fn(
    reward_fn: Callable[[Rollout], Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_concurrency: int = 1,
    log_level: str = "info",
    max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serves ``reward_fn`` over HTTP until interrupted (Ctrl-C / SIGTERM): a server process.

    Prints ``rlprim.remote: serving reward <function> at http://HOST:PORT`` once listening
    (``port=0`` picks a free port; the line names it). Requests are scored as
    ``create_reward_app`` describes; the protocol and error semantics are in the module
    docstring. For a server in the background of this process, use ``start_reward_server``.

    Args:
      reward_fn: ``fn(rollout) -> float | Sequence[float]``, optionally with ``.batched``.
      host: the address to listen on (``"0.0.0.0"`` for every interface).
      port: the TCP port, ``0`` for a free one.
      max_concurrency: how many requests may run ``reward_fn`` at once (>= 1).
      log_level: uvicorn's log level (``"warning"`` … ``"debug"``; access logs from ``debug``).
      max_body_bytes: the largest request body read (default 8 MiB); larger ones get ``413``.
    Raises:
      TypeError / ValueError: a bad argument (named). OSError: the address cannot be bound.
      ImportError: FastAPI / uvicorn missing (``pip install 'rlprim[remote]'``).
    """
    _serve_blocking(_check_server_options(
        "reward", reward_fn, host, port, max_concurrency, log_level, 5.0, max_body_bytes))


def serve_env_fn(
    env_fn: Callable[[Conversation], Sequence[Message] | None],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_concurrency: int = 1,
    log_level: str = "info",
    max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serves an environment step ``env_fn(conversation) -> Sequence[Message] | None`` over
    HTTP until interrupted: ``serve_reward_fn`` for environments (``POST /env``).

    The server keeps no episode state: each request carries the whole conversation, so
    ``env_fn`` must decide its answer from the conversation alone (that is also what makes
    retries and several replicas safe).
    """
    _serve_blocking(_check_server_options(
        "env", env_fn, host, port, max_concurrency, log_level, 5.0, max_body_bytes))


def _child_main(options: _ServerOptions, connection: Any) -> None:
    """The spawned server process: bind, report the port (or the error), serve."""
    try:
        server = _uvicorn_server(options, configure_logging=True)
        sock = _bind(options.host, options.port)
    except BaseException as error:  # reported to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {error}"))
        connection.close()
        return
    connection.send(("ready", sock.getsockname()[1]))
    connection.close()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _start_in_subprocess(options: _ServerOptions, startup_timeout: float) -> RemoteServer:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(options, sender), daemon=True,
                              name=f"rlprim-{options.kind}-server")
    try:
        process.start()
    except (pickle.PicklingError, AttributeError, TypeError) as error:  # fn is not importable
        raise TypeError(
            f"in_subprocess=True sends the {options.kind} function to a spawned process, so it "
            f"must be importable (a module-level function, not a lambda or a closure): "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        sender.close()

    def stop() -> None:
        """Terminates the server process (SIGTERM, then SIGKILL after ``stop_timeout``)."""
        if process.is_alive():
            process.terminate()
            process.join(options.stop_timeout)
        if process.is_alive():
            process.kill()
        process.join()

    try:
        if not receiver.poll(startup_timeout):
            raise TimeoutError(f"the {options.kind} server process did not start within "
                               f"{startup_timeout} s")
        status, value = receiver.recv()
    except EOFError:
        stop()
        raise RuntimeError(f"the {options.kind} server process exited before listening (exit "
                           f"code {process.exitcode})") from None
    except BaseException:
        stop()
        raise
    finally:
        receiver.close()
    if status != "ready":
        stop()
        raise RuntimeError(f"the {options.kind} server process failed to start: {value}")
    return RemoteServer(_url(options.host, value), options.host, value, process.pid, stop)


def _start_in_thread(options: _ServerOptions, startup_timeout: float) -> RemoteServer:
    server = _uvicorn_server(options, configure_logging=False)
    sock = _bind(options.host, options.port)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"rlprim-{options.kind}-server:{port}")

    def stop() -> None:
        """Asks uvicorn to exit and waits for the thread (running requests get a grace)."""
        server.should_exit = True
        if thread.ident is not None:
            thread.join(options.stop_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(options.stop_timeout)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"the {options.kind} server thread on port {port} did not stop "
                               f"within {2 * options.stop_timeout} s")

    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"the {options.kind} server thread exited before serving")
        if time.monotonic() > deadline:
            stop()
            raise TimeoutError(f"the {options.kind} server did not start within "
                               f"{startup_timeout} s")
        time.sleep(0.005)
    return RemoteServer(_url(options.host, port), options.host, port, None, stop)


def _start(
    kind: str, fn: object, host: object, port: object, in_subprocess: object,
    max_concurrency: object, log_level: object, startup_timeout: object, stop_timeout: object,
    max_body_bytes: object,
) -> RemoteServer:
    options = _check_server_options(kind, fn, host, port, max_concurrency, log_level,
                                    stop_timeout, max_body_bytes)
    if not isinstance(in_subprocess, bool):
        raise TypeError(f"in_subprocess must be a bool, got {type(in_subprocess).__name__}")
    startup_timeout = _check_seconds("startup_timeout", startup_timeout, allow_zero=False)
    _require_server_libraries()  # fail here, not in a child process
    if in_subprocess:
        return _start_in_subprocess(options, startup_timeout)
    return _start_in_thread(options, startup_timeout)


def start_reward_server(
    reward_fn: Callable[[Rollout], Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    in_subprocess: bool = False,
    max_concurrency: int = 1,
    log_level: str = "warning",
    startup_timeout: float = 60.0,
    stop_timeout: float = 5.0,
    max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES,
) -> RemoteServer:
    """Starts a reward server in the background and returns once it accepts requests.

    The server of ``serve_reward_fn`` (same protocol), run by uvicorn in a daemon thread of
    this process, or with ``in_subprocess=True`` in a spawned process (its own interpreter and
    GIL: use it for CPU-heavy rewards, or to isolate a reward that may crash; ``reward_fn`` must
    then be importable by the child — a module-level function — and the child imports its
    module afresh; as with any spawned process, a script must guard its entry point with
    ``if __name__ == "__main__":``). Stop it with ``server.stop()``; either kind of server also
    stops when this process exits.

    Args:
      reward_fn: ``fn(rollout) -> float | Sequence[float]``, optionally with ``.batched``.
      host, port: where to listen; ``port=0`` picks a free port (see ``server.port``).
      in_subprocess: run the server in a separate process instead of a thread.
      max_concurrency: how many requests may run ``reward_fn`` at once (>= 1).
      log_level: uvicorn's log level (a thread server leaves the process's logging config
        alone and only sets uvicorn's logger levels).
      startup_timeout: seconds to wait for the server to listen.
      stop_timeout: seconds ``stop()`` waits for running requests before cancelling them.
      max_body_bytes: the largest request body read (default 8 MiB); larger ones get ``413``.
    Returns:
      ``RemoteServer(url, host, port, pid, stop)``.
    Raises:
      TypeError / ValueError: a bad argument (named); TypeError also when ``in_subprocess``
        and ``reward_fn`` cannot be pickled. OSError: the address cannot be bound.
      TimeoutError / RuntimeError: the server did not come up. ImportError: FastAPI/uvicorn.
    """
    return _start("reward", reward_fn, host, port, in_subprocess, max_concurrency, log_level,
                  startup_timeout, stop_timeout, max_body_bytes)


def start_env_server(
    env_fn: Callable[[Conversation], Sequence[Message] | None],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    in_subprocess: bool = False,
    max_concurrency: int = 1,
    log_level: str = "warning",
    startup_timeout: float = 60.0,
    stop_timeout: float = 5.0,
    max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES,
) -> RemoteServer:
    """Starts an environment server (``POST /env``) in the background and returns its handle.

    ``start_reward_server`` for an environment step ``env_fn(conversation) ->
    Sequence[Message] | None`` (see ``serve_env_fn``): same arguments, same
    ``RemoteServer(url, host, port, pid, stop)`` handle, same errors. Give ``server.url`` to
    ``remote_env_fn`` to get the ``env_fn`` a multi-turn rollout calls.
    """
    return _start("env", env_fn, host, port, in_subprocess, max_concurrency, log_level,
                  startup_timeout, stop_timeout, max_body_bytes)


# --------------------------------------------------------------------------- client side


class _Endpoint(NamedTuple):
    url: str  # the full endpoint URL, for messages
    scheme: str
    host: str
    port: int | None
    path: str
    kind: str  # "reward" | "env"
    timeout: float
    retries: int
    backoff: float


def _endpoint(url: object, path: str, kind: str, timeout: object, retries: object,
              backoff: object) -> _Endpoint:
    parsed = _check_url(url)
    full_path = parsed.path.rstrip("/") + path
    return _Endpoint(
        url=urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, full_path, "", "")),
        scheme=parsed.scheme, host=parsed.hostname or "", port=parsed.port, path=full_path,
        kind=kind, timeout=_check_seconds("timeout", timeout, allow_zero=False),
        retries=_check_int("retries", retries, 0),
        backoff=_check_seconds("backoff", backoff, allow_zero=True),
    )


def _http(endpoint: _Endpoint, method: str, path: str, body: bytes | None,
          timeout: float) -> tuple[int, bytes]:
    """One HTTP exchange on a fresh connection, all of it within ``timeout`` seconds.

    The socket timeout alone bounds each read, so a server trickling one byte at a time could
    stretch a request forever; a watchdog timer shuts the socket down at the deadline instead,
    which ends any blocked connect, send or read. Raises TimeoutError naming the URL then.
    """
    connection_class = (http.client.HTTPSConnection if endpoint.scheme == "https"
                        else http.client.HTTPConnection)
    connection = connection_class(endpoint.host, endpoint.port, timeout=timeout)
    expired = threading.Event()

    def expire() -> None:
        expired.set()  # before reading .sock: a connect finishing later sees the flag
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        if expired.is_set():
            raise TimeoutError("the deadline passed while connecting")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if expired.is_set():  # a shut socket can look like a short, complete answer
            raise TimeoutError("the deadline passed while receiving")
        return response.status, data
    except (OSError, http.client.HTTPException) as error:
        if expired.is_set() or isinstance(error, TimeoutError):
            raise TimeoutError(f"{method} {endpoint.url} took longer than {timeout:g} s "
                               "(the deadline of connect + send + receive)") from error
        raise
    finally:
        watchdog.cancel()
        connection.close()


def _error_text(status: int, data: bytes) -> tuple[str, Any]:
    """A readable error from a non-200 answer, and the decoded JSON body (or None)."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        text = body.get("error") if "error" in body else body.get("detail", body)
    else:
        text = data[:500].decode("utf-8", "replace")
    return f"HTTP {status}: {text}", body


def _span(what: str, start: int, stop: int, total: int | None) -> str:
    """``rollouts 4-5 of 6`` / ``rollout 4 of 6`` / ``the rollout`` (a single call)."""
    if total is None:
        return f"the {what}"
    if stop - start == 1:
        return f"{what} {start} of {total}"
    return f"{what}s {start}-{stop - 1} of {total}"


def _post(endpoint: _Endpoint, payload: bytes, start: int, stop: int,
          total: int | None) -> Mapping[str, Any]:
    """POSTs ``payload`` with retries; returns the decoded 200 body or raises (module docs)."""
    what = "rollout" if endpoint.kind == "reward" else "conversation"
    span = _span(what, start, stop, total)
    attempts: list[str] = []
    last: type[Exception] = RuntimeError
    for attempt in range(endpoint.retries + 1):
        if attempt:
            time.sleep(endpoint.backoff * 2 ** (attempt - 1))
        try:
            status, data = _http(endpoint, "POST", endpoint.path, payload, endpoint.timeout)
        except TimeoutError:
            attempts.append(f"timed out after {endpoint.timeout:g} s")
            last = TimeoutError
            continue
        except (OSError, http.client.HTTPException) as error:  # refused, reset, died mid-request
            attempts.append(f"{type(error).__name__}: {error}")
            last = ConnectionError
            continue
        if status == 200:
            try:
                body = json.loads(data)
            except ValueError as error:
                raise RuntimeError(f"remote {endpoint.kind} at {endpoint.url} answered "
                                   f"{span} with invalid JSON: {error}") from None
            if not isinstance(body, Mapping):
                raise RuntimeError(f"remote {endpoint.kind} at {endpoint.url} answered {span} "
                                   f"with {_short(body)}, expected a JSON object")
            return body
        text, body = _error_text(status, data)
        if isinstance(body, Mapping) and body.get("rlprim_error"):  # the function raised
            index = body.get("index")
            if total is None:  # a single-item call
                where = span
            elif isinstance(index, int) and not isinstance(index, bool):
                where = (f"{what} {start + index} of {total} (index {index} of the request "
                         f"with {span})")
            else:
                where = f"the request with {span} (the batch function raised as a whole)"
            raise RuntimeError(
                f"remote {endpoint.kind}_fn at {endpoint.url} raised on {where}: "
                f"{body.get('error')} (not retried: the function's own error). Server "
                f"traceback:\n{body.get('traceback', '')}"
            )
        if status < 500:  # the server could not read the request: retrying cannot help
            raise RuntimeError(f"remote {endpoint.kind} at {endpoint.url} rejected the request "
                               f"with {span}: {text} (not retried)")
        attempts.append(text)
        last = RuntimeError
    failed = "timed out" if last is TimeoutError else "failed"
    history = "; ".join(f"attempt {k + 1}: {a}" for k, a in enumerate(attempts))
    raise last(
        f"remote {endpoint.kind} at {endpoint.url} {failed} for {span} after {len(attempts)} "
        f"attempts (retries={endpoint.retries}, timeout={endpoint.timeout:g} s, "
        f"backoff={endpoint.backoff:g} s); {history}"
    )


def _encode_request(key: str, items: Sequence[Any], offset: int, record: type) -> bytes:
    encoded = []
    for index, item in enumerate(items):
        if not isinstance(item, record):
            raise TypeError(f"{key}[{offset + index}] must be a {record.__name__}, got "
                            f"{type(item).__name__}")
        try:
            encoded.append(to_dict(item))
        except TypeError as error:
            raise TypeError(f"{key}[{offset + index}] cannot be sent to the remote server: "
                            f"{error}") from error
    return json.dumps({key: encoded}, allow_nan=False, ensure_ascii=True).encode("ascii")


def _as_sequence(name: str, items: object, record: type) -> Sequence[Any]:
    if isinstance(items, (record, str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list or tuple of {record.__name__}, got "
                        f"{type(items).__name__}")
    return items


def _decode_rewards(body: Mapping[str, Any], endpoint: _Endpoint, start: int, stop: int,
                    total: int | None) -> list[float | list[float]]:
    span = _span("rollout", start, stop, total)
    try:
        values = from_dict(body.get("rewards"))
        if not isinstance(values, list) or len(values) != stop - start:
            raise ValueError(f"expected a list of {stop - start} rewards, got {_short(values)}")
        rewards: list[float | list[float]] = []
        for value in values:
            if isinstance(value, list):
                rewards.append([_as_float(v) for v in value])
            else:
                rewards.append(_as_float(value))
    except (TypeError, ValueError) as error:
        raise RuntimeError(f"remote reward at {endpoint.url} sent a malformed answer for "
                           f"{span}: {error}") from None
    return rewards


def _as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {_short(value)}")
    return float(value)


def remote_reward_fn(
    url: str,
    timeout: float = 60.0,
    retries: int = 2,
    batch_size: int = 64,
    backoff: float = 0.5,
) -> Callable[[Rollout], Any]:
    """A local reward function that scores rollouts on a reward server (``serve_reward_fn``).

    ``reward_fn(rollout)`` sends one rollout and returns its reward: a ``float``, or a
    ``list[float]`` for a vector reward. ``reward_fn.batched(rollouts)`` — what
    ``compute_batch_rewards`` and the rollout functions call — sends the rollouts in
    ``ceil(B / batch_size)`` requests of at most ``batch_size`` rollouts, one after the other,
    and returns the ``B`` rewards in order. Nothing is contacted before the first call (the
    server may start later); ``wait_for_server(url)`` checks it is up. Retries, timeouts and
    the exceptions raised are in the module docstring: ``TimeoutError`` / ``ConnectionError``
    / ``RuntimeError``, each naming the URL, the global indices of the rollouts in the failed
    request (``rollouts 4-5 of 6``), the attempts made and their errors.

    Args:
      url: the server's base URL, ``http(s)://host:port`` (a path prefix is kept: a server
        behind ``http://host/rewards`` is called at ``http://host/rewards/reward``).
      timeout: seconds (> 0) one attempt may take, connect + send + receive together.
      retries: further attempts (>= 0) after a connection error, a 5xx answer or a timeout.
      batch_size: the most rollouts per request (>= 1).
      backoff: seconds (>= 0) slept before the first retry, doubling before each next one.
    Returns:
      ``reward_fn(rollout) -> float | list[float]`` carrying
      ``.batched(rollouts) -> list[float | list[float]]``.
    Raises:
      TypeError / ValueError: a bad argument, e.g. a URL without ``http://`` (named).
    """
    endpoint = _endpoint(url, REWARD_PATH, "reward", timeout, retries, backoff)
    batch_size = _check_int("batch_size", batch_size, 1)

    def batched(rollouts: Sequence[Rollout]) -> list[float | list[float]]:
        """Scores ``rollouts`` remotely, ``batch_size`` per request, in order."""
        rollouts = _as_sequence("rollouts", rollouts, Rollout)
        rewards: list[float | list[float]] = []
        for start in range(0, len(rollouts), batch_size):
            stop = min(start + batch_size, len(rollouts))
            payload = _encode_request("rollouts", rollouts[start:stop], start, Rollout)
            body = _post(endpoint, payload, start, stop, len(rollouts))
            rewards.extend(_decode_rewards(body, endpoint, start, stop, len(rollouts)))
        return rewards

    def reward_fn(rollout: Rollout) -> float | list[float]:
        """Scores one rollout remotely (one request); ``.batched`` scores many."""
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
        payload = _encode_request("rollouts", [rollout], 0, Rollout)
        body = _post(endpoint, payload, 0, 1, None)
        return _decode_rewards(body, endpoint, 0, 1, None)[0]

    reward_fn.batched = batched  # type: ignore[attr-defined]
    return reward_fn


def _decode_steps(body: Mapping[str, Any], endpoint: _Endpoint, start: int, stop: int,
                  total: int | None) -> list[list[Message] | None]:
    span = _span("conversation", start, stop, total)
    answers = body.get("messages")
    try:
        if not isinstance(answers, list) or len(answers) != stop - start:
            raise ValueError(f"expected a list of {stop - start} answers, got {_short(answers)}")
        steps: list[list[Message] | None] = []
        for answer in answers:
            if answer is None:
                steps.append(None)
            elif isinstance(answer, list):
                steps.append([from_dict(m, Message) for m in answer])
            else:
                raise ValueError(f"expected a list of messages or null, got {_short(answer)}")
    except (TypeError, ValueError) as error:
        raise RuntimeError(f"remote env at {endpoint.url} sent a malformed answer for {span}: "
                           f"{error}") from None
    return steps


def remote_env_fn(
    url: str,
    timeout: float = 60.0,
    retries: int = 2,
    batch_size: int = 64,
    backoff: float = 0.5,
) -> Callable[[Conversation], list[Message] | None]:
    """A local environment step that asks an environment server (``serve_env_fn``).

    ``env_fn(conversation) -> list[Message] | None`` sends the conversation (one request) and
    returns the environment's messages, ``None`` when the episode is over — exactly what
    ``create_multiturn_rollout(..., env_fn=env_fn)`` expects, so a multi-turn rollout runs
    unchanged against a remote environment. ``env_fn.batched(conversations)`` answers many
    (``batch_size`` per request, in order). Retries, timeouts and errors as for
    ``remote_reward_fn`` (the module docstring); errors name the conversations' indices.

    Args:
      url: the server's base URL, ``http(s)://host:port``.
      timeout: seconds (> 0) one attempt may take, connect + send + receive together.
      retries: further attempts (>= 0) after a connection error, a 5xx answer or a timeout.
      batch_size: the most conversations per request of ``.batched`` (>= 1).
      backoff: seconds (>= 0) before the first retry, doubling before each next one.
    Returns:
      ``env_fn(conversation) -> list[Message] | None`` carrying
      ``.batched(conversations) -> list[list[Message] | None]``.
    Raises:
      TypeError / ValueError: a bad argument (named).
    """
    endpoint = _endpoint(url, ENV_PATH, "env", timeout, retries, backoff)
    batch_size = _check_int("batch_size", batch_size, 1)

    def batched(conversations: Sequence[Conversation]) -> list[list[Message] | None]:
        """Asks the environment about each conversation, ``batch_size`` per request."""
        conversations = _as_sequence("conversations", conversations, Conversation)
        steps: list[list[Message] | None] = []
        for start in range(0, len(conversations), batch_size):
            stop = min(start + batch_size, len(conversations))
            payload = _encode_request("conversations", conversations[start:stop], start,
                                      Conversation)
            body = _post(endpoint, payload, start, stop, len(conversations))
            steps.extend(_decode_steps(body, endpoint, start, stop, len(conversations)))
        return steps

    def env_fn(conversation: Conversation) -> list[Message] | None:
        """The environment's answer to ``conversation`` (``None``: the episode is over)."""
        if not isinstance(conversation, Conversation):
            raise TypeError(f"conversation must be a Conversation, got "
                            f"{type(conversation).__name__}")
        payload = _encode_request("conversations", [conversation], 0, Conversation)
        body = _post(endpoint, payload, 0, 1, None)
        return _decode_steps(body, endpoint, 0, 1, None)[0]

    env_fn.batched = batched  # type: ignore[attr-defined]
    return env_fn


def wait_for_server(url: str, timeout: float = 60.0, interval: float = 0.05) -> dict[str, Any]:
    """Polls ``GET url/health`` until the server answers, and returns its health record.

    Use it after launching a server process yourself (``python -m rlprim.remote ...``).

    Args:
      url: the server's base URL. timeout: seconds (> 0) to keep trying.
      interval: seconds (> 0) between tries.
    Returns:
      ``{"status": "ok", "kind": "reward" | "env", "function": ..., "batched": ...,
      "max_concurrency": ...}``.
    Raises:
      TimeoutError: no healthy answer within ``timeout`` (the last error is named).
    """
    parsed = _check_url(url)
    timeout = _check_seconds("timeout", timeout, allow_zero=False)
    interval = _check_seconds("interval", interval, allow_zero=False)
    endpoint = _endpoint(url, HEALTH_PATH, "health", timeout, 0, 0.0)
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no healthy server at {endpoint.url} within {timeout:g} s; "
                               f"last error: {last}")
        try:
            status, data = _http(endpoint, "GET", parsed.path.rstrip("/") + HEALTH_PATH, None,
                                 max(0.05, min(remaining, 5.0)))
            if status == 200:
                return json.loads(data)
            last = _error_text(status, data)[0]
        except (OSError, http.client.HTTPException, ValueError) as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------- command line


def _load_function(spec: str, factory: bool) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"expected module:function (e.g. my_rewards:score), got {spec!r}")
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value() if factory else value


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlprim.remote",
        description="Serve an rlprim reward function or environment step over HTTP.",
    )
    parser.add_argument("kind", choices=("reward", "env"))
    parser.add_argument("function", help="module:function, e.g. my_rewards:score")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    parser.add_argument("--max-body-bytes", type=int, default=_DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413 (default 8 MiB)")
    parser.add_argument("--app-dir", default=None, help="prepended to sys.path (default: cwd)")
    parser.add_argument("--factory", action="store_true",
                        help="call the attribute with no arguments to build the function")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.app_dir or os.getcwd()))
    fn = _load_function(args.function, args.factory)
    serve = serve_reward_fn if args.kind == "reward" else serve_env_fn
    try:
        serve(fn, args.host, args.port, max_concurrency=args.max_concurrency,
              log_level=args.log_level, max_body_bytes=args.max_body_bytes)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully; exit quietly
        pass


if __name__ == "__main__":
    _main()
