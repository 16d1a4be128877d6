"""The `ppllava` model in Triton's Python backend: the torch-free runtime answering one request at a time per
instance, streaming text deltas (decoupled transaction policy).

Each instance is its own process (Triton's Python stub) with one `Pipeline` and so its own in-memory feature
cache; `cache_dir` adds a folder all instances (and replicas on a shared volume) read and write. The request's
video bytes go to a private temporary file for the runtime (the feature cache keys on the content, so the same
bytes sent again hit the cache) and are deleted after the answer.

With `bls_stages` (`triton-repo --kind gpu`) those stages are not run here: each call becomes a BLS request to the
stage's own model on the same server (onnxruntime or tensorrt_plan backend), the layout of TensorRT-LLM's
multimodal `tensorrt_llm_bls` model.

`triton_python_backend_utils` exists only inside Triton's stub: it is imported in `initialize`, never at module
level, so this module imports (and is tested for import hygiene) anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

from ..errors import InferenceError, InputError, PPLLaVAEdgeError
from ..memory import peak_rss_mb
from ..serve.protocol import StreamText
from .protocol import answer_stats, parse_request


OUTCOMES = ("ok", "invalid_input", "error", "cancelled")


class BlsRunner:
    """One stage as a BLS request to another model of the same server, with ONNX Runtime's `run` interface
    (outputs in the graph's order), asking for the outputs in CPU memory: the runtime works on numpy arrays."""

    def __init__(self, pb_utils, model: str, outputs: list[str]):
        self.pb, self.model, self.outputs = pb_utils, model, outputs

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=self.model,
            requested_output_names=list(self.outputs),
            inputs=[pb.Tensor(name, np.ascontiguousarray(arr)) for name, arr in feed.items()],
            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            raise InferenceError(f"the {self.model} model failed: {response.error().message()}")
        return [pb.get_output_tensor_by_name(response, name).as_numpy() for name in (output_names or self.outputs)]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from ..manifest import load_manifest
        from ..runtime.pipeline import Pipeline, PipelineOptions

        self.pb = pb_utils
        t_load = time.perf_counter()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version = Path(args["model_repository"]) / args["model_version"]
        self.instance = args["model_instance_name"]
        if args.get("model_instance_kind") == "GPU":  # this stub process sees only its instance's GPU (as device 0)
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        export = version / params["export_dir"]
        backend = params.get("backend", "ort")
        manifest = load_manifest(export)
        stages = [s for s in params.get("bls_stages", "").split(",") if s]
        runners = {
            s: BlsRunner(pb_utils, s, [o["name"] for o in manifest.graph(manifest.graph_for(s, backend))["outputs"]]) for s in stages
        }
        options = PipelineOptions(
            provider=params.get("provider", "cpu"),
            threads=int(params.get("threads", "0")) or None,
            cache_dir=params.get("cache_dir") or None,
            cache_bytes=int(params.get("cache_mb", "2048")) << 20,
            backend=backend,
            engines=version / params["engines"] if params.get("engines") else None,
        )
        self.pipe = Pipeline.from_export(export, options, runners=runners)
        self.load_ms = (time.perf_counter() - t_load) * 1e3
        self.frames = int(params.get("frames", "8"))
        self.max_tokens = int(params.get("max_tokens", "32"))
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ppllava-triton-{os.getpid()}-"))
        # our temporary copies of request videos and images, as messages and (cached) warnings name them
        self._tmp_name = re.compile(re.escape(str(self.tmp)) + r"/(?:video|image)-[0-9a-f]{32}\.(?:mp4|png)|(?:video|image)-[0-9a-f]{32}\.(?:mp4|png)")
        # on the server's metrics endpoint next to Triton's own counters, which count a streamed request as a
        # success however its answer ended (an error response included)
        answers = pb_utils.MetricFamily(name="ppllava_answers_total", kind=pb_utils.MetricFamily.COUNTER,
                                        description="Answers of the ppllava model by outcome (ok, invalid_input, error, cancelled)")
        hits = pb_utils.MetricFamily(name="ppllava_feature_cache_hits_total", kind=pb_utils.MetricFamily.COUNTER,
                                     description="Answers whose video features came from the feature cache (no vision run)")
        self._metric_families = (answers, hits)  # a family must outlive its metrics
        self.answers = {o: answers.Metric(labels={"instance": self.instance, "outcome": o}) for o in OUTCOMES}
        self.cache_hits = hits.Metric(labels={"instance": self.instance})
        pb_utils.Logger.log_info(
            f"{self.instance}: {manifest.preset or '?'} export, provider {self.pipe.provider}, frames {self.frames}, "
            f"max_tokens {self.max_tokens}, stages via BLS: {', '.join(stages) or 'none'}"
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            self._answer(request)
        return None  # decoupled: every answer went through its response sender

    def finalize(self) -> None:
        self.pipe.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- one request -------------------------------------------------------------------------------------------
    def _input(self, request, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _string(self, name: str, text: str):
        return self.pb.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))

    def _write_media(self, opts, paths: list[Path]) -> None:
        """The request's video, or each of its images, in a private temporary file (appended to `paths` as written,
        so the caller removes what exists whatever fails); the suffix picks the runtime's path, FFmpeg and Pillow
        read the content."""
        for data, name in ([(img, f"image-{uuid.uuid4().hex}.png") for img in opts.images] or [(opts.video, f"video-{uuid.uuid4().hex}.mp4")]):
            paths.append(self.tmp / name)
            paths[-1].write_bytes(data)

    def _answer(self, request) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        paths: list[Path] = []
        outcome, cache_hit, last = "error", False, None
        try:
            opts = parse_request(lambda name: self._input(request, name), self.frames, self.max_tokens)
            self._write_media(opts, paths)
            deltas = StreamText(self.pipe.llama.decode, [])

            def on_token(token: int) -> bool:
                if sender.is_cancelled():  # the client cancelled or went away: stop generating
                    return True
                delta, _ = deltas.feed(token)
                if delta:
                    sender.send(pb.InferenceResponse(output_tensors=[self._string("text", delta)]))
                return False

            result = self.pipe.ask(paths[0] if len(paths) == 1 else paths, opts.question, num_frames=opts.frames, generation=opts.generation(), on_token=on_token)
            if result.stopped:
                outcome = "cancelled"
            else:
                result.warnings = [self._tmp_name.sub("<media input>" if opts.images else "<video input>", w) for w in result.warnings]
                stats = json.dumps(answer_stats(result, self.pipe.provider, self.instance, self.load_ms, peak_rss_mb()))
                last = pb.InferenceResponse(output_tensors=[self._string("text", deltas.finish()), self._string("stats", stats)])
                outcome, cache_hit = "ok", result.timings.cache_hit
        except PPLLaVAEdgeError as exc:
            message = str(exc)
            for k, path in enumerate(paths):  # name the input, not our temporary file
                what = f"<image input {k}, {len(opts.images[k])} bytes>" if opts.images else f"<video input, {len(opts.video)} bytes>"
                message = message.replace(str(path), what)
            message = self._tmp_name.sub("<media input>" if opts.images else "<video input>", message) if paths else message
            code = pb.TritonError.INVALID_ARG if isinstance(exc, InputError) else pb.TritonError.INTERNAL
            last = pb.InferenceResponse(error=pb.TritonError(message, code))
            outcome = "invalid_input" if isinstance(exc, InputError) else "error"
        except Exception as exc:  # a bug: keep the instance alive, log the traceback, tell the client what happened
            pb.Logger.log_error(f"{self.instance}: {traceback.format_exc()}")
            last = pb.InferenceResponse(error=pb.TritonError(f"internal error in {self.instance}: {type(exc).__name__}: {exc}"))
        finally:
            for path in paths:
                path.unlink(missing_ok=True)
        # counted before the final response goes out: a client that has its answer sees it in the metrics
        self.answers[outcome].increment(1)
        if cache_hit:
            self.cache_hits.increment(1)
        try:
            if last is None:  # cancelled: just close the stream
                sender.send(flags=final)
            else:
                sender.send(last, flags=final)
        except Exception as exc:  # noqa: BLE001 - the client went away: nobody to answer; never raise out of execute()
            pb.Logger.log_warn(f"{self.instance}: could not send the final response (client gone?): {type(exc).__name__}: {exc}")
