"""RMSNorm in every form transformers 5.x decoders write it → `fuser::rms_norm`."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuser.kernels.rms_norm import LIMITS
from fuser.patterns.base import Example, Pattern, Search, cast, dtype_name
from fuser.patterns.nodes import is_number, symbolic_scalar, tensor_meta
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors


def normalized(x, compute_dtype, dim, eps):
    xf = cast(x, compute_dtype)
    return xf * torch.rsqrt(xf.pow(2).mean(dim, keepdim=True) + eps)


def rms_norm_offset_weight(x, compute_dtype, dim, eps, weight, weight_dtype, offset, out_dtype):
    """Gemma: `(x * rsqrt(...)) * (1.0 + self.weight.float())`, then `.type_as(x)`."""
    return cast(normalized(x, compute_dtype, dim, eps) * (offset + cast(weight, weight_dtype)), out_dtype)


def rms_norm_weight_before_cast(x, compute_dtype, dim, eps, weight, out_dtype):
    """Olmo2: `(self.weight * hidden_states).to(input_dtype)`."""
    return cast(weight * normalized(x, compute_dtype, dim, eps), out_dtype)


def rms_norm_weight_after_cast(x, compute_dtype, dim, eps, weight, out_dtype):
    """Llama, Mistral, Qwen2/3, Mixtral, OLMoE, DeepSeek-V3: `self.weight * hidden_states.to(input_dtype)`."""
    return weight * cast(normalized(x, compute_dtype, dim, eps), out_dtype)


def rms_norm_no_weight(x, compute_dtype, dim, eps, out_dtype):
    return cast(normalized(x, compute_dtype, dim, eps), out_dtype)


WEIGHT_AFTER_CAST = "weight after cast"  # Llama's spelling: the weight multiplies x's dtype, not float32


def _normalized_dtype(m) -> torch.dtype:
    """The dtype of the normalized value before the weight multiplies it, in the original code."""
    x = m.meta("x")
    inner = m.get("compute_dtype") or x.dtype
    if m.site == WEIGHT_AFTER_CAST:
        return m.get("out_dtype") or inner
    return inner


def check(m) -> str | None:
    x, eps, dim = m.meta("x"), m.meta("eps"), m.meta("dim")
    if not isinstance(x, torch.Tensor) or x.dtype not in LIMITS.dtypes:
        return f"input is not a float16/bfloat16/float32 tensor ({getattr(x, 'dtype', x)})"
    if dim not in (-1, x.dim() - 1):
        return f"mean over dim {dim}, not over the last dim only"
    if not _number(m.bindings["eps"]):
        return f"eps is not a number or a symbolic scalar (it is {_what(m.bindings['eps'])})"
    if m.get("compute_dtype") not in (None, torch.float32):
        return f"computes in {dtype_name(m.get('compute_dtype'))}; the kernel computes in float32"
    if "weight" in m.bindings:
        weight = m.meta("weight")
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],):
            return f"the multiplier ({getattr(weight, 'shape', weight)}) is not a weight of shape [{x.shape[-1]}]"
        if weight.dtype not in LIMITS.dtypes or m.get("weight_dtype") not in (None, torch.float32):
            return f"weight dtype {dtype_name(weight.dtype)} is not supported"
        if "offset" in m.bindings and not is_number(m.bindings["offset"]):
            return f"the weight offset is not a constant number (it is {_what(m.bindings['offset'])})"
        if _normalized_dtype(m) not in (x.dtype, torch.float32):
            return f"the normalized value is cast to {dtype_name(_normalized_dtype(m))} before the weight"
    return None


def _number(eps) -> bool:
    """A literal, or a symbolic scalar (`torch.compile(dynamic=True)` passes a module's float `eps` as a graph
    input): the op takes eps at run time."""
    return is_number(eps) or symbolic_scalar(eps)


def _what(arg) -> str:
    meta = tensor_meta(arg)
    return f"a {dtype_name(meta.dtype)} tensor of shape {tuple(meta.shape)}" if meta is not None else repr(arg)


def _eps(m):
    return m["eps"] if symbolic_scalar(m.bindings["eps"]) else float(m["eps"])


def _weight_before_cast(m) -> bool:
    """Whether the weight multiplies in float32 (Gemma, Olmo2) or after rounding to x's dtype (Llama)."""
    return m.site != WEIGHT_AFTER_CAST or _normalized_dtype(m) != m.meta("x").dtype


def replace(m):
    return torch.ops.fuser.rms_norm(m["x"], m.get("weight"), _eps(m), float(m.get("offset", 0.0)),
                                    _weight_before_cast(m), tensor_meta(m.output).dtype)


def describe(m) -> str:
    weight = "no weight" if "weight" not in m.bindings else (
        f"weight {'in fp32' if _weight_before_cast(m) else 'after cast'}"
        + (f", offset {m['offset']:g}" if m.get("offset") else ""))
    eps = "symbolic" if symbolic_scalar(m.bindings["eps"]) else f"{m['eps']:g}"
    return f"{weight}, eps={eps}, {dtype_name(m.meta('x').dtype)}"


@st.composite
def _examples(draw, search) -> Example:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = tuple(draw(sizes(5)) for _ in range(draw(st.integers(1, 2)))) + (draw(sizes(300)),)
    kwargs = {"x": draw(tensors(shape, dtype)), "compute_dtype": torch.float32, "dim": -1,
              "eps": draw(st.sampled_from([1e-6, 1e-5, 0.1])), "out_dtype": dtype}
    if search is not rms_norm_no_weight:
        kwargs["weight"] = draw(tensors((shape[-1],), dtype, layout="contiguous"))
    if search is rms_norm_offset_weight:
        kwargs.update(weight_dtype=torch.float32, offset=1.0)
    return Example(search, kwargs)


def _search(function, read=lambda m: None) -> Search:
    return Search(function, lambda: _examples(function), read)


SEARCHES = (_search(rms_norm_offset_weight), _search(rms_norm_weight_before_cast),
            _search(rms_norm_weight_after_cast, read=lambda m: WEIGHT_AFTER_CAST), _search(rms_norm_no_weight))
RMS_NORM = Pattern("rms_norm", SEARCHES, check, replace, describe, anchors=(torch.rsqrt,))
