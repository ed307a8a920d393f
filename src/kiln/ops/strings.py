"""String ops (StringConcat, StringSplit, StringNormalizer, RegexFullMatch) and ai.onnx.ml LabelEncoder.

torch has no string dtype, so string tensors are numpy object arrays of ``str`` and these ops compute
on them with Python's string methods, element by element. Numeric results become torch tensors on
``op.device``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from kiln import dtypes
from kiln.ops.registry import OpContext, register


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _strings(op: OpContext, x: Any, what: str = "input") -> np.ndarray:
    """``x`` as a numpy object array of ``str`` (onnx may hand over bytes)."""
    if not isinstance(x, np.ndarray):
        raise op.fail(f"{what} must be a string tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return np.vectorize(_text, otypes=[object])(x) if x.size else x.astype(object)


def _map(fn: Any, x: np.ndarray, otype: Any = object) -> np.ndarray:
    """``fn`` applied to each element, keeping the shape (0-d and empty arrays included)."""
    out = np.empty(x.shape, dtype=otype)
    for index, value in np.ndenumerate(x):
        out[index] = fn(value)
    return out


@register("StringConcat", since=20)
def string_concat(op, x, y):
    """Elementwise ``x + y`` with numpy broadcasting on object arrays."""
    a, b = _strings(op, x, "X"), _strings(op, y, "Y")
    return np.asarray(np.add(a, b), dtype=object).reshape(np.broadcast_shapes(a.shape, b.shape))


@register("StringSplit", since=20)
def string_split(op, x):
    """Python ``str.split(delimiter or None, maxsplit)``: an empty or absent delimiter splits on runs of
    whitespace and drops leading/trailing whitespace; rows are padded with "" to the longest split."""
    x = _strings(op, x)
    delimiter = _text(op.attr("delimiter", "") or "") or None
    maxsplit = op.attr("maxsplit")
    maxsplit = -1 if maxsplit is None else maxsplit
    if maxsplit < 0 and op.attr("maxsplit") is not None:
        raise op.fail(f"maxsplit must be non-negative, got {maxsplit}")
    parts = _map(lambda s: s.split(delimiter, maxsplit), x)
    counts = _map(len, parts, np.int64)
    width = int(counts.max(initial=0))
    y = np.full((*x.shape, width), "", dtype=object)
    for index, pieces in np.ndenumerate(parts):
        y[index][: len(pieces)] = pieces
    return y, torch.as_tensor(counts, device=op.device)


# Locales whose case mapping differs from Unicode's default (dotted/dotless i, Lithuanian dot above).
_SPECIAL_CASING = ("tr", "az", "lt")


def _change_case(s: str, upper: bool) -> str:
    """Per-character case change (as C's towupper/towlower): a character whose Unicode mapping is
    longer than one character (German sharp s -> "SS") stays as it is, as in onnxruntime."""
    out = []
    for c in s:
        mapped = c.upper() if upper else c.lower()
        out.append(mapped if len(mapped) == 1 else c)
    return "".join(out)


@register("StringNormalizer", since=10)
def string_normalizer(op, x):
    """Drops elements equal to a stopword (compared lowercased unless is_case_sensitive), then changes
    case; input [C] or [1, C]; all dropped gives [""] ([[""]]). Case maps are Unicode's default ones."""
    x = _strings(op, x)
    if not (x.ndim == 1 or (x.ndim == 2 and x.shape[0] == 1)):
        raise op.fail(f"input must have shape [C] or [1, C], got {list(x.shape)}")
    action = _text(op.attr("case_change_action", "NONE"))
    if action not in ("NONE", "LOWER", "UPPER"):
        raise op.fail(f"case_change_action {action!r} is not one of NONE, LOWER, UPPER")
    locale = _text(op.attr("locale", "") or "")
    if locale.lower().replace("-", "_").split("_")[0] in _SPECIAL_CASING:
        raise op.fail(f"locale {locale!r} has special case rules kiln does not apply (it uses Unicode's default)")
    sensitive = bool(op.attr("is_case_sensitive", 0))
    stopwords = [_text(w) for w in op.attr("stopwords", []) or []]
    fold = (lambda s: s) if sensitive else (lambda s: _change_case(s, False))
    stops = {fold(w) for w in stopwords}
    kept = [s for s in x.reshape(-1).tolist() if fold(s) not in stops]
    if action != "NONE":
        kept = [_change_case(s, action == "UPPER") for s in kept]
    if not kept:
        kept = [""]
    y = np.empty(len(kept), dtype=object)
    y[:] = kept
    return y.reshape(1, -1) if x.ndim == 2 else y


# RE2's POSIX classes (ASCII), for use inside a bracket expression.
_POSIX = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z", "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
# RE2's Perl classes are ASCII-only (Python's are Unicode): spelled out, inside and outside brackets.
_PERL = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\f\\r "}


def _re2_to_python(op: OpContext, pattern: str) -> str:
    """Rewrite an RE2 pattern for Python's ``re``: ASCII \\d \\w \\s, POSIX [[:classes:]], \\Q..\\E,
    \\z, (?<name>...), and ``$`` as end of text; RE2 constructs ``re`` lacks (\\p{..}, \\C, (?U)) and
    ``re`` constructs RE2 rejects (lookaround, backreferences) fail."""
    multiline = re.search(r"\(\?[imsU]*m[imsU-]*[:)]", pattern) is not None
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise op.fail(f"pattern {pattern!r} ends with a lone backslash")
            d = pattern[i + 1]
            if d == "Q":
                end = pattern.find("\\E", i + 2)
                out.append(re.escape(pattern[i + 2 : end if end >= 0 else n]))
                i = end + 2 if end >= 0 else n
                continue
            if d in "pPC" or d in "123456789":
                raise op.fail(f"pattern {pattern!r}: \\{d} (Unicode classes, \\C, backreferences) is not supported")
            if d.lower() in _PERL:
                chars = _PERL[d.lower()]
                if in_class and d.isupper():
                    raise op.fail(f"pattern {pattern!r}: \\{d} inside a bracket expression is not supported")
                out.append(chars if in_class else f"[{'^' if d.isupper() else ''}{chars}]")
            else:
                out.append("\\Z" if d == "z" else pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                name = pattern[i + 2 : end] if end >= 0 else ""
                if name not in _POSIX:
                    raise op.fail(f"pattern {pattern!r}: POSIX class [:{name}:] is not supported")
                out.append(_POSIX[name])
                i = end + 2
                continue
            if c == "]":
                in_class = False
            out.append("\\" + c if c in "[&~|" else c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("\\]")
                i += 1
            continue
        if c == "(" and pattern.startswith("(?", i):
            rest = pattern[i + 2 :]
            if rest[:1] in ("=", "!") or rest[:2] in ("<=", "<!") or rest.startswith("P="):
                raise op.fail(f"pattern {pattern!r}: lookaround and backreferences are not RE2 syntax")
            if rest.startswith("<"):
                out.append("(?P<")
                i += 3
                continue
            letters = re.match(r"[a-zA-Z-]*", rest)
            assert letters is not None  # * matches the empty string too
            flags = letters.group(0)
            if "U" in flags:
                raise op.fail(f"pattern {pattern!r}: the ungreedy flag (?U) is not supported")
        if c == "$" and not multiline:
            out.append("\\Z")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


@register("RegexFullMatch", since=20)
def regex_full_match(op, x):
    """Python ``re.fullmatch`` on each element, with the RE2 pattern rewritten to ``re``'s dialect."""
    pattern = _text(op.attr("pattern", ""))
    try:
        regex = re.compile(_re2_to_python(op, pattern))
    except re.error as error:
        raise op.fail(f"pattern {pattern!r} does not compile: {error}") from error
    matched = _map(lambda s: regex.fullmatch(s) is not None, _strings(op, x), np.bool_)
    return torch.as_tensor(matched, device=op.device)


# -- ai.onnx.ml::LabelEncoder -------------------------------------------------------------------
def _tensor_values(value: Any) -> tuple[list[Any], Any]:
    """A tensor attribute as (Python values, numpy dtype or 'string')."""
    if isinstance(value, np.ndarray):
        return [_text(v) for v in value.reshape(-1).tolist()], "string"
    return value.reshape(-1).cpu().tolist(), dtypes.tensor_to_numpy(value).dtype


def _label_attrs(op: OpContext, prefix: str, plural: bool) -> tuple[list[Any], Any] | None:
    """The one set keys_*/values_* (or default_*) attribute as (values, kind)."""
    found = []
    for suffix, kind in (("strings", "string"), ("int64s", np.dtype(np.int64)), ("floats", np.dtype(np.float32))):
        name = f"{prefix}_{suffix}" if plural else f"{prefix}_{suffix[:-1]}"
        value = op.attr(name)
        if value is not None:
            found.append(([_text(v) for v in value] if kind == "string" else list(value), kind))
    tensor = op.attr(f"{prefix}_tensor")
    if tensor is not None:
        found.append(_tensor_values(tensor))
    if len(found) > 1 and plural:
        raise op.fail(f"more than one {prefix}_* attribute is set")
    return found[-1] if found else None


def _default(op: OpContext, kind: Any) -> Any:
    tensor = op.attr("default_tensor")
    if tensor is not None:
        values, _ = _tensor_values(tensor)
        return values[0]
    if kind == "string":
        return _text(op.attr("default_string", "_Unused"))
    if np.dtype(kind).kind == "f":
        return op.attr("default_float", -0.0)
    return op.attr("default_int64", -1)


def _encode(op: OpContext, x: Any, keys: list[Any], values: list[Any], kind: Any, default: Any) -> Any:
    """Look every element of ``x`` up in keys -> values (the last repeated key wins; NaN keys match NaN)."""
    if isinstance(x, np.ndarray):
        elements = [_text(v) for v in x.reshape(-1).tolist()]
        shape = x.shape
    else:
        elements = x.reshape(-1).cpu().tolist()
        shape = tuple(x.shape)
    table = {}
    nan_value = None
    has_nan = False
    for k, v in zip(keys, values, strict=True):
        if isinstance(k, float) and math.isnan(k):
            has_nan, nan_value = True, v
        else:
            table[k] = v
    out = []
    for e in elements:
        if isinstance(e, float) and math.isnan(e):
            out.append(nan_value if has_nan else default)
        else:
            out.append(table.get(e, default))
    if kind == "string":
        y = np.empty(len(out), dtype=object)
        y[:] = out
        return y.reshape(shape)
    return dtypes.tensor_from_numpy(np.asarray(out, dtype=kind).reshape(shape), op.device)


def _key_check(op: OpContext, x: Any, kind: Any) -> None:
    x_is_string = isinstance(x, np.ndarray)
    if x_is_string != (kind == "string"):
        raise op.fail(f"input type {'string' if x_is_string else x.dtype} does not match the keys' type")


@register("LabelEncoder", since=2, domain="ai.onnx.ml")
def label_encoder(op, x):
    """Maps each element through keys_* -> values_* (opset 4 adds *_tensor and default_tensor)."""
    keys = _label_attrs(op, "keys", True)
    values = _label_attrs(op, "values", True)
    if keys is None or values is None:
        raise op.fail("LabelEncoder needs one keys_* and one values_* attribute")
    if len(keys[0]) != len(values[0]):
        raise op.fail(f"{len(keys[0])} keys but {len(values[0])} values")
    _key_check(op, x, keys[1])
    if keys[1] != "string":
        # Compare in the input's element type (float keys are float32 attributes).
        np_type = dtypes.tensor_to_numpy(x[:0]).dtype
        keys = ([np.asarray(k, dtype=np_type).item() for k in keys[0]], keys[1])
    return _encode(op, x, keys[0], values[0], values[1], _default(op, values[1]))


@register("LabelEncoder", since=1, domain="ai.onnx.ml")
def label_encoder_1(op, x):
    """Opset 1: string -> its index in classes_strings (else default_int64), int64 -> that class."""
    classes = [_text(c) for c in op.attr("classes_strings", []) or []]
    if isinstance(x, np.ndarray):
        default = op.attr("default_int64", -1)
        # Reversed so that a repeated class maps to its first index.
        return _encode(op, x, classes[::-1], list(range(len(classes)))[::-1], np.dtype(np.int64), default)
    if x.dtype != torch.int64:
        raise op.fail(f"input must be string or int64, got {x.dtype}")
    default = _text(op.attr("default_string", "_Unused"))
    return _encode(op, x, list(range(len(classes))), classes, "string", default)


_TFIDF_MODES = ("TF", "IDF", "TFIDF")


def _tfidf_table(op: OpContext, pool: list[Any], lo: int, hi: int,
                 n_indexes: int) -> tuple[dict[tuple, int], set[tuple]]:
    """Pool n-grams of length lo..hi -> their n-gram number (numbered across all lengths; a repeated
    n-gram keeps its last number), and the set of their proper prefixes (to stop a scan early)."""
    counts = [int(c) for c in op.attr("ngram_counts", []) or []]
    if not counts or counts[0] != 0 or any(b < a for a, b in zip(counts, counts[1:])) or counts[-1] > len(pool):
        raise op.fail(f"ngram_counts {counts} must start at 0, not decrease and stay within the pool ({len(pool)})")
    table: dict[tuple, int] = {}
    prefixes: set[tuple] = set()
    ngram_id = 0
    for size, start in enumerate(counts, start=1):
        end = counts[size] if size < len(counts) else len(pool)
        for first in range(start, start + (end - start) // size * size, size):
            if lo <= size <= hi:
                if ngram_id >= n_indexes:
                    raise op.fail(f"the pool has more n-grams than the {n_indexes} ngram_indexes")
                gram = tuple(pool[first : first + size])
                table[gram] = ngram_id
                prefixes.update(gram[:k] for k in range(1, size))
            ngram_id += 1
    return table, prefixes


@register("TfIdfVectorizer", since=9)
def tfidf_vectorizer(op, x):
    """Scans each row in Python (the ids go to the CPU): for skip s in 0..max_skip_count, n-grams take
    every (s+1)-th item from each start; unigrams count once, not once per skip. As onnxruntime, each
    hit of n-gram i adds 1 (TF) or weights[i] (TFIDF) to Y[ngram_indexes[i]], or sets it to weights[i]
    (IDF), in scan order: this only matters where n-grams share an output coordinate."""
    mode = _text(op.attr("mode", ""))
    if mode not in _TFIDF_MODES:
        raise op.fail(f"mode {mode!r} is not one of {', '.join(_TFIDF_MODES)}")
    lo, hi, skips = (op.attr(n) for n in ("min_gram_length", "max_gram_length", "max_skip_count"))
    if lo is None or hi is None or skips is None:
        raise op.fail("min_gram_length, max_gram_length and max_skip_count are required")
    if not 1 <= lo <= hi or skips < 0:
        raise op.fail(f"needs 1 <= min_gram_length ({lo}) <= max_gram_length ({hi}) and max_skip_count ({skips}) >= 0")
    indexes = [int(i) for i in op.attr("ngram_indexes", []) or []]
    if not indexes or min(indexes) < 0:
        raise op.fail("ngram_indexes must be a non-empty list of non-negative output coordinates")
    size = max(indexes) + 1
    weights = [float(w) for w in op.attr("weights", []) or []]
    if weights and len(weights) != len(indexes):
        raise op.fail(f"weights has {len(weights)} values but ngram_indexes has {len(indexes)}; they must match")
    if mode == "TF" or not weights:
        weights = [1.0] * len(indexes)
    pool_ints, pool_strings = op.attr("pool_int64s"), op.attr("pool_strings")
    if (pool_ints is None) == (pool_strings is None):
        raise op.fail("exactly one of pool_int64s and pool_strings must be set")
    if pool_strings is not None:
        if not isinstance(x, np.ndarray):
            raise op.fail(f"pool_strings is set, so the input must be a string tensor, got {x.dtype}")
        pool = [_text(s) for s in pool_strings]
        items = _strings(op, x)
        shape = items.shape
        values = items.reshape(-1).tolist()
    else:
        if isinstance(x, np.ndarray) or x.dtype not in (torch.int32, torch.int64):
            got = "a string tensor" if isinstance(x, np.ndarray) else x.dtype
            raise op.fail(f"pool_int64s is set, so the input must be int32 or int64, got {got}")
        pool = [int(v) for v in pool_ints]
        shape = tuple(x.shape)
        values = x.reshape(-1).tolist()
    if len(shape) > 2:
        raise op.fail(f"input must have shape [C] or [N, C], got {list(shape)}")
    rows, width = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0] if shape else 1)
    op.check_output((rows, size), torch.float64, what="its rows (held as Python floats first)")
    table, prefixes = _tfidf_table(op, pool, lo, hi, len(indexes))
    out = [[0.0] * size for _ in range(rows)]
    for r in range(rows):
        row, y = values[r * width : (r + 1) * width], out[r]
        for skip in range(skips + 1):
            first = 2 if skip and lo == 1 else lo  # unigrams were counted at skip 0
            if first > hi:
                break
            step = skip + 1
            for start in range(width):
                gram: tuple = ()
                for n in range(1, hi + 1):
                    pos = start + (n - 1) * step
                    if pos >= width:
                        break
                    gram += (row[pos],)
                    ngram_id = table.get(gram) if n >= first else None
                    if ngram_id is not None:
                        if mode == "IDF":
                            y[indexes[ngram_id]] = weights[ngram_id]
                        else:
                            y[indexes[ngram_id]] += weights[ngram_id]
                    if gram not in prefixes:
                        break
    y = torch.tensor(out, dtype=torch.float32, device=op.device).reshape(rows, size)
    return y if len(shape) == 2 else y.reshape(size)
