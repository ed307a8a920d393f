"""The models the benchmarks measure: how each is made, its inputs, its random feeds and its ONNX export.

One home for the torch side of every benchmark script (``benchmarks.builder``, ``.passes``,
``.runtime``, ``.zoo``) and of ``tools/check_model_zoo.py``: the wrappers that give torchvision and
transformers models the inputs and outputs the ONNX file has, the factories (random weights,
nothing is downloaded; torchvision and transformers are imported only when a real model is made, so
the tiny stand-ins run without them), and the TorchScript export at opset 17 with a dynamic batch axis.

    name          model                                                  inputs                         large batch
    resnet50      torchvision resnet50(weights=None)                     images 3x224x224               256
    mobilenet_v2  torchvision mobilenet_v2(weights=None)                 images 3x224x224               256
    vit_b_16      torchvision vit_b_16(weights=None), head re-drawn      images 3x224x224               64
    bert          transformers BertModel(BertConfig()), no pooler        ids, mask, token types x 128   64
    gpt2          transformers GPT2Model(GPT2Config()), no cache         ids, mask x 128                32
    tiny_cnn      TinyResidualCNN (smoke stand-in for ResNet-50)         images 3x32x32                 4
    tiny_encoder  TinyEncoder (smoke stand-in for BERT)                  ids, mask, token types x 16    4
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEQ = 128  # the sequence length of the text models


@dataclass
class ModelSpec:
    """A model to benchmark: how to make it, its inputs (name -> shape without the batch axis and
    kind), its output names and its large batch."""

    name: str
    make: Callable[[], nn.Module]
    inputs: dict[str, tuple[tuple[int, ...], str]]  # kind: "image", "ids", "mask" or "types"
    outputs: list[str]
    large: int
    vocab: int = 30000
    # the scale of its outputs where they are far from 1: its engines are built and judged with an
    # atol of the table's rtol at that scale (``atol_for``), as kiln.precision's atol is made for
    # outputs near unit scale and is finer than fp16's (or fp32's) spacing at larger ones
    output_scale: float | None = None

    def atol_for(self, precision: str) -> float | None:
        from kiln.precision import TOLERANCES

        return None if self.output_scale is None else TOLERANCES[precision].rtol * self.output_scale


# -- wrappers ------------------------------------------------------------------------------------

class VisionModel(nn.Module):
    """A vision classifier taking its images as one input and returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images)


class TextModel(nn.Module):
    """A transformers model taking each input by keyword, so it lands on the right argument whatever
    the ONNX input order (token types only where given: GPT-2 and DistilBERT have none). Returns
    the first output (last_hidden_state) only, or with ``all_outputs`` everything the model returns."""

    def __init__(self, model: nn.Module, all_outputs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.all_outputs = all_outputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return out if self.all_outputs else out[0]


def redraw_zero_parameters(model: nn.Module) -> nn.Module:
    """torchvision zero-initializes some layers (ViT's head): an all-zero output would compare
    nothing, so every all-zero parameter is drawn from N(0, 0.02)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    return model


# -- the real models (torchvision, transformers) --------------------------------------------------

def make_resnet50() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return VisionModel(torchvision.models.resnet50(weights=None)).eval()


def make_mobilenet_v2() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return VisionModel(torchvision.models.mobilenet_v2(weights=None)).eval()


def make_vit_b_16() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return VisionModel(redraw_zero_parameters(torchvision.models.vit_b_16(weights=None))).eval()


def make_bert() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig()
    config.return_dict = False
    return TextModel(transformers.BertModel(config, add_pooling_layer=False)).eval()


def make_gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config()
    config.return_dict = False
    config.use_cache = False
    return TextModel(transformers.GPT2Model(config)).eval()


# -- the tiny stand-ins (smoke runs on a CPU) ------------------------------------------------------

class TinyResidualCNN(nn.Module):
    """Smoke stand-in for ResNet-50: a conv stem, one residual block of two convs, pooling, a linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images):
        x = self.stem(images)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.head(x.mean(dim=(2, 3)))


class TinyEncoder(nn.Module):
    """Smoke stand-in for BERT: embeddings, one masked single-head attention and an MLP, each with LayerNorm."""

    def __init__(self, vocab: int = 30522, dim: int = 64, seq: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.word = nn.Embedding(vocab, dim)
        self.types = nn.Embedding(2, dim)
        self.position = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.ln0 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, input_ids, attention_mask, token_type_ids):
        x = self.ln0(self.word(input_ids) + self.types(token_type_ids) + self.position)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.dim)
        scores = scores + (1.0 - attention_mask[:, None, :].to(scores.dtype)) * -10000.0
        x = self.ln1(x + self.proj(scores.softmax(dim=-1) @ v))
        return self.ln2(x + self.mlp(x))


def make_tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResidualCNN()
    with torch.no_grad():  # non-trivial batch norm statistics, so folding them is checked
        for bn in (model.stem[1], model.bn1, model.bn2):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def make_tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return TinyEncoder().eval()


# -- the specs -------------------------------------------------------------------------------------

def text_inputs(seq: int) -> dict[str, tuple[tuple[int, ...], str]]:
    return {"input_ids": ((seq,), "ids"), "attention_mask": ((seq,), "mask"), "token_type_ids": ((seq,), "types")}


IMAGE = {"images": ((3, 224, 224), "image")}
FULL_MODELS = {
    # random-weight logits reach ~110, where fp16's spacing is 0.06: at the table's atol 1e-2 no fp16
    # engine passes (the build would move every layer to fp32), nor fp32 at 1e-5 (its spacing: 7.6e-6)
    "resnet50": ModelSpec("resnet50", make_resnet50, IMAGE, ["logits"], 256, output_scale=110.0),
    "bert": ModelSpec("bert", make_bert, text_inputs(SEQ), ["last_hidden_state"], 64),
}
# the model zoo (benchmarks.zoo) measures three more
ZOO_MODELS = {
    "resnet50": FULL_MODELS["resnet50"],
    "mobilenet_v2": ModelSpec("mobilenet_v2", make_mobilenet_v2, IMAGE, ["logits"], 256),
    "vit_b_16": ModelSpec("vit_b_16", make_vit_b_16, IMAGE, ["logits"], 64),
    "bert": FULL_MODELS["bert"],
    "gpt2": ModelSpec("gpt2", make_gpt2, {"input_ids": ((SEQ,), "ids"), "attention_mask": ((SEQ,), "mask")},
                      ["last_hidden_state"], 32, vocab=50257),
}
SMOKE_MODELS = {
    "tiny_cnn": ModelSpec("tiny_cnn", make_tiny_cnn, {"images": ((3, 32, 32), "image")}, ["logits"], 4),
    "tiny_encoder": ModelSpec("tiny_encoder", make_tiny_encoder, text_inputs(16), ["last_hidden_state"], 4),
}


# -- inputs and export -----------------------------------------------------------------------------

def make_feeds(spec: ModelSpec, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Fresh random inputs: images standard normal; ids in [1, vocab); mask ones, with the last quarter
    of the second row zeros when batch > 1; token types 0/1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, kind) in spec.inputs.items():
        full = (batch, *shape)
        if kind == "image":
            feeds[name] = rng.standard_normal(full, dtype=np.float32)
        elif kind == "ids":
            feeds[name] = rng.integers(1, spec.vocab, size=full, dtype=np.int64)
        elif kind == "mask":
            mask = np.ones(full, dtype=np.int64)
            if batch > 1:
                mask[1, shape[0] - shape[0] // 4:] = 0
            feeds[name] = mask
        else:
            feeds[name] = rng.integers(0, 2, size=full, dtype=np.int64)
    return feeds


def to_torch(feeds: dict[str, np.ndarray], device: torch.device,
             float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Numpy feeds as tensors on ``device``; floating inputs cast to ``float_dtype`` when given."""
    out = {}
    for name, array in feeds.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        if float_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(float_dtype)
        out[name] = tensor
    return out


def export_onnx(spec: ModelSpec, module: nn.Module, path: Path) -> None:
    """TorchScript exporter, opset 17, fp32, batch axis dynamic on every input and output."""
    example = to_torch(make_feeds(spec, 2, seed=1234), torch.device("cpu"))
    names = list(spec.inputs)
    axes = {name: {0: "batch"} for name in names + spec.outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(example[n] for n in names), str(path), input_names=names,
                          output_names=spec.outputs, opset_version=17, dynamo=False, dynamic_axes=axes)
