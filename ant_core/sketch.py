"""CountSketch of parameter gradients: a fixed random linear map R^P -> R^d that is applied to
each parameter tensor in chunks, so no P x d matrix (and no P-sized hash table) ever exists.

Coordinate i of parameter tensor k goes to bucket h_k(i) in [0, d) with sign s_k(i) in {-1, +1};
``sketch(g)[j] = sum_{i: h(i) = j} s(i) g_i``. Buckets come from a 2-universal hash
``((a i + b) mod p) mod d`` and signs from the parity of a 4-wise independent one, a random
cubic ``(c3 i³ + c2 i² + c1 i + c0) mod p``, with p = 2^31 - 1 and the coefficients drawn per
tensor from the seed, evaluated on the fly from the coordinate index (int64 arithmetic, no
table). So ``<sketch(x), sketch(y)>`` is an unbiased estimate of ``<x, y>`` (up to an O(1/p) bias
of the sign hash) with variance at most ``2 |x|^2 |y|^2 / d`` — the bound needs 4-wise
independent signs: with pairwise ones (a linear hash) neighbouring coordinates get correlated
signs and smooth gradients were sketched 25-57x less accurately. Cosines of sketched gradients
are within about ``1/sqrt(d)`` of the exact ones.

With ``cache=True`` (the default) bucket and sign are hashed once and kept as one int32 code per
coordinate, ``bucket + d * (sign < 0)`` (4 bytes per parameter: the size of one fp32 gradient,
independent of M and d); a sketch is then a single ``index_add_`` into a 2d buffer per tensor,
``sketch = buffer[:d] - buffer[d:]``, about 10x faster than hashing again. ``cache=False``
hashes each chunk on the fly (no per-parameter memory at all).
"""
from __future__ import annotations

import numpy as np
import torch

from .checks import check_bool, check_float, check_int

__all__ = ["CountSketch"]

_PRIME = 2**31 - 1


class CountSketch:
    """A seeded CountSketch for a fixed list of parameter shapes.

    Args:
        numels: number of elements of each parameter tensor (in the order gradients are given).
        d: sketch dimension (>= 1).
        seed: the hash functions' seed; the same seed gives the same map.
        chunk: coordinates hashed at a time (bounds the temporary memory to a few chunk-sized
            int64 tensors).
    """

    def __init__(self, numels, d: int, seed: int = 0, chunk: int = 1 << 20, cache: bool = True):
        d = check_int("d", d, 1)
        if isinstance(numels, (str, bytes)) or not hasattr(numels, "__iter__"):
            raise TypeError(f"numels must be a sequence of element counts, got {numels!r}")
        self.numels = [check_int(f"numels[{i}]", n, 0) for i, n in enumerate(numels)]
        if any(n >= _PRIME for n in self.numels):
            raise ValueError("a parameter tensor has more than 2^31 - 2 elements")
        self.d, self.chunk = d, check_int("chunk", chunk, 1)
        self.cache = check_bool("cache", cache)
        if 2 * self.d >= 2**31:
            raise ValueError(f"d must be < 2^30, got {d}")
        self._codes = {}
        rng = np.random.default_rng([check_int("seed", seed, 0), 0x5CE7C4])
        # per tensor: the bucket hash (a in [1, p), b in [0, p)), the sign cubic (c3, c2, c1, c0)
        self.coeffs = [(int(rng.integers(1, _PRIME)), int(rng.integers(0, _PRIME)),
                        tuple(int(c) for c in rng.integers(0, _PRIME, size=4)))
                       for _ in self.numels]

    def _hash(self, k: int, start: int, stop: int, device):
        a, b, cubic = self.coeffs[k]
        i = torch.arange(start, stop, device=device, dtype=torch.int64)
        bucket = torch.remainder(i * a + b, _PRIME).remainder_(self.d)
        value = torch.full_like(i, cubic[0])  # Horner; every product < 2^62 (factors < 2^31)
        for c in cubic[1:]:
            value = value.mul_(i).add_(c).remainder_(_PRIME)
        sign = value.bitwise_and_(1).mul_(-2).add_(1)
        return bucket, sign

    def _code(self, k: int, device) -> torch.Tensor:
        """int32 codes ``bucket + d * (sign < 0)`` of tensor k (hashed in chunks, cached)."""
        key = (k, str(device))
        code = self._codes.get(key)
        if code is None:
            code = torch.empty(self.numels[k], dtype=torch.int32, device=device)
            for start in range(0, self.numels[k], self.chunk):
                stop = min(start + self.chunk, self.numels[k])
                bucket, sign = self._hash(k, start, stop, device)
                code[start:stop] = bucket.add_((sign < 0).long() * self.d)
            self._codes[key] = code
        return code

    def apply(self, tensors, out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """``out += scale * sketch(concat(flatten(t) for t in tensors))``; returns ``out``
        (a new float32 zero vector of length d on the first tensor's device when None; else a
        floating tensor of shape (d,)). A None entry (a parameter without gradient) counts as
        zeros. Sums run in ``out``'s precision, at least float32; the cached path adds the
        positive and the negative part of each bucket apart, so its rounding, relative to the
        sketch, grows like sqrt(P / d) float32 epsilons (1e-5 for P = 4M, d = 1024: far below
        the sketch's own ~1/sqrt(d)); a float64 ``out`` makes it exact to double."""
        tensors = list(tensors)
        if len(tensors) != len(self.numels):
            raise ValueError(f"expected {len(self.numels)} tensors, got {len(tensors)}")
        for k, t in enumerate(tensors):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{k}] must be a tensor or None, got {type(t).__name__}")
            if t is not None and t.numel() != self.numels[k]:
                raise ValueError(f"tensors[{k}] has {t.numel()} elements, expected "
                                 f"{self.numels[k]}")
        scale = check_float("scale", scale)
        if out is None:
            device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
            out = torch.zeros(self.d, dtype=torch.float32, device=device)
        elif not isinstance(out, torch.Tensor) or not out.is_floating_point() \
                or tuple(out.shape) != (self.d,):
            raise ValueError(f"out must be a floating tensor of shape ({self.d},), got "
                             f"{getattr(out, 'dtype', type(out).__name__)} "
                             f"{tuple(getattr(out, 'shape', ()))}")
        dtype = torch.promote_types(out.dtype, torch.float32)
        buffer = torch.zeros((2 if self.cache else 1) * self.d, dtype=dtype, device=out.device)
        for k, t in enumerate(tensors):
            if t is None:
                continue
            flat = t.detach().reshape(-1).to(out.device, dtype)
            if self.cache:
                buffer.index_add_(0, self._code(k, out.device), flat)
                continue
            for start in range(0, flat.numel(), self.chunk):
                stop = min(start + self.chunk, flat.numel())
                bucket, sign = self._hash(k, start, stop, out.device)
                buffer.index_add_(0, bucket, flat[start:stop] * sign.to(dtype))
        if self.cache:
            buffer = buffer[:self.d] - buffer[self.d:]
        return out.add_(buffer, alpha=scale)

    def __repr__(self) -> str:
        return f"CountSketch(d={self.d}, tensors={len(self.numels)}, P={sum(self.numels)})"
