"""The 3D Glow layers normflows 1.7.3 lacks (its Invertible1x1Conv and Squeeze are 2D only).

Shibata et al., Appendix B, https://arxiv.org/abs/2001.07847. ActNorm (shape (C,1,1,1)),
Split/Merge and DiagGaussian of normflows work on 5D tensors unchanged; the 3D coupling network
is :class:`~lightning_modules.glow.layers2d.CouplingNet` with ``dims=3``.
"""

from __future__ import annotations

import normflows as nf
import torch
import torch.nn.functional as F


class InvertibleConv1x1x1(nf.flows.Invertible1x1Conv):
    """Invertible 1x1x1 convolution, LU-parametrised (normflows' parametrisation, W = P L U).

    log|det| = D * H * W * log|det K| (eq. B.3) with log|det K| = sum log|S|.
    """

    def __init__(self, num_channels: int):
        super().__init__(num_channels, use_lu=True)

    def _conv(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv3d(z, w.view(self.num_channels, self.num_channels, 1, 1, 1))  # (B,C,D,H,W)

    def forward(self, z):  # latent -> data: W^-1
        n_vox = z.shape[2:].numel()  # D * H * W
        return self._conv(z, self._assemble_W(inverse=True)), -n_vox * torch.sum(self.log_S)

    def inverse(self, z):  # data -> latent: W
        n_vox = z.shape[2:].numel()
        return self._conv(z, self._assemble_W()), n_vox * torch.sum(self.log_S)


class Squeeze3d(nf.flows.Flow):
    """2x2x2 squeeze: (B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2) in the data -> latent direction.

    Channel order c * 8 + 4 * d + 2 * h + w, the 3D analogue of normflows' ``Squeeze``; a
    permutation, so log|det| = 0.
    """

    def forward(self, z):  # latent -> data (unsqueeze)
        b, c, d, h, w = z.shape
        z = z.view(b, c // 8, 2, 2, 2, d, h, w)
        z = z.permute(0, 1, 5, 2, 6, 3, 7, 4).contiguous()
        return z.view(b, c // 8, 2 * d, 2 * h, 2 * w), 0

    def inverse(self, z):  # data -> latent (squeeze)
        b, c, d, h, w = z.shape
        if d % 2 or h % 2 or w % 2:
            raise ValueError(f"Squeeze3d needs even D, H, W, got {tuple(z.shape[2:])}")
        z = z.view(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
        z = z.permute(0, 1, 3, 5, 7, 2, 4, 6).contiguous()
        return z.view(b, 8 * c, d // 2, h // 2, w // 2), 0
