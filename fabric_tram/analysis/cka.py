"""Linear CKA (Kornblith et al. 2019) between two models' representations of the same examples, streamed.

CKA(X, Y) = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F), with Xᶜ, Yᶜ the column-centred (n × d) representation
matrices. Centring is done on the sums, so only d × d products, column sums and the count are accumulated (in
float64): batches stream through and no representation is kept. The sums of several ranks add up (``sums()``
is what to all-reduce), giving the CKA of all their examples together.
"""

from __future__ import annotations

import torch


class StreamedLinearCKA:
    def __init__(self, dim_x: int, dim_y: int, device=None):
        f64 = dict(dtype=torch.float64, device=device)
        self.xx, self.yy = torch.zeros(dim_x, dim_x, **f64), torch.zeros(dim_y, dim_y, **f64)
        self.xy = torch.zeros(dim_x, dim_y, **f64)
        self.sx, self.sy = torch.zeros(dim_x, **f64), torch.zeros(dim_y, **f64)
        self.n = torch.zeros((), **f64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: ``x`` (b, dim_x) and ``y`` (b, dim_y), row i of both from the same example."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"CKA needs the same examples on both sides: {x.shape[0]} vs {y.shape[0]} rows")
        x, y = x.detach().double(), y.detach().double()
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.xy += x.T @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.n += x.shape[0]

    def sums(self) -> list[torch.Tensor]:
        """The accumulated sums, in place: all-reduce each over ranks before ``value()``."""
        return [self.xx, self.yy, self.xy, self.sx, self.sy, self.n]

    def value(self) -> float:
        if float(self.n) < 2:
            raise ValueError("CKA needs at least 2 examples")
        n = self.n
        cxy = self.xy - torch.outer(self.sx, self.sy) / n  # Xᶜᵀ Yᶜ = Xᵀ Y − n μx μyᵀ
        cxx = self.xx - torch.outer(self.sx, self.sx) / n
        cyy = self.yy - torch.outer(self.sy, self.sy) / n
        return float((cxy**2).sum() / (torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA of two whole representation matrices (n × d): the reference the streamed one is tested against."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float(
        torch.linalg.matrix_norm(y.T @ x) ** 2 / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))
    )
