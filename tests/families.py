"""Miniature torch versions of the model families kiln must run, built from the same layers as the
real architectures (torchvision's ResNet, MobileNetV2/V3, EfficientNet, ConvNeXt, RegNet, ViT;
transformers' BERT, DistilBERT, GPT-2) so that both torch exporters emit the same ONNX patterns:
BatchNorm, depthwise and grouped convs, ReLU6/Hardswish/SiLU/GELU, squeeze-excitation, LayerNorm
over permuted tensors, nn.MultiheadAttention, attention masks, causal masks, dynamic batch and
sequence dimensions with their shape arithmetic.

The real architectures (random weights) are exported and checked on the GPU machine by
``tools/check_model_zoo.py``; these small ones let CI exercise the same patterns without
torchvision or transformers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze, gate=nn.Sigmoid, act=nn.ReLU):
        super().__init__()
        self.fc1, self.fc2, self.act, self.gate = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1), act(), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 8, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.a, self.b = _conv_bn(8, 16, stride=2), _conv_bn(16, 16, act=None)
        self.down = _conv_bn(8, 16, 1, 2, act=None)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.b(self.a(x)) + self.down(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8, stride=2, act=nn.ReLU6)
        self.expand = _conv_bn(8, 32, 1, act=nn.ReLU6)
        self.dw = _conv_bn(32, 32, 3, groups=32, act=nn.ReLU6)
        self.project = _conv_bn(32, 8, 1, act=None)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 10))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class MobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16, stride=2, act=nn.Hardswish)
        self.dw = _conv_bn(16, 16, 5, groups=16, act=nn.Hardswish)
        self.se = SqueezeExcite(16, 8, gate=nn.Hardsigmoid)
        self.project = _conv_bn(16, 16, 1, act=None)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(x)))
        return self.head(torch.flatten(nn.AdaptiveAvgPool2d(1)(x), 1))


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16, stride=2, act=nn.SiLU)
        self.dw = _conv_bn(16, 16, 3, groups=16, act=nn.SiLU)
        self.se = SqueezeExcite(16, 4, act=nn.SiLU)
        self.project = _conv_bn(16, 16, 1, act=None)
        self.head = nn.Sequential(_conv_bn(16, 32, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.project(self.se(self.dw(x))))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute, normalize the last axis, permute back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 4, 4), LayerNorm2d(c, eps=1e-6))
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.head = nn.Sequential(nn.Flatten(1), nn.LayerNorm(c), nn.Linear(c, 10))

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = (self.gamma * self.mlp(self.norm(y))).permute(0, 3, 1, 2)
        return self.head(F.adaptive_avg_pool2d(x + y, 1))


class RegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16, stride=2)
        self.a = _conv_bn(16, 24, 1)
        self.b = _conv_bn(24, 24, 3, stride=2, groups=3)
        self.se = SqueezeExcite(24, 4)
        self.c = _conv_bn(24, 24, 1, act=None)
        self.proj = _conv_bn(16, 24, 1, stride=2, act=None)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.proj(x) + self.c(self.se(self.b(self.a(x)))))
        return self.fc(x.mean((2, 3)))


class ViT(nn.Module):
    """torchvision's ViT layout: conv patch embedding, class token, nn.MultiheadAttention encoder."""

    def __init__(self, d=32, heads=4, patch=8, image=32):
        super().__init__()
        self.proj = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.ln1, self.ln2, self.ln = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        n = x.shape[0]
        x = self.proj(x).reshape(n, self.proj.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([self.cls.expand(n, -1, -1), x], dim=1) + self.pos
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln(x)[:, 0])


class _SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split(self, x):
        n, s, _ = x.shape
        return x.view(n, s, self.heads, self.dh).transpose(1, 2)

    def forward(self, x, additive_mask):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + additive_mask
        ctx = torch.matmul(scores.softmax(-1), v).transpose(1, 2).contiguous()
        return self.o(ctx.view(x.shape[0], x.shape[1], -1))


class Bert(nn.Module):
    """BERT's embeddings (word + position + token type), extended attention mask, post-LN encoder, pooler."""

    def __init__(self, vocab=50, d=32, heads=4, max_len=16):
        super().__init__()
        self.word, self.position, self.token_type = nn.Embedding(vocab, d), nn.Embedding(max_len, d), nn.Embedding(2, d)
        self.ln_emb, self.ln1, self.ln2 = (nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12),
                                           nn.LayerNorm(d, eps=1e-12))
        self.attn = _SelfAttention(d, heads)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.pool = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        x = self.ln_emb(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        x = self.ln1(x + self.attn(x, mask))
        x = self.ln2(x + self.ff2(F.gelu(self.ff1(x))))
        return x, torch.tanh(self.pool(x[:, 0]))


class DistilBert(nn.Module):
    """DistilBERT: no token types, a boolean mask applied with masked_fill."""

    def __init__(self, vocab=50, d=32, heads=4, max_len=16):
        super().__init__()
        self.word, self.position = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.ln_emb, self.ln1, self.ln2 = (nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12),
                                           nn.LayerNorm(d, eps=1e-12))
        self.heads, self.dh = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, input_ids, attention_mask):
        n, s = input_ids.shape
        positions = torch.arange(s, dtype=torch.long, device=input_ids.device)
        x = self.ln_emb(self.word(input_ids) + self.position(positions)[None])
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.dh)
        blocked = (attention_mask == 0).view(n, 1, 1, s).expand_as(scores)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, s, -1)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class GPT2(nn.Module):
    """GPT-2: Conv1D (addmm) projections, causal mask from a tril buffer, tanh GELU, pre-LN, tied head."""

    def __init__(self, vocab=50, d=32, heads=4, max_len=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.heads, self.dh = heads, d // heads
        self.c_attn_w, self.c_attn_b = nn.Parameter(torch.randn(d, 3 * d) * 0.1), nn.Parameter(torch.zeros(3 * d))
        self.c_proj = nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        self.register_buffer("bias", causal.view(1, 1, max_len, max_len))

    def forward(self, input_ids):
        n, s = input_ids.shape
        positions = torch.arange(0, s, dtype=torch.long, device=input_ids.device).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(positions)
        h = self.ln1(x)
        qkv = torch.addmm(self.c_attn_b, h.view(-1, h.shape[-1]), self.c_attn_w).view(n, s, -1)
        q, k, v = (t.view(n, s, self.heads, self.dh).permute(0, 2, 1, 3) for t in qkv.split(qkv.shape[-1] // 3, dim=2))
        scores = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype)
        causal = self.bias[:, :, :s, :s]
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(n, s, -1)
        x = x + self.c_proj(ctx)
        x = x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))
        return self.ln_f(x) @ self.wte.weight.T


VISION = {"resnet": ResNet, "mobilenet_v2": MobileNetV2, "mobilenet_v3": MobileNetV3, "efficientnet": EfficientNet,
          "convnext": ConvNeXt, "regnet": RegNet, "vit": ViT}
TEXT = {"bert": Bert, "distilbert": DistilBert, "gpt2": GPT2}


def example_inputs(family: str, batch: int = 2, seq: int = 8, generator: torch.Generator | None = None):
    """Fresh random inputs (never zeros) with the names the exporters give the graph inputs."""
    g = generator or torch.Generator().manual_seed(0)
    if family in VISION:
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(1, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    if family == "bert":
        return {"input_ids": ids, "attention_mask": mask,
                "token_type_ids": torch.randint(0, 2, (batch, seq), generator=g)}
    if family == "distilbert":
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = {**VISION, **TEXT}[family]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding mistakes show
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def export(model: nn.Module, inputs: dict, path, exporter: str, opset: int) -> None:
    """Export with the TorchScript exporter ("torchscript") or the dynamo exporter ("dynamo"),
    batch (and sequence, for text models) dynamic. nn.MultiheadAttention runs through
    scaled_dot_product_attention, which the TorchScript exporter supports from opset 14."""
    if exporter == "torchscript" and any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        opset = max(opset, 14)
    names = list(inputs)
    args = tuple(inputs.values())
    text = "input_ids" in inputs
    if exporter == "torchscript":
        axes = {n: {0: "batch", 1: "sequence"} if text else {0: "batch"} for n in names}
        torch.onnx.export(model, args, str(path), input_names=names, opset_version=opset, dynamo=False,
                          dynamic_axes=axes)
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        seq = torch.export.Dim("sequence", min=2, max=16)
        shapes = tuple({0: batch, 1: seq} if text else {0: batch} for _ in names)
        torch.onnx.export(model, args, str(path), input_names=names, opset_version=opset, dynamo=True,
                          dynamic_shapes=shapes, verbose=False)


def export_family(folder, family: str, exporter: str):
    """The family's model exported into ``folder`` at the exporter's usual opset (TorchScript 17,
    dynamo 18), exporter warnings silenced; returns the path."""
    import warnings

    path = folder / f"{family}_{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(build(family), example_inputs(family), path, exporter, 17 if exporter == "torchscript" else 18)
    return path
