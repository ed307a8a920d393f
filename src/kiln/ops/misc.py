"""The remaining ops: losses, signal processing (DFT, STFT, windows), random generators, Det, ML-domain helpers."""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from kiln import dtypes
from kiln.ops.registry import OpContext, register


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- losses -------------------------------------------------------------------------------------


def _nll(op: OpContext, log_prob: torch.Tensor, target: torch.Tensor, weight):
    """Per-element loss -log_prob[n, target[n, ...], ...] and its weight (0 where ignore_index)."""
    if log_prob.ndim < 2:
        raise op.fail(f"input must have shape [N, C, ...], got {list(log_prob.shape)}")
    classes = log_prob.shape[1]
    target = target.to(torch.int64)
    ignore_index = op.attr("ignore_index")
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    safe = torch.where(valid, target, torch.zeros_like(target))
    if bool(((safe < 0) | (safe >= classes)).any()):
        raise op.fail(f"a target class is outside [0, {classes}) and is not ignore_index")
    picked = -log_prob.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, picked, torch.zeros_like(picked))
    w = None
    if weight is not None:
        w = torch.where(valid, weight.to(log_prob.dtype)[safe], torch.zeros_like(picked))
    elif ignore_index is not None:
        w = valid.to(log_prob.dtype)
    return loss, w


def _reduce_loss(op: OpContext, loss: torch.Tensor, w) -> torch.Tensor:
    reduction = _text(op.attr("reduction", "mean"))
    if w is not None:
        loss = loss * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / w.sum() if w is not None else loss.mean()
    raise op.fail(f"reduction {reduction!r} is not none, sum or mean")


@register("NegativeLogLikelihoodLoss", since=12)
def negative_log_likelihood_loss(op: OpContext, x, target, weight=None):
    """loss[n, d...] = -x[n, target[n, d...], d...] * weight[target]; mean divides by the summed weights."""
    xc = x.to(_compute_dtype(x.dtype))
    loss, w = _nll(op, xc, target, weight)
    return _reduce_loss(op, loss, w).to(x.dtype)


@register("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy_loss(op: OpContext, scores, labels, weights=None):
    """NegativeLogLikelihoodLoss of log_softmax(scores, axis=1); the optional second output is that log_softmax."""
    log_prob = torch.log_softmax(scores.to(_compute_dtype(scores.dtype)), dim=1)
    loss, w = _nll(op, log_prob, labels, weights)
    return _reduce_loss(op, loss, w).to(scores.dtype), log_prob.to(scores.dtype)


# -- signal processing --------------------------------------------------------------------------


def _as_complex(op: OpContext, x: torch.Tensor) -> torch.Tensor:
    """[..., 1] (real) or [..., 2] (real, imag) as a complex tensor without the last axis."""
    x = x.to(_compute_dtype(x.dtype))
    if x.shape[-1] == 1:
        return torch.complex(x[..., 0], torch.zeros_like(x[..., 0]))
    if x.shape[-1] == 2:
        return torch.complex(x[..., 0], x[..., 1])
    raise op.fail(f"the last axis must be 1 (real) or 2 (complex), got {x.shape[-1]}")


def _dft(op: OpContext, x, dft_length, axis: int):
    inverse = op.attr("inverse", 0)
    onesided = op.attr("onesided", 0)
    rank = x.ndim
    if not (-rank <= axis <= -2 or 0 <= axis <= rank - 2):
        raise op.fail(f"axis {axis} is out of [-{rank}, -2] U [0, {rank - 2}] for an input of rank {rank}")
    axis = axis % rank
    signal = _as_complex(op, x)
    if dft_length is not None:
        n = int(dft_length)
    elif inverse and onesided:
        n = 2 * (signal.shape[axis] - 1)
    else:
        n = signal.shape[axis]
    op.check_output((*signal.shape[:axis], max(n, 0), *signal.shape[axis + 1:]), torch.complex128
                    if signal.dtype == torch.complex128 else torch.complex64, what="its transform")
    if inverse and onesided:
        return torch.fft.irfft(signal, n=n, dim=axis).unsqueeze(-1).to(x.dtype)
    if inverse:
        y = torch.fft.ifft(signal, n=n, dim=axis)
    else:
        y = torch.fft.fft(signal, n=n, dim=axis)
        if onesided:
            y = y.narrow(axis, 0, n // 2 + 1)
    return torch.view_as_real(y.contiguous()).to(x.dtype)


@register("DFT", since=17)
def dft_17(op: OpContext, x, dft_length=None):
    """torch.fft on the complex view of [..., 1|2]; onesided forward is the RFFT half, onesided inverse an IRFFT."""
    return _dft(op, x, dft_length, op.attr("axis", 1))


@register("DFT", since=20, reads_torch_flags=True)
def dft_20(op: OpContext, x, dft_length=None, axis=None):
    """As DFT-17 with the axis an input (default -2)."""
    return _dft(op, x, dft_length, int(axis) if axis is not None else -2)


@register("STFT", since=17, reads_torch_flags=True)
def stft(op: OpContext, signal, frame_step, window=None, frame_length=None):
    """Frames by Tensor.unfold, each multiplied by the window and transformed by torch.fft.fft."""
    onesided = op.attr("onesided", 1)
    x = _as_complex(op, signal)  # [batch, length]
    length = x.shape[1]
    if frame_length is not None:
        n = int(frame_length)
        if window is not None and window.shape[0] != n:
            raise op.fail(f"window has {window.shape[0]} values but frame_length is {n}")
    else:
        n = window.shape[0] if window is not None else length
    step = int(frame_step)
    if step <= 0 or n <= 0 or n > length:
        raise op.fail(f"frame_step {step} / frame_length {n} do not fit a signal of length {length}")
    op.check_output((x.shape[0], (length - n) // step + 1, n), x.dtype, what="its transformed frames")
    frames = x.unfold(1, n, step)  # [batch, frames, n]
    if window is not None:
        frames = frames * window.to(frames.real.dtype)
    y = torch.fft.fft(frames, dim=-1)
    if onesided:
        if signal.shape[-1] == 2:
            raise op.fail("onesided output needs a real signal; set onesided=0 for complex input")
        y = y[..., : n // 2 + 1]
    return torch.view_as_real(y.contiguous()).to(signal.dtype)


def _window(op: OpContext, size, terms: list[float]) -> torch.Tensor:
    """sum_k terms[k] * cos(2*pi*k*n/N), N = size (periodic) or size - 1 (symmetric), computed in float64."""
    size = int(size)
    periodic = op.attr("periodic", 1)
    dtype = dtypes.to_torch_dtype(op.attr("output_datatype", 1))
    n = torch.arange(size, dtype=torch.float64, device=op.device)
    denom = size if periodic else size - 1
    y = torch.zeros_like(n)
    for k, coefficient in enumerate(terms):
        y = y + coefficient * torch.cos(2 * math.pi * k * n / denom) if denom else y + coefficient
    return y.to(dtype)


@register("HannWindow", since=17)
def hann_window(op: OpContext, size):
    return _window(op, size, [0.5, -0.5])


@register("HammingWindow", since=17)
def hamming_window(op: OpContext, size):
    """alpha = 25/46 (the exact Hamming coefficient ONNX uses), beta = 1 - alpha."""
    return _window(op, size, [25 / 46, -(1 - 25 / 46)])


@register("BlackmanWindow", since=17)
def blackman_window(op: OpContext, size):
    return _window(op, size, [0.42, -0.5, 0.08])


@register("MelWeightMatrix", since=17)
def mel_weight_matrix(op: OpContext, num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz):
    """Triangular mel filters over floor(dft_length/2)+1 bins, with ONNX's reference bin placement."""
    bins = int(num_mel_bins)
    length = int(dft_length)
    rate = int(sample_rate)
    low, high = float(lower_edge_hertz), float(upper_edge_hertz)
    spectrogram_bins = length // 2 + 1
    low_mel = 2595 * math.log10(1 + low / 700)
    high_mel = 2595 * math.log10(1 + high / 700)
    step = (high_mel - low_mel) / (bins + 2)
    mels = torch.arange(bins + 2, dtype=torch.float64) * step + low_mel
    hertz = 700 * torch.expm1(mels / 2595 * math.log(10))
    edges = torch.floor((length + 1) * hertz / rate).to(torch.int64).tolist()
    out = torch.zeros(spectrogram_bins, bins, dtype=torch.float64)
    for i in range(bins):
        left, center, right = edges[i], edges[i + 1], edges[i + 2]
        if center == left:
            out[center, i] = 1
        else:
            for j in range(left, center + 1):
                out[j, i] = (j - left) / (center - left)
        for j in range(center, right):
            out[j, i] = (right - j) / (right - center)
    return out.to(device=op.device, dtype=dtypes.to_torch_dtype(op.attr("output_datatype", 1)))


# -- random generators --------------------------------------------------------------------------


def _generator(op: OpContext) -> torch.Generator | None:
    """A generator seeded from the seed attribute (same values every run), or None for torch's global one."""
    seed = op.attr("seed")
    if seed is None:
        return None
    generator = torch.Generator(device=op.device)
    generator.manual_seed(struct.unpack("<I", struct.pack("<f", float(seed)))[0])
    return generator


def _float_dtype(op: OpContext, default: torch.dtype) -> torch.dtype:
    code = op.attr("dtype")
    return dtypes.to_torch_dtype(code) if code is not None else default


def _uniform(op: OpContext, shape, dtype: torch.dtype) -> torch.Tensor:
    low, high = op.attr("low", 0.0), op.attr("high", 1.0)
    u = torch.rand(shape, generator=_generator(op), device=op.device, dtype=_compute_dtype(dtype))
    return (u * (high - low) + low).to(dtype)


def _normal(op: OpContext, shape, dtype: torch.dtype) -> torch.Tensor:
    mean, scale = op.attr("mean", 0.0), op.attr("scale", 1.0)
    z = torch.randn(shape, generator=_generator(op), device=op.device, dtype=_compute_dtype(dtype))
    return (z * scale + mean).to(dtype)


@register("RandomUniform", since=1, random=True)
def random_uniform(op: OpContext):
    return _uniform(op, list(op.attr("shape")), _float_dtype(op, torch.float32))


@register("RandomNormal", since=1, random=True)
def random_normal(op: OpContext):
    return _normal(op, list(op.attr("shape")), _float_dtype(op, torch.float32))


def _like_dtype(op: OpContext, x) -> torch.dtype:
    dtype = _float_dtype(op, x.dtype if isinstance(x, torch.Tensor) else torch.float32)
    if not dtype.is_floating_point:
        raise op.fail(f"output dtype {dtype} is not a float type; set the dtype attribute")
    return dtype


@register("RandomUniformLike", since=1, random=True)
def random_uniform_like(op: OpContext, x):
    return _uniform(op, list(x.shape), _like_dtype(op, x))


@register("RandomNormalLike", since=1, random=True)
def random_normal_like(op: OpContext, x):
    return _normal(op, list(x.shape), _like_dtype(op, x))


@register("Bernoulli", since=15, random=True)
def bernoulli(op: OpContext, x):
    """torch.bernoulli on the probabilities; output in the dtype attribute or the input's type."""
    dtype = _float_dtype(op, x.dtype)
    sample = torch.bernoulli(x.to(_compute_dtype(x.dtype)), generator=_generator(op))
    return sample.to(dtype)


@register("Multinomial", since=7, random=True)
def multinomial(op: OpContext, x):
    """Samples class indices from unnormalized log-probabilities [batch, classes], with replacement."""
    dtype = _float_dtype(op, torch.int32)
    if dtype not in (torch.int32, torch.int64):
        raise op.fail(f"dtype {dtype} is not int32 or int64")
    probs = torch.softmax(x.to(_compute_dtype(x.dtype)), dim=-1)
    samples = torch.multinomial(probs, op.attr("sample_size", 1), replacement=True, generator=_generator(op))
    return samples.to(dtype)


# -- linear algebra -----------------------------------------------------------------------------


@register("Det", since=11)
def det(op: OpContext, x):
    """torch.linalg.det over the last two axes (float16/bfloat16 computed in float32)."""
    return torch.linalg.det(x.to(_compute_dtype(x.dtype))).to(x.dtype)


# -- ai.onnx.ml ---------------------------------------------------------------------------------


@register("ArrayFeatureExtractor", since=1, domain="ai.onnx.ml")
def array_feature_extractor(op: OpContext, x, indices):
    """x[..., indices] with indices flattened; a 1-D x gives one row [1, k] (as onnxruntime does)."""
    index = indices.reshape(-1).to(torch.int64)
    if bool(((index < 0) | (index >= x.shape[-1])).any()):
        raise op.fail(f"an index is outside [0, {x.shape[-1]})")
    if isinstance(x, np.ndarray):  # string tensor
        y = x[..., index.tolist()]
    else:
        y = x.index_select(x.ndim - 1, index.to(x.device))
    return y.reshape(1, -1) if x.ndim == 1 else y


@register("Binarizer", since=1, domain="ai.onnx.ml")
def binarizer(op: OpContext, x):
    return (x > op.attr("threshold", 0.0)).to(x.dtype)


def _tree_members(op: OpContext, modes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[nodes, k] set members of each BRANCH_MEMBER node (NaN-padded), from NaN-delimited membership_values."""
    member_nodes = (modes == 6).nonzero().reshape(-1).tolist()
    values = op.attr("membership_values")
    sets: list[list[float]] = []
    if member_nodes:
        if values is None:
            raise op.fail("BRANCH_MEMBER nodes need membership_values")
        current: list[float] = []
        for v in values.to(torch.float64).reshape(-1).tolist():
            if math.isnan(v):
                sets.append(current)
                current = []
            else:
                current.append(v)
        if len(sets) != len(member_nodes):
            raise op.fail(f"membership_values holds {len(sets)} sets for {len(member_nodes)} BRANCH_MEMBER nodes")
    width = max([len(s) for s in sets] + [1])
    table = torch.full((modes.shape[0], width), math.nan, dtype=torch.float64)
    for node, members in zip(member_nodes, sets, strict=True):
        table[node, : len(members)] = torch.tensor(members, dtype=torch.float64)
    return table.to(device)


def _post_transform(op: OpContext, scores: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return scores
    if code == 1:
        return torch.softmax(scores, dim=1)
    if code == 2:
        return torch.sigmoid(scores)
    if code == 3:  # softmax over the non-zero scores; zeros stay zero (onnxruntime's SOFTMAX_ZERO)
        nonzero = scores != 0
        shifted = torch.where(nonzero, scores, torch.full_like(scores, -math.inf))
        top = shifted.amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)
        e = torch.where(nonzero, torch.exp(scores - top), torch.zeros_like(scores))
        total = e.sum(dim=1, keepdim=True)
        return torch.where(total > 0, e / total.clamp_min(1e-300), e)
    if code == 4:
        return math.sqrt(2) * torch.erfinv(2 * scores - 1)
    raise op.fail(f"post_transform {code} is not one of 0-4")


@register("TreeEnsemble", since=5, domain="ai.onnx.ml")
def tree_ensemble(op: OpContext, x):
    """All rows walk all trees at once: one gather per depth level over the node arrays, then a scatter per target."""
    dev = x.device
    data = x.to(torch.float64).reshape(x.shape[0], -1)
    rows = data.shape[0]

    def ints(name: str, default=None) -> torch.Tensor:
        value = op.attr(name, default)
        if value is None:
            raise op.fail(f"attribute {name} is required")
        return torch.as_tensor(value, dtype=torch.int64).reshape(-1).to(dev)

    feature = ints("nodes_featureids")
    modes = op.attr("nodes_modes").to(dev).to(torch.int64).reshape(-1)
    splits = op.attr("nodes_splits").to(dev).to(torch.float64).reshape(-1)
    true_ids, false_ids = ints("nodes_truenodeids"), ints("nodes_falsenodeids")
    true_leaf, false_leaf = ints("nodes_trueleafs").bool(), ints("nodes_falseleafs").bool()
    missing = op.attr("nodes_missing_value_tracks_true")
    missing = ints("nodes_missing_value_tracks_true").bool() if missing else torch.zeros_like(true_leaf)
    leaf_targets = ints("leaf_targetids")
    leaf_weights = op.attr("leaf_weights").to(dev).to(torch.float64).reshape(-1)
    roots = ints("tree_roots")
    members = _tree_members(op, modes, dev)
    n_targets = op.attr("n_targets")
    if n_targets is None:
        raise op.fail("attribute n_targets is required")

    trees = roots.shape[0]
    current = roots.unsqueeze(0).expand(rows, trees).clone()
    degenerate = true_leaf[roots] & false_leaf[roots] & (true_ids[roots] == false_ids[roots])
    at_leaf = degenerate.unsqueeze(0).expand(rows, trees).clone()
    current = torch.where(at_leaf, true_ids[current], current)
    for _ in range(modes.shape[0] + 1):
        active = ~at_leaf
        if not bool(active.any()):
            break
        node = torch.where(active, current, torch.zeros_like(current))
        value = data.gather(1, feature[node])
        split = splits[node]
        mode = modes[node]
        tests = torch.stack(
            [
                value <= split,
                value < split,
                value >= split,
                value > split,
                value == split,
                value != split,
                (value.unsqueeze(-1) == members[node]).any(-1),
            ]
        )
        goes_true = tests.gather(0, mode.clamp(0, 6).unsqueeze(0)).squeeze(0) | (missing[node] & value.isnan())
        nxt = torch.where(goes_true, true_ids[node], false_ids[node])
        nxt_leaf = torch.where(goes_true, true_leaf[node], false_leaf[node])
        current = torch.where(active, nxt, current)
        at_leaf = at_leaf | (active & nxt_leaf)
    else:
        raise op.fail("a tree does not reach a leaf (its node ids form a cycle)")

    weights = leaf_weights[current]  # [rows, trees]
    targets = leaf_targets[current]
    aggregate = op.attr("aggregate_function", 1)
    if aggregate in (0, 1):
        out = torch.zeros(rows, n_targets, dtype=torch.float64, device=dev).scatter_add_(1, targets, weights)
        if aggregate == 0:
            out = out / trees
    elif aggregate in (2, 3):
        limit = torch.finfo(x.dtype).max if aggregate == 2 else torch.finfo(x.dtype).min
        out = torch.full((rows, n_targets), float(limit), dtype=torch.float64, device=dev)
        out = out.scatter_reduce(1, targets, weights, reduce="amin" if aggregate == 2 else "amax")
    else:
        raise op.fail(f"aggregate_function {aggregate} is not one of 0-3")
    return _post_transform(op, out, op.attr("post_transform", 0)).to(x.dtype)
