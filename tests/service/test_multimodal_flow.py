"""A multimodal wrapper through the service: submit -> succeeded -> download; the checkpoint
loads with its own auto class, keeps its vision tower and carries the source's files."""

from __future__ import annotations

import io
import tarfile

from stack_helpers import tiny_spec


def test_submit_multimodal_compresses_the_backbone_and_keeps_the_rest(
    shared_stack, shared_dataset, model_root, tmp_path
):
    import torch
    from tiny_multimodal import image_text_inputs
    from transformers import AutoModelForImageTextToText

    with shared_stack.client() as client:
        job = client.submit(tiny_spec(shared_dataset, model="tiny-llava"))
        job = client.wait(job.id, timeout=600)
        assert job.status == "succeeded", shared_stack.tail()
        report = client.report(job.id)
    assert report["model"]["architecture"] == "llava"
    assert report["model"]["layers_after"] == 4
    assert "text_config.num_hidden_layers" in report["model"]["config_changes"]

    with shared_stack.http() as http:
        tar_bytes = http.get(f"/v1/jobs/{job.id}/checkpoint.tar").content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        archive.extractall(tmp_path, filter="data")
    checkpoint, source = tmp_path / "checkpoint", model_root / "tiny-llava"
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (checkpoint / name).read_bytes() == (source / name).read_bytes(), name

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    original = AutoModelForImageTextToText.from_pretrained(source).state_dict()
    assert model.config.text_config.num_hidden_layers == 4
    tower = model.model.vision_tower.state_dict()
    for key, tensor in tower.items():
        assert torch.equal(tensor, original[f"model.vision_tower.{key}"]), key
    with torch.no_grad():
        assert torch.isfinite(model(**image_text_inputs("llava")).logits).all()
