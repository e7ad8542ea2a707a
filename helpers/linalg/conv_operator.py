"""A first convolution as a linear operator on whole images (size, stride and padding included).

The paper's matrix rule looks at one patch; an image is many overlapping patches. Here: the operator's exact
null space on small images (``dense_operator`` / ``operator_null_space``), its spectrum from the 2-D DFT of the
polyphase components (``polyphase_spectrum``, circular boundary), near-null modes at the zero-padded border
(``boundary_near_null``), how a tiled patch vector leaks through overlapping windows (``window_stats``), and the
whole-input exact null directions that a first layer admits (``exact_null_directions``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from helpers.linalg.kernels import UnsupportedLayerError, _check_layer, kernel_basis, weight_matrix


def _conv_input_shape(layer: nn.Conv2d, input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[0] != layer.in_channels:
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not fit {layer}: expected (C, H, W) or "
            f"(1, C, H, W) with C = {layer.in_channels}"
        )
    return shape[0], shape[1], shape[2]


def geometry(layer: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, padding) of a 2-D convolution as (height, width) pairs of ints."""
    if isinstance(layer.padding, str):
        raise UnsupportedLayerError(f"padding={layer.padding!r} is not supported; valid: explicit integer padding")
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    return (kh, kw), (sh, sw), (ph, pw)


def conv_apply(layer: nn.Conv2d, delta: torch.Tensor) -> torch.Tensor:
    """The linear part of the conv (no bias) on (B, C, H, W) in delta's dtype: A delta."""
    w = layer.weight.detach().to(delta.dtype).to(delta.device)
    return F.conv2d(delta, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def dense_operator(
    layer: nn.Conv2d,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float64,
    max_inputs: int = 6000,
    region: tuple[slice, slice] | None = None,
) -> torch.Tensor:
    """The conv's matrix A (out_numel, n) on one image of ``input_shape``, built column by column.

    ``region`` (rows, cols slices) restricts the columns to the pixels inside it (n = C * region pixels);
    default: all pixels. Only for small column counts (n <= max_inputs): the whole-image operator of a
    224x224 ResNet-50 conv1 has 150,528 columns: use ``polyphase_spectrum`` and ``boundary_near_null``.
    """
    c, h, w = _conv_input_shape(layer, input_shape)
    rows, cols = region or (slice(0, h), slice(0, w))
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[rows, cols] = True
    pixels = inside.nonzero()
    n = c * len(pixels)
    if n > max_inputs:
        raise ValueError(
            f"operator has {n} columns > max_inputs={max_inputs}; use a smaller image or region, "
            "or polyphase_spectrum for the whole-image spectrum"
        )
    index = torch.arange(n)
    basis = torch.zeros(n, c, h, w, dtype=dtype)
    basis[index, index // len(pixels), pixels[index % len(pixels), 0], pixels[index % len(pixels), 1]] = 1.0
    return torch.cat([conv_apply(layer, chunk).reshape(chunk.shape[0], -1) for chunk in basis.split(512)]).T


def _smallest_right_singular(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All n singular values of A (m, n) ascending (zeros for a wide A) and the matching right vectors."""
    m, n = a.shape
    _, s, vh = torch.linalg.svd(a, full_matrices=m < n)
    sv = torch.zeros(n, dtype=s.dtype)
    sv[: s.numel()] = s
    order = torch.argsort(sv)
    return sv[order], vh[order]


def operator_null_space(
    layer: nn.Conv2d, input_shape: Sequence[int], *, rtol: float | None = None, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact null (or k smallest) right singular vectors of the whole-image conv operator (small images).

    Returns (singular_values ascending, vectors (m, C, H, W) float64, unit norm). With ``k`` None: the exact
    null space (singular values <= rtol * sigma_max; default rtol = max(A.shape) * eps64); else the k
    smallest, null or not.
    """
    c, h, w = _conv_input_shape(layer, input_shape)
    a = dense_operator(layer, (c, h, w))
    sv, vh = _smallest_right_singular(a)
    if k is None:
        tol = (max(a.shape) * torch.finfo(a.dtype).eps if rtol is None else rtol) * float(sv.max())
        keep = sv <= tol
        sv, vh = sv[keep], vh[keep]
    else:
        sv, vh = sv[:k], vh[:k]
    return sv, vh.reshape(-1, c, h, w)


@dataclass
class PolyphaseSpectrum:
    """Singular values of the conv as an operator on the whole image, circular boundary (2-D DFT).

    With stride (sh, sw) the image splits into sh*sw polyphase components on the output grid; the conv is a
    sum of ordinary (stride-1) convolutions of them, so in the DFT of the output grid it becomes one small
    matrix ``M(omega)`` of shape (out, in/groups... here in * sh * sw) per frequency. Its singular values
    over all frequencies are exactly those of the circular operator.

    matrices: (H', W', O, C*sh*sw) complex128; singular: (H', W', min(O, C*sh*sw)) descending.
    """

    layer_stride: tuple[int, int]
    grid: tuple[int, int]
    input_shape: tuple[int, int, int]
    matrices: torch.Tensor
    singular: torch.Tensor
    padding: tuple[int, int]

    @property
    def sigma_max(self) -> float:
        return float(self.singular.max())

    @property
    def per_frequency_nullity(self) -> int:
        """max(0, C*sh*sw - O): exact null directions per frequency (whatever the weights)."""
        o, n = self.matrices.shape[-2:]
        return max(0, n - o)

    def smallest(self) -> torch.Tensor:
        """(H', W') the smallest singular value at each frequency (0 where a null direction exists)."""
        if self.per_frequency_nullity:
            return torch.zeros(self.grid, dtype=torch.float64)
        return self.singular[..., -1]

    def sigma_min(self) -> float:
        return float(self.smallest().min())

    def near_null_vectors(self, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most invisible real images: (sigmas (k,), images (k, C, H, W) unit norm), circular boundary."""
        sigmas = self.smallest().flatten()
        order = torch.argsort(sigmas)
        out_s, out_v, seen = [], [], set()
        gh, gw = self.grid
        for idx in order.tolist():
            i, j = divmod(idx, gw)
            if (i, j) in seen:
                continue
            seen.update({(i, j), ((-i) % gh, (-j) % gw)})  # omega and -omega give the same real image
            _, _, vh = torch.linalg.svd(self.matrices[i, j], full_matrices=True)
            v = vh[-1].conj()
            out_s.append(float(sigmas[idx]))
            out_v.append(plane_wave(v, (i, j), self))
            if len(out_s) == k:
                break
        return torch.tensor(out_s), torch.stack(out_v)


def _phase_index(kernel: int, stride: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each kernel tap u: its polyphase component a = (u - pad) mod stride and shift q = floor(...)."""
    u = torch.arange(kernel) - pad
    return torch.remainder(u, stride), torch.div(u, stride, rounding_mode="floor")


def polyphase_spectrum(layer: nn.Conv2d, input_shape: Sequence[int]) -> PolyphaseSpectrum:
    """The conv's whole-image spectrum under circular boundary conditions (see ``PolyphaseSpectrum``).

    Needs groups == 1 and H, W divisible by the stride. Cost: one (O x C*sh*sw) SVD per output frequency.
    """
    _check_layer(layer)
    c, h, w = _conv_input_shape(layer, input_shape)
    (kh, kw), (sh, sw), (ph, pw) = geometry(layer)
    if layer.groups != 1 or h % sh or w % sw:
        raise ValueError(
            f"polyphase_spectrum needs groups=1 and H, W divisible by the stride {(sh, sw)}; "
            f"got groups={layer.groups}, input {(c, h, w)}"
        )
    gh, gw = h // sh, w // sw
    a_u, q_u = _phase_index(kh, sh, ph)
    b_v, r_v = _phase_index(kw, sw, pw)
    w1 = 2 * math.pi * torch.arange(gh, dtype=torch.float64) / gh
    w2 = 2 * math.pi * torch.arange(gw, dtype=torch.float64) / gw
    e1 = torch.exp(1j * w1[:, None] * q_u[None].double())  # (gh, kh)
    e2 = torch.exp(1j * w2[:, None] * r_v[None].double())  # (gw, kw)
    onehot_a = F.one_hot(a_u, sh).to(torch.complex128)  # (kh, sh)
    onehot_b = F.one_hot(b_v, sw).to(torch.complex128)  # (kw, sw)
    weight = layer.weight.detach().cpu().to(torch.complex128)
    t = torch.einsum("ocuv,yv,vb->ocuyb", weight, e2, onehot_b)  # contract the columns first (cheap)
    m = torch.einsum("ocuyb,xu,ua->xyocab", t, e1, onehot_a).reshape(gh, gw, weight.shape[0], c * sh * sw)
    return PolyphaseSpectrum((sh, sw), (gh, gw), (c, h, w), m, torch.linalg.svdvals(m), (ph, pw))


def plane_wave(v: torch.Tensor, freq: tuple[int, int], spectrum: PolyphaseSpectrum) -> torch.Tensor:
    """The real image whose polyphase components are Re(v e^{i omega . n}) at output-grid frequency freq.

    v: (C*sh*sw,) complex; returns (C, H, W) float64 of unit norm.
    """
    c, h, w = spectrum.input_shape
    sh, sw = spectrum.layer_stride
    gh, gw = spectrum.grid
    i = torch.arange(gh, dtype=torch.float64)[:, None]
    j = torch.arange(gw, dtype=torch.float64)[None, :]
    wave = torch.exp(1j * 2 * math.pi * (freq[0] * i / gh + freq[1] * j / gw))  # (gh, gw)
    phases = (v.reshape(c, sh, sw)[:, :, :, None, None] * wave).real  # (c, a, b, gh, gw)
    image = phases.permute(0, 3, 1, 4, 2).reshape(c, h, w)  # pixel (sh*i + a, sw*j + b)
    return image / image.norm()


def circular_conv_apply(layer: nn.Conv2d, delta: torch.Tensor) -> torch.Tensor:
    """The conv with circular (wrap-around) padding, the boundary condition of ``polyphase_spectrum``."""
    _, _, (ph, pw) = geometry(layer)
    padded = F.pad(delta, (pw, pw, ph, ph), mode="circular") if (ph or pw) else delta
    w = layer.weight.detach().to(delta.dtype).to(delta.device)
    return F.conv2d(padded, w, None, layer.stride, 0, layer.dilation, layer.groups)


def operator_gain(layer: nn.Conv2d, delta: torch.Tensor) -> float:
    """||A delta|| / ||delta|| with the layer's real (zero-padded) conv, in float64 (delta (C, H, W))."""
    d = delta.double().unsqueeze(0)
    return float(conv_apply(layer, d).norm() / d.norm())


def boundary_near_null(
    layer: nn.Conv2d, input_shape: Sequence[int], k: int = 4, crop: int = 12
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most invisible perturbations supported in a crop x crop corner of the image, on the full image.

    Zero padding makes border pixels less visible than interior ones (fewer windows see them), so the
    whole-image operator's smallest singular vectors can sit at the corners, outside what
    ``polyphase_spectrum`` (circular boundary) describes. Restricted to a corner, the operator is small and
    exact: its columns are the corner's pixels, its rows every window that sees them (on a canvas with the
    image's alignment to the stride). Returns (gains (k,) = ||A v|| measured by a direct convolution on the
    full image, ascending; images (k, C, H, W) unit norm). Each gain bounds sigma_min of the full operator.
    """
    c, h, w = _conv_input_shape(layer, input_shape)
    (kh, kw), (sh, sw), _ = geometry(layer)
    m_h, m_w = min(crop, h), min(crop, w)
    canvas_h = min(h, m_h + kh + (h - m_h - kh) % sh) if h > m_h + kh else h
    canvas_w = min(w, m_w + kw + (w - m_w - kw) % sw) if w > m_w + kw else w
    found: list[tuple[float, torch.Tensor]] = []
    for top in (True, False):
        for left in (True, False):
            rows = slice(0, m_h) if top else slice(canvas_h - m_h, canvas_h)
            cols = slice(0, m_w) if left else slice(canvas_w - m_w, canvas_w)
            a = dense_operator(layer, (c, canvas_h, canvas_w), region=(rows, cols), max_inputs=10_000)
            _, vh = _smallest_right_singular(a)
            for v in vh[:k]:
                full = torch.zeros(c, h, w, dtype=torch.float64)
                full[:, rows if top else slice(h - m_h, h), cols if left else slice(w - m_w, w)] = v.reshape(
                    c, m_h, m_w
                )
                found.append((operator_gain(layer, full), full / full.norm()))
    found.sort(key=lambda t: t[0])
    return torch.tensor([g for g, _ in found[:k]]), torch.stack([v for _, v in found[:k]])


def window_stats(layer: nn.Conv2d, p: torch.Tensor, phi: torch.Tensor) -> dict[str, Any]:
    """What the conv's windows see of a tiled perturbation p (C, H, W): how many windows equal phi exactly.

    Returns ``exact_fraction`` (windows whose content is beta*phi for some beta, incl. 0), and
    ``window_residual`` (H', W') = ||W1 window|| / (||W1||_2 ||window||), the per-window leak.
    """
    kernel, stride, padding = geometry(layer)
    cols = F.unfold(p.double().unsqueeze(0), kernel, layer.dilation, padding, stride)[0]
    cols = cols.T  # (L, C*kh*kw)
    w = weight_matrix(layer).cpu()
    u = phi.double().flatten() / phi.double().norm()
    along = cols @ u
    off = (cols - along[:, None] * u[None]).norm(dim=1)
    exact = off <= 1e-9 * cols.norm(dim=1).clamp_min(1e-300)
    leak = (cols @ w.T).norm(dim=1) / (torch.linalg.matrix_norm(w, 2) * cols.norm(dim=1).clamp_min(1e-300))
    hh, ww = _out_hw(layer, p.shape)
    return {"exact_fraction": float(exact.double().mean()), "window_residual": leak.reshape(hh, ww)}


def _out_hw(layer: nn.Conv2d, shape: Sequence[int]) -> tuple[int, int]:
    h, w = shape[-2:]
    (kh, kw), (sh, sw), (ph, pw) = geometry(layer)
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def periodic_patch_matrix(layer: nn.Conv2d) -> torch.Tensor:
    """W1 restricted to stride-periodic patches: (out, C*sh*sw) float64.

    A tiled perturbation is realisable by an image, with every window showing the same phi (Remark 3),
    only if phi repeats with the stride inside the kernel; such phi live in a C*sh*sw dimensional space, and
    ``W1 phi = 0`` there iff this matrix has a kernel (it is M(omega = 0) of the polyphase spectrum).
    """
    (kh, kw), (sh, sw), _ = geometry(layer)
    a = F.one_hot(torch.arange(kh) % sh, sh).double()
    b = F.one_hot(torch.arange(kw) % sw, sw).double()
    w = layer.weight.detach().cpu().double()
    return torch.einsum("ocuv,ua,vb->ocab", w, a, b).reshape(w.shape[0], -1)


def exact_null_directions(layer: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """An orthonormal basis (k, *input_shape) of the first layer's exact null space on whole inputs.

    Linear: ker(W1). Conv2d with non-overlapping windows (stride == kernel, no padding, whole patches):
    ker(W1) in each patch independently. Other convs: the null space of the dense whole-image operator
    (small images only; may be empty, e.g. ResNet-50's conv1). Model space, float64.
    """
    _check_layer(layer)
    if not isinstance(layer, nn.Conv2d):
        return kernel_basis(layer).vectors.reshape(-1, *input_shape)
    c, h, w = _conv_input_shape(layer, input_shape)
    k, s, p = geometry(layer)
    if k == s and p == (0, 0) and h % k[0] == 0 and w % k[1] == 0 and layer.groups == 1:
        basis = kernel_basis(layer).vectors
        rows, cols = h // k[0], w // k[1]
        out = torch.zeros(rows * cols * basis.shape[0], c, h, w, dtype=torch.float64)
        i = 0
        for r in range(rows):
            for q in range(cols):
                out[i : i + basis.shape[0], :, r * k[0] : (r + 1) * k[0], q * k[1] : (q + 1) * k[1]] = basis
                i += basis.shape[0]
        return out
    _, vectors = operator_null_space(layer, (c, h, w))
    return vectors


def null_residuals_within_rule(layer: nn.Module, vectors: torch.Tensor, bound: float) -> tuple[bool, float]:
    """Whether every vector (k, *patch_shape) is null for W1 by the rank rule: ``||W1 phi|| <= bound * ||phi||``.

    ``bound`` is the rule's absolute threshold ``rtol * sigma_max`` (``KernelBasis.tol``): a trained W1 may have
    near-null directions with ``||W1 phi||`` up to it, which the rule counts as kernel. ``||W1 phi||`` is
    recomputed here from the layer's weight in float64 (not read from the basis). Returns (ok, worst ratio
    ``max ||W1 phi|| / ||phi||``).
    """
    w = weight_matrix(layer).cpu()
    flat = vectors.detach().double().cpu().reshape(vectors.shape[0], -1)
    worst = float(((flat @ w.T).norm(dim=1) / flat.norm(dim=1).clamp_min(1e-300)).max())
    return worst <= bound, worst


def perturbation_within_rule(layer: nn.Conv2d, p: torch.Tensor, bound: float) -> tuple[bool, float]:
    """Whether a whole-image perturbation p (C, H, W) is invisible to the conv by the rank rule:
    ``||A p|| <= bound * ||p||`` (A: the zero-padded conv, float64). For non-overlapping windows whose every
    patch is a kernel vector, the rule's per-patch bound gives exactly this. Returns (ok, ``||A p|| / ||p||``)."""
    d = p.detach().double().cpu().unsqueeze(0)
    ratio = float(conv_apply(layer, d).norm() / d.norm().clamp_min(1e-300))
    return ratio <= bound, ratio


def spectrum_matches_direct(
    layer: nn.Conv2d, spectrum: PolyphaseSpectrum, k: int = 1, rtol: float = 1e-6
) -> tuple[bool, float]:
    """Whether the DFT's k most invisible images have, by a direct circular convolution, the gain the spectrum
    predicts (within ``rtol * sigma_max``). Returns (ok, worst |measured - predicted| / sigma_max)."""
    sigmas, images = spectrum.near_null_vectors(k)
    measured = circular_conv_apply(layer, images).flatten(1).norm(dim=1)
    gap = float((measured - sigmas).abs().max()) / spectrum.sigma_max
    return gap <= rtol, gap


def sigma_min_dense(layer: nn.Conv2d, input_shape: Sequence[int]) -> float:
    """The exact smallest singular value of the zero-padded conv operator on one small image (C, H, W):
    ``sqrt(lambda_min(A^T A))`` from the dense operator in float64 (C*H*W <= 6000 columns)."""
    a = dense_operator(layer, input_shape)
    return float(torch.linalg.eigvalsh(a.T @ a)[0].clamp_min(0.0).sqrt())


def sigma_min_iterative(
    layer: nn.Conv2d, input_shape: Sequence[int], *, shift: float, tol: float = 1e-8, seed: int = 0
) -> tuple[float, float]:
    """The smallest singular value of the zero-padded conv operator on a whole image, matrix-free.

    Lanczos (ARPACK ``eigsh``) for the largest eigenvalue of ``shift^2 I - A^T A`` (any ``shift``; about sigma_max
    converges fastest), with ``A`` and ``A^T`` applied as the conv and its transpose in float64. Returns
    (sigma, relative residual ``||A^T A v - sigma^2 v|| / shift^2`` of the returned unit vector). The result is
    a Ritz value: it approaches sigma_min from above and is **not** a certified lower bound.
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.nn.grad import conv2d_input

    c, h, w = _conv_input_shape(layer, input_shape)
    shape = (1, c, h, w)
    weight = layer.weight.detach().cpu().double()

    def gram(v: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(v, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return conv2d_input(shape, weight, y, layer.stride, layer.padding, layer.dilation, layer.groups)

    def matvec(v: Any) -> Any:
        x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(shape)
        return (shift**2 * x - gram(x)).reshape(-1).numpy()

    n = c * h * w
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    vals, vecs = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=1, which="LA", tol=tol, v0=v0)
    lam = max(shift**2 - float(vals[0]), 0.0)
    v = torch.from_numpy(vecs[:, 0].copy()).reshape(shape)
    v = v / v.norm()
    residual = float((gram(v) - lam * v).norm()) / shift**2
    return math.sqrt(lam), residual


@dataclass
class InjectivityEvidence:
    """What is computed about sigma_min of the zero-padded conv operator (all gains in the layer's units).

    ``exact``: {N: sigma_min on an N x N image, dense and exact}; ``corner_at``: {N: the smallest corner-mode gain
    of ``boundary_near_null`` on that image, an upper bound of sigma_min there}; ``iterative``: the Lanczos
    value on the full image (``input_shape``), with its relative ``residual``; ``corner``: the smallest
    corner-mode gain on the full image (an upper bound). No certified lower bound at the full size.
    """

    input_shape: tuple[int, int, int]
    exact: dict[int, float]
    corner_at: dict[int, float]
    iterative: float
    residual: float
    corner: float
    shift: float = 0.0

    def consistent(self, rtol: float = 1e-6) -> tuple[bool, str]:
        """The internal check: every exact sigma_min at most its corner upper bound, the Lanczos value at most
        the full image's corner gain, its residual below ``rtol``. Returns (ok, what was compared).

        With the Lanczos ``shift`` recorded, the comparison allows the Ritz value's own error: a relative
        residual r means sigma^2 is within r * shift^2 of an eigenvalue of A^T A, so sigma may exceed the one it
        approximates by up to sqrt(r) * shift, which dominates when sigma_min is near 0 (a singular operator)."""
        small = all(self.exact[n] <= self.corner_at[n] * (1 + 1e-9) for n in self.exact)
        big = self.iterative <= self.corner * (1 + rtol) + math.sqrt(self.residual) * self.shift
        pairs = ", ".join(f"{self.exact[n]:.5g} <= {self.corner_at[n]:.5g}" for n in self.exact)
        text = (
            f"exact vs corner: {pairs}; "
            f"Lanczos {self.iterative:.6g} <= corner {self.corner:.6g}; residual {self.residual:.1e}"
        )
        return small and big and self.residual <= rtol, text


def injectivity_evidence(
    layer: nn.Conv2d,
    input_shape: Sequence[int],
    sizes: Sequence[int],
    *,
    shift: float,
    corner: float,
    crop: int = 8,
) -> InjectivityEvidence:
    """Exact sigma_min of the zero-padded operator on small N x N images (``sizes``), their corner upper
    bounds, and the Lanczos estimate on the full ``input_shape`` (see :class:`InjectivityEvidence`)."""
    c, h, w = _conv_input_shape(layer, input_shape)
    exact = {n: sigma_min_dense(layer, (c, n, n)) for n in sizes}
    corner_at = {n: float(boundary_near_null(layer, (c, n, n), k=1, crop=min(crop, n // 2))[0][0]) for n in sizes}
    sigma, residual = sigma_min_iterative(layer, (c, h, w), shift=shift)
    return InjectivityEvidence((c, h, w), exact, corner_at, sigma, residual, corner, shift)


@dataclass(frozen=True)
class SpectrumSummary:
    """How invisible a conv's least visible image direction is, on images of ``input_shape`` (C, H, W).

    ``sigma_max``: the largest singular value of the circular operator (the layer's units); ``circular``: its
    smallest over sigma_max (polyphase DFT, exact for circular boundary); ``zero_padded``: the Lanczos estimate of
    the real zero-padded operator's sigma_min over sigma_max (from above, not a certified bound) with its relative
    ``residual``.
    """

    input_shape: tuple[int, int, int]
    sigma_max: float
    circular: float
    zero_padded: float
    residual: float

    def evidence(self, corner: float) -> InjectivityEvidence:
        """The full-size part of :class:`InjectivityEvidence` (no dense sizes), beside the smallest corner-mode
        gain ``corner`` (an upper bound of sigma_min measured directly), for its ``consistent`` check."""
        sigma = self.zero_padded * self.sigma_max
        return InjectivityEvidence(self.input_shape, {}, {}, sigma, self.residual, corner, self.sigma_max)


def spectrum_summary(layer: nn.Conv2d, input_shape: Sequence[int], *, seed: int = 0) -> SpectrumSummary:
    """:class:`SpectrumSummary` of ``layer`` on one image of ``input_shape``: one polyphase spectrum and one
    Lanczos run (``sigma_min_iterative`` shifted by the circular sigma_max)."""
    shape = _conv_input_shape(layer, input_shape)
    spectrum = polyphase_spectrum(layer, shape)
    smax = spectrum.sigma_max
    sigma, residual = sigma_min_iterative(layer, shape, shift=smax, seed=seed)
    return SpectrumSummary(shape, smax, spectrum.sigma_min() / smax, sigma / smax, residual)


@dataclass(frozen=True)
class RatioComparison:
    """One quantity (e.g. sigma_min/sigma_max) of a trained layer beside the same quantity of several random
    initialisations of its architecture. ``value`` is trained / (smallest random one): below 1 when the trained
    layer's quantity is below every random initialisation's (``verdict.at_most(1, ...)`` judges it)."""

    what: str
    trained: float
    random: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.random:
            raise ValueError("a comparison with random initialisations needs at least one of them")

    @property
    def value(self) -> float:
        low = min(self.random)
        return self.trained / low if low > 0 else (math.inf if self.trained > 0 else 1.0)

    def below_every_random(self) -> bool:
        return self.trained < min(self.random)

    def text(self) -> str:
        return (
            f"{self.what}: trained {self.trained:.3g}; {len(self.random)} random initialisations "
            f"{min(self.random):.3g} to {max(self.random):.3g} (trained / smallest random = {self.value:.3g})"
        )

    def __str__(self) -> str:
        return self.text()


def compare_spectra(trained: SpectrumSummary, random: Sequence[SpectrumSummary]) -> dict[str, RatioComparison]:
    """The comparisons {"circular": ..., "zero_padded": ...} of sigma_min/sigma_max between a trained layer's
    :class:`SpectrumSummary` and those of random initialisations (:class:`RatioComparison`)."""
    return {
        key: RatioComparison(what, getattr(trained, key), tuple(getattr(s, key) for s in random))
        for key, what in (
            ("circular", "sigma_min/sigma_max, circular operator (DFT)"),
            ("zero_padded", "sigma_min/sigma_max, zero-padded operator (Lanczos)"),
        )
    }


def equal_taps(layer: nn.Conv2d, rtol: float) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Pairs of kernel taps (channel, row, col) whose weights agree in every filter: ``||W[:, a] - W[:, b]|| <=
    rtol * ||W1||_2``. Each pair gives a kernel vector ``e_a - e_b`` of W1 (a trained layer with such pairs
    loses rank). Ordered by the first tap, then the second."""
    w = layer.weight.detach().cpu().double()
    cols = w.reshape(w.shape[0], -1).T  # (taps, filters)
    bound = rtol * float(torch.linalg.matrix_norm(cols, 2))
    gaps = torch.cdist(cols, cols)
    shape = tuple(w.shape[1:])
    pairs = []
    for a, b in (torch.triu(gaps <= bound, diagonal=1)).nonzero().tolist():
        ia = tuple(int(v) for v in torch.unravel_index(torch.tensor(a), shape))
        ib = tuple(int(v) for v in torch.unravel_index(torch.tensor(b), shape))
        pairs.append((ia, ib))
    return pairs  # type: ignore[return-value]
