"""gRPC streaming client of the `ppllava` model (`ppllava-edge ask --triton URL VIDEO "question"`).

    answer = ask_triton("127.0.0.1:8001", "clip.mp4", "What happens?", frames=8, on_text=print)
    answer.text, answer.ids, answer.stats["timing_line"]

tritonclient (the `triton` extra) is imported when a request is made. Its stream callback is called with keyword
arguments (`result=`, `error=`); the request asks for an empty final response so the end of the stream is explicit
(`triton_final_response`), and every wait is bounded by `timeout`.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._deps import require
from ..errors import InferenceError, InputError
from .protocol import INPUTS, MODEL_NAME, WIRE_TYPES


@dataclass
class TritonAnswer:
    text: str
    ids: list[int]
    stats: dict
    first_text_ms: float | None  # client side: request sent -> first non-empty text delta
    total_ms: float  # client side: request sent -> final response
    deltas: list[str] = field(default_factory=list)


def grpc_address(url: str) -> str:
    """'127.0.0.1:8001' or 'grpc://127.0.0.1:8001' -> '127.0.0.1:8001'."""
    if url.startswith("grpc://"):
        url = url[len("grpc://"):]
    if "://" in url or ":" not in url:
        raise InputError(f"--triton {url!r}: give the server's gRPC address HOST:PORT (its --grpc-port), e.g. 127.0.0.1:8001")
    return url.rstrip("/")


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def request_inputs(grpcclient, values: dict[str, object]) -> list:
    """InferInput tensors for the values given (None: not sent; the model then uses the repository's default)."""
    inputs = []
    for spec in INPUTS:
        value = values.get(spec.name)
        if value is None:
            continue
        datatype, dtype = WIRE_TYPES[spec.data_type]
        if dtype is np.object_:
            value = [_as_bytes(v) for v in value] if isinstance(value, list) else _as_bytes(value)
        arr = np.array([value], dtype=dtype).reshape(spec.dims)
        tensor = grpcclient.InferInput(spec.name, list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def ask_triton(
    url: str,
    video: str | Path | bytes | list[str | Path],
    question: str,
    frames: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    timeout: float = 600.0,
    model: str = MODEL_NAME,
) -> TritonAnswer:
    """Ask the `ppllava` model of a Triton server over one gRPC stream; `on_text` gets each text delta. `video`: a
    video (or one image) file or its bytes, or a list of image files (one question about all of them, `images`).

    Raises:
        InferenceError: the server is unreachable, answered with an error (its message is kept), or went quiet
            for `timeout` seconds.
    """
    grpcclient = require("tritonclient.grpc", "triton", "Asking a Triton server (--triton)")
    from tritonclient.utils import InferenceServerException

    address = grpc_address(url)
    values = {**_media_values(video), "question": question, "max_tokens": max_tokens, "frames": frames, "temperature": temperature, "seed": seed}
    client = grpcclient.InferenceServerClient(address)
    done = False
    try:
        try:
            live = client.is_server_live(client_timeout=min(timeout, 10.0))
        except InferenceServerException as exc:
            raise InferenceError(f"no Triton server answers at {address} ({exc.message()}).\nHint: start one with `ppllava-edge triton-serve REPO`.") from None
        if not live:
            raise InferenceError(f"the Triton server at {address} is not live")
        events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result=None, error=None: events.put((result, error)))
        start = time.perf_counter()
        client.async_stream_infer(model, request_inputs(grpcclient, values), request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        deltas: list[str] = []
        first = None
        stats = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, error = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise InferenceError(f"no answer from {address} within {timeout:.0f} s") from None
            if error is not None:
                done = True  # an error response ends the request: nothing to cancel
                raise InferenceError(f"the Triton server at {address} answered with an error: {error.message() if hasattr(error, 'message') else error}")
            text = result.as_numpy("text")
            if text is not None and text.size:
                delta = bytes(text.reshape(-1)[0]).decode("utf-8")
                if delta:
                    first = first if first is not None else (time.perf_counter() - start) * 1e3
                    deltas.append(delta)
                    if on_text is not None:
                        on_text(delta)
            raw = result.as_numpy("stats")
            if raw is not None and raw.size:
                stats = json.loads(bytes(raw.reshape(-1)[0]).decode("utf-8"))
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        total = (time.perf_counter() - start) * 1e3
        done = True
    finally:
        try:
            client.stop_stream(cancel_requests=not done)  # on an error or timeout the server stops generating
        finally:
            client.close()
    if stats is None:
        raise InferenceError(f"the stream from {address} ended without the final stats (was the request cancelled?)")
    return TritonAnswer(stats["text"], stats["ids"], stats, first, total, deltas)


def _media_values(media: str | Path | bytes | list[str | Path]) -> dict[str, object]:
    """{"video": bytes} for a video file or bytes, {"images": [bytes, ...]} for one or more image files (the model
    then takes the image path: anyres for one image, the multi-image path for several)."""
    from ..media import check_image_paths, input_kind

    if isinstance(media, bytes):
        return {"video": media}
    paths = check_image_paths(media if isinstance(media, list) else [media])
    if input_kind(paths[0]) == "image":
        return {"images": [_read(p) for p in paths]}
    return {"video": _read(paths[0])}


def _read(path: Path) -> bytes:
    from ..media import check_input_file

    check_input_file(path)
    return path.read_bytes()
