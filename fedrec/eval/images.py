"""Perturbation size of an image attack: L2, Linf and SSIM between original and adversarial images.

SSIM (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004, "Image Quality Assessment: From Error
Visibility to Structural Similarity"): local means, variances and covariance under an 11 x 11
Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range L = 1 (pixels in [0, 1]),

    SSIM(x, y) = mean over windows of ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

C1 = (K1 L)^2, C2 = (K2 L)^2, computed per channel over the fully contained windows ("valid", the
paper's and skimage's ``gaussian_weights=True, use_sample_covariance=False`` convention) and averaged
over channels. Images smaller than the window use a window of their own size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

K1, K2, WINDOW, SIGMA = 0.01, 0.03, 11, 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(B,) SSIM of (B, C, H, W) image pairs (see the module docstring)."""
    x, y = x.double(), y.double()
    size = min(WINDOW, x.shape[-1], x.shape[-2])
    c = x.shape[1]
    w = torch.as_tensor(gaussian_window(size), dtype=torch.float64, device=x.device)
    w = w.expand(c, 1, size, size)

    def filt(z):
        return F.conv2d(z, w, groups=c)

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


def perturbation_sizes(original: torch.Tensor, perturbed: torch.Tensor) -> dict[str, float]:
    """Mean / max over images of the L2 and Linf norms of ``perturbed - original`` and mean / min SSIM."""
    d = (perturbed.double() - original.double()).flatten(1)
    l2, linf = d.norm(dim=1), d.abs().max(dim=1).values
    s = ssim(original, perturbed)
    return {"l2": float(l2.mean()), "l2_max": float(l2.max()), "linf": float(linf.mean()),
            "linf_max": float(linf.max()), "ssim": float(s.mean()), "ssim_min": float(s.min()),
            "images": int(len(d))}
