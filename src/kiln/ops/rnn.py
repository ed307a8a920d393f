"""Recurrent layers: RNN, GRU and LSTM, as the ONNX spec defines them.

One loop over time steps per direction. The input projection X*W^T + Wb is done for all steps at once;
``sequence_lens`` is honoured with a per-batch mask (a finished row keeps its state and emits zeros),
and the reverse direction walks each row's own valid prefix backwards (a per-row time permutation).
float16/bfloat16 inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register

# name -> (function(x, alpha, beta), default alpha, default beta); alpha/beta None: not used.
_ACTIVATIONS = {
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: torch.where(x >= 0, x, a * x), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0, 1), 0.2, 0.5),
    "elu": (lambda x, a, b: torch.where(x >= 0, x, a * torch.expm1(x)), 1.0, None),
    "softsign": (lambda x, a, b: x / (1 + x.abs()), None, None),
    "softplus": (lambda x, a, b: torch.nn.functional.softplus(x), None, None),
}

_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _activations(op: OpContext, kind: str, num_dirs: int) -> list[list]:
    """Per direction, the activation callables (x -> y) with their alpha/beta bound."""
    per_dir = len(_DEFAULT_ACTIVATIONS[kind])
    names = [_text(n) for n in (op.attr("activations") or [])]
    if not names:
        names = _DEFAULT_ACTIVATIONS[kind] * num_dirs
    elif len(names) == per_dir and num_dirs == 2:
        names = names * 2
    if len(names) != per_dir * num_dirs:
        raise op.fail(f"activations lists {len(names)} functions; {kind} needs {per_dir} per direction")
    alphas = list(op.attr("activation_alpha") or [])
    betas = list(op.attr("activation_beta") or [])
    funcs = []
    for name in names:
        entry = _ACTIVATIONS.get(name.lower())
        if entry is None:
            raise op.fail(f"activation {name!r} is not one of {sorted(_ACTIVATIONS)}")
        fn, alpha, beta = entry
        if alpha is not None and alphas:
            alpha = alphas.pop(0)
        if beta is not None and betas:
            beta = betas.pop(0)
        funcs.append(lambda x, fn=fn, a=alpha, b=beta: fn(x, a, b))
    return [funcs[d * per_dir : (d + 1) * per_dir] for d in range(num_dirs)]


def _time_permutation(seq_len: int, lengths: torch.Tensor) -> torch.Tensor:
    """[seq, batch] indices reversing each row's first ``lengths[b]`` steps (the rest stay put)."""
    t = torch.arange(seq_len, device=lengths.device).unsqueeze(1)
    return torch.where(t < lengths, lengths - 1 - t, t)


def _run(op: OpContext, kind: str, x, w, r, b, sequence_lens, initial_h, initial_c=None, p=None):
    """Shared driver: layout, directions, sequence lengths; returns (Y, Y_h, Y_c) in ONNX layout."""
    layout = op.attr("layout", 0)
    direction = _text(op.attr("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise op.fail(f"direction {direction!r} is not forward, reverse or bidirectional")
    num_dirs = 2 if direction == "bidirectional" else 1
    gates = _GATES[kind]
    hidden = op.attr("hidden_size") or r.shape[-1]
    out_dtype = x.dtype
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if layout:
        x = x.transpose(0, 1)
        initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
        initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
    x = x.to(dtype)
    seq_len, batch = x.shape[0], x.shape[1]
    if sequence_lens is not None:
        lengths = sequence_lens.to(device=x.device, dtype=torch.int64).reshape(batch)
    else:
        lengths = torch.full((batch,), seq_len, dtype=torch.int64, device=x.device)
    valid = (torch.arange(seq_len, device=x.device).unsqueeze(1) < lengths).unsqueeze(-1)  # [seq, batch, 1]
    clip = op.attr("clip")
    acts = _activations(op, kind, num_dirs)
    ys, hs, cs = [], [], []
    for d in range(num_dirs):
        reverse = direction == "reverse" or d == 1
        xd = x
        if reverse:
            perm = _time_permutation(seq_len, lengths)
            xd = x.gather(0, perm.unsqueeze(-1).expand_as(x))
        wd, rd = w[d].to(dtype), r[d].to(dtype)
        bd = b[d].to(dtype) if b is not None else torch.zeros(2 * gates * hidden, dtype=dtype, device=x.device)
        wb, rb = bd[: gates * hidden], bd[gates * hidden :]
        h0 = (
            initial_h[d].to(dtype)
            if initial_h is not None
            else torch.zeros(batch, hidden, dtype=dtype, device=x.device)
        )
        c0 = (
            initial_c[d].to(dtype)
            if initial_c is not None
            else torch.zeros(batch, hidden, dtype=dtype, device=x.device)
        )
        pd = p[d].to(dtype) if p is not None else None
        xw = torch.matmul(xd, wd.transpose(0, 1)) + wb  # [seq, batch, gates*hidden]
        y, h, c = _STEPPERS[kind](op, xw, rd, rb, h0, c0, pd, valid, acts[d], clip, hidden)
        if reverse:
            y = y.gather(0, perm.unsqueeze(-1).expand_as(y))
        # A row with sequence length 0 reports zero final states (as onnxruntime does), not its initial state.
        empty = (lengths == 0).unsqueeze(-1)
        h = torch.where(empty, torch.zeros_like(h), h)
        c = torch.where(empty, torch.zeros_like(c), c) if c is not None else None
        ys.append(y)
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, 1).to(out_dtype)  # [seq, dirs, batch, hidden]
    y_h = torch.stack(hs, 0).to(out_dtype)
    cells = [c for c in cs if c is not None]  # every direction has a cell state (LSTM) or none does
    y_c = torch.stack(cells, 0).to(out_dtype) if cells else None
    if layout:
        y = y.permute(2, 0, 1, 3)
        y_h = y_h.transpose(0, 1)
        y_c = y_c.transpose(0, 1) if y_c is not None else None
    return y, y_h, y_c


def _clipped(v: torch.Tensor, clip) -> torch.Tensor:
    return v.clamp(-clip, clip) if clip is not None else v


def _masked(valid_t, new, old):
    return torch.where(valid_t, new, old)


def _rnn_steps(op, xw, r, rb, h, c, p, valid, acts, clip, hidden):
    (f,) = acts
    ys = []
    for t in range(xw.shape[0]):
        new = f(_clipped(xw[t] + h @ r.T + rb, clip))
        h = _masked(valid[t], new, h)
        ys.append(torch.where(valid[t], new, torch.zeros_like(new)))
    return _stack(ys, xw, hidden), h, None


def _gru_steps(op, xw, r, rb, h, c, p, valid, acts, clip, hidden):
    f, g = acts
    before_reset = op.attr("linear_before_reset", 0)
    rz, rr, rh = r[:hidden], r[hidden : 2 * hidden], r[2 * hidden :]
    rbz, rbr, rbh = rb[:hidden], rb[hidden : 2 * hidden], rb[2 * hidden :]
    ys = []
    for t in range(xw.shape[0]):
        xz, xr, xh = xw[t].split(hidden, dim=-1)
        z = f(_clipped(xz + h @ rz.T + rbz, clip))
        rt = f(_clipped(xr + h @ rr.T + rbr, clip))
        if before_reset:
            ht = g(_clipped(xh + rt * (h @ rh.T + rbh), clip))
        else:
            ht = g(_clipped(xh + (rt * h) @ rh.T + rbh, clip))
        new = (1 - z) * ht + z * h
        h = _masked(valid[t], new, h)
        ys.append(torch.where(valid[t], new, torch.zeros_like(new)))
    return _stack(ys, xw, hidden), h, None


def _lstm_steps(op, xw, r, rb, h, c, p, valid, acts, clip, hidden):
    f, g, hf = acts
    input_forget = op.attr("input_forget", 0)
    pi, po, pf = (p[:hidden], p[hidden : 2 * hidden], p[2 * hidden :]) if p is not None else (0, 0, 0)
    ys = []
    for t in range(xw.shape[0]):
        gi, go, gf, gc = (xw[t] + h @ r.T + rb).split(hidden, dim=-1)
        i = f(_clipped(gi + pi * c, clip))
        fg = 1 - i if input_forget else f(_clipped(gf + pf * c, clip))
        ct = g(_clipped(gc, clip))
        c_new = fg * c + i * ct
        o = f(_clipped(go + po * c_new, clip))
        new = o * hf(c_new)
        h = _masked(valid[t], new, h)
        c = _masked(valid[t], c_new, c)
        ys.append(torch.where(valid[t], new, torch.zeros_like(new)))
    return _stack(ys, xw, hidden), h, c


def _stack(ys: list, xw: torch.Tensor, hidden: int) -> torch.Tensor:
    if ys:
        return torch.stack(ys, 0)
    return xw.new_zeros(0, xw.shape[1], hidden)


_STEPPERS = {"RNN": _rnn_steps, "GRU": _gru_steps, "LSTM": _lstm_steps}


@register("RNN", since=1, reads_torch_flags=True)
def rnn(op: OpContext, x, w, r, b=None, sequence_lens=None, initial_h=None):
    """Elman RNN: Ht = f(Xt*W^T + Ht-1*R^T + Wb + Rb); layout (opset 14) read as an attribute."""
    y, y_h, _ = _run(op, "RNN", x, w, r, b, sequence_lens, initial_h)
    return y, y_h


@register("GRU", since=1, reads_torch_flags=True)
def gru(op: OpContext, x, w, r, b=None, sequence_lens=None, initial_h=None):
    """GRU with gates z, r, h; linear_before_reset applies the reset gate after the R projection."""
    y, y_h, _ = _run(op, "GRU", x, w, r, b, sequence_lens, initial_h)
    return y, y_h


@register("LSTM", since=1, reads_torch_flags=True)
def lstm(op: OpContext, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    """LSTM with gates i, o, f, c, optional peepholes P (i, o, f) and coupled input/forget gates."""
    return _run(op, "LSTM", x, w, r, b, sequence_lens, initial_h, initial_c, p)
