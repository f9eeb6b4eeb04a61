"""Our handler inside Multi Model Server's own Python worker code (mms.model_loader, mms.service)."""

from __future__ import annotations

import gc
import io
import json

from mms.model_loader import MmsModelLoader
from PIL import Image

from imgcls import artifact
from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval


def request(body: bytes, content_type: str) -> dict:
    """One request as MMS's front end hands it to a worker."""
    return {"requestId": b"req-1", "headers": [{"name": b"Content-Type", "value": content_type.encode()}],
            "parameters": [{"name": "body", "value": body, "contentType": content_type}]}


def test_a_request_leaves_no_metrics_for_the_worker_to_print(tmp_path):
    model = create_model("resnet18", 3)
    card = artifact.ModelCard(arch="resnet18", class_names=["a", "b", "c"],
                              preprocess=ClassificationPresetEval(32).to_dict())
    artifact.save(tmp_path / "model", model, card)
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(buf, format="JPEG")

    service = MmsModelLoader().load("model", str(tmp_path / "model"), "serve.handler_service:handle", None, 1)
    response = service.predict([request(buf.getvalue(), "image/jpeg")])
    assert b"Prediction success" in response
    # the answer's JSON, followed in MMS's binary frame by other fields
    answer, _ = json.JSONDecoder().raw_decode(response[response.index(b'{"predictions"'):].decode("utf-8", "replace"))
    assert sorted(t["label"] for t in answer["predictions"][0]["top_k"]) == ["a", "b", "c"]
    # MMS's worker prints the store's PredictionTime line after each response when this is set
    # (model_service_worker.handle_connection); the JVM would parse it and drop it.
    assert service.context.metrics is None


def test_the_worker_start_ends_with_a_full_collection(tmp_path):
    """Loading leaves the old generation due for a pass; without one here, it came at request 72
    in every worker (142-165 ms on 2 CPUs). Young passes run hundreds of times during loading, so a
    start that did not end on a full pass of its own would end on a young one."""
    model = create_model("resnet18", 3)
    card = artifact.ModelCard(arch="resnet18", class_names=["a", "b", "c"],
                              preprocess=ClassificationPresetEval(32).to_dict())
    artifact.save(tmp_path / "model", model, card)
    passes = []

    def seen(phase, info):
        if phase == "stop":
            passes.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        MmsModelLoader().load("model", str(tmp_path / "model"), "serve.handler_service:handle", None, 1)
    finally:
        gc.callbacks.remove(seen)
    assert len(passes) > 1 and passes[-1] == 2, passes[-20:]
