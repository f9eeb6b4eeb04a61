"""What Multi Model Server runs: `serve.handler_service:handle`, on sagemaker-inference.

The toolkit's Transformer keeps its contract: model_fn / input_fn / predict_fn / output_fn,
each replaceable by a user's `inference.py` in model/code (SAGEMAKER_PROGRAM). Ours are in
ImageInferenceHandler. We replace its request loop (`transform`) for three reasons: the
toolkit decodes JSON bodies as UTF-8 before our code runs (a bad byte would be a 500), it
answers errors with a Python traceback as the body, and it reads headers case-sensitively.
Here every error becomes a JSON body {"code", "type", "message"} with its HTTP status, and
only a server bug is a 500; a worker never dies of a request.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from sagemaker_inference.default_handler_service import DefaultHandlerService
from sagemaker_inference.default_inference_handler import DefaultInferenceHandler
from sagemaker_inference.transformer import Transformer

from .errors import RequestError, phrase, status_of
from .payload import choose_accept, encode, parse_body, parse_custom_attributes, top_k_from
from .predictor import Predictor
from .settings import LOAD_FAILURE_FILE_ENV, READY_FILE_ENV, Settings
from .urlfetch import fetch

logger = logging.getLogger(__name__)

CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"


class Headers:
    """Request headers by lower-case name (clients and proxies differ in capitalization)."""

    def __init__(self, raw: dict):
        self._h = {str(k).lower(): v for k, v in (raw or {}).items() if isinstance(v, str)}

    def get(self, name: str) -> str | None:
        return self._h.get(name.lower())


def _device_for(context) -> torch.device:
    gpu_id = (context.system_properties or {}).get("gpu_id") if context is not None else None
    if torch.cuda.is_available() and gpu_id is not None and int(gpu_id) >= 0:
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


@dataclass
class Prediction:
    probabilities: np.ndarray  # float32 (images, classes)
    class_names: list[str]


class ImageInferenceHandler(DefaultInferenceHandler):
    def __init__(self, settings: Settings):
        self.settings = settings
        # The model's time on the request in hand (a worker runs one at a time), for Server-Timing;
        # None where a user's predict_fn replaces ours.
        self.predict_ms: float | None = None

    def default_model_fn(self, model_dir, context=None):
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        device = _device_for(context)
        predictor = Predictor.from_model_dir(model_dir, device=device, precision=s.precision,
                                             chunk_size=s.chunk_size, max_pixels=s.max_pixels, compile=s.compile)
        logger.info("loaded %s (%d classes) on %s, %d threads, precision %s (%s), runs %s", predictor.card.arch,
                    len(predictor.class_names), device, torch.get_num_threads(), predictor.precision,
                    predictor.precision_reason, predictor.runner.mode)
        return predictor

    def default_model_warmup_fn(self, model_dir, model):
        if isinstance(model, Predictor):
            model.warm_up()

    def default_input_fn(self, input_data, content_type, context=None):
        return parse_body(input_data, content_type, self.settings, lambda url: fetch(url, self.settings.url))

    def default_predict_fn(self, data, model, context=None):
        started = time.perf_counter()
        probabilities = model.predict(data)
        self.predict_ms = (time.perf_counter() - started) * 1000
        return Prediction(probabilities, model.class_names)

    def default_output_fn(self, prediction, accept, context=None):
        headers = Headers(context.get_all_request_header(0) if context is not None else {})
        top_k = top_k_from(parse_custom_attributes(headers.get(CUSTOM_ATTRIBUTES)), self.settings.default_top_k,
                           len(prediction.class_names))
        return encode(prediction.probabilities, prediction.class_names, top_k, accept)


def server_timing(handler_ms: float, predict_ms: float | None) -> str:
    """A Server-Timing header (W3C): our handler's time on the request and, within it, the model's."""
    value = f"handler;dur={handler_ms:.3f}"
    return value if predict_ms is None else f"{value}, predict;dur={predict_ms:.3f}"


class ImageTransformer(Transformer):
    def __init__(self, settings: Settings):
        self._handler = ImageInferenceHandler(settings)
        super().__init__(default_inference_handler=self._handler)

    def transform(self, data, context):
        responses = []
        timing = self._handler.settings.server_timing
        for idx, request in enumerate(data):
            started = time.perf_counter()
            self._handler.predict_ms = None
            try:
                headers = Headers(context.get_all_request_header(idx))
                accept = choose_accept(headers.get("accept"), self._environment.default_accept)
                # Check top_k before the model runs, so a typo costs nothing (output_fn clips it).
                top_k_from(parse_custom_attributes(headers.get(CUSTOM_ATTRIBUTES)), 1, 1)
                body = request.get("body") if "body" in request else next(iter(request.values()), None)
                result = self._run_handler_function(self._transform_fn, self._model, body,
                                                    headers.get("content-type"), accept)
                response, content_type = result if isinstance(result, tuple) else (result, accept)
                context.set_response_content_type(idx, content_type)
                if timing:
                    handler_ms = (time.perf_counter() - started) * 1000
                    context.set_response_header(idx, "Server-Timing", server_timing(handler_ms, self._handler.predict_ms))
                responses.append(response)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a response, never a dead worker
                responses.append(self._error(context, idx, exc))
        return responses

    @staticmethod
    def _error(context, idx: int, exc: BaseException) -> bytes:
        status = status_of(exc)
        if status >= 500:
            logger.exception("request failed")
            message = ("The server failed on this request; it logged the details. "
                       "If it repeats, report it with the request id.")
            if status == 507:
                message = "The server ran out of memory on this request: send fewer or smaller images at once."
        else:
            message = str(getattr(exc, "message", None) or exc)
        kind = phrase(status).replace(" ", "") if isinstance(exc, RequestError) else type(exc).__name__
        context.set_response_status(code=status, phrase=phrase(status), idx=idx)
        context.set_response_content_type(idx, "application/json")
        return json.dumps({"code": status, "type": kind, "message": message}).encode()


class HandlerService(DefaultHandlerService):
    def __init__(self):
        super().__init__(transformer=ImageTransformer(Settings.from_env()))


def _report(env_name: str, line: str) -> None:
    """Tell `serve` how loading went: MMS's /ping answers 200 before (and after) a failed load."""
    path = os.environ.get(env_name)
    if path:
        # one write to an O_APPEND file: two workers reporting at once cannot interleave their lines
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def settle_heap() -> None:
    """Collect the garbage of loading before the first request, not during one.

    Python collects its oldest generation once the objects that survived into it since the last
    full collection reach a quarter of those counted then. A worker's last full collection ran
    before the model loaded, so loading it (about 350,000 objects with MMS) left it due:
    the pass came at request 72 in every worker, 142-165 ms, ten times a request (resnet18, 2 CPUs).
    Collected here, the loaded heap becomes the measure, and requests that free what they allocate
    do not bring the next pass. (gc.freeze() on top removed that pass too, but each worker's c1
    p99 then rose from 18 to 43-47 ms, outside the handler, for reasons not found.)"""
    gc.collect()


_service: HandlerService | None = None
_init_lock = threading.Lock()


def handle(data, context):
    """MMS entry point: data is None once at worker start (load the model), then a request batch."""
    global _service
    if data is None:
        with _init_lock:
            try:
                service = HandlerService()
                service.initialize(context)
            except Exception as exc:
                _report(LOAD_FAILURE_FILE_ENV, f"{type(exc).__name__}: {exc}")
                raise
            _service = service
            settle_heap()
            _report(READY_FILE_ENV, str(os.getpid()))
        return None
    responses = _service.handle(data, context)
    # After each response MMS's worker prints its PredictionTime to stdout, and the JVM parses the
    # line and drops it (its MODEL_METRICS log is off), on the cores the model needs: measured on
    # 2 cores, the time from the handler's return to the client's last byte fell from 2.0-2.9 to
    # 1.4 ms without it (resnet18, c1). MMS sets a fresh store before every request.
    context.metrics = None
    return responses
