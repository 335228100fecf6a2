"""Linear assignment on torch cost matrices (scipy's ``linear_sum_assignment``, maximising)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def solve_lap(score: torch.Tensor) -> torch.Tensor:
    """``P`` maximising ``sum_a score[a, P[a]]`` over permutations (a gather index, int64)."""
    s = score.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(s).all():
        raise FloatingPointError("assignment score contains NaN or inf")
    rows, cols = linear_sum_assignment(s, maximize=True)
    out = np.empty(s.shape[0], dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out)


def assignment_score(score: torch.Tensor, perm: torch.Tensor) -> float:
    """``sum_a score[a, perm[a]]`` in float64."""
    return float(score.gather(1, perm.view(-1, 1).to(score.device)).sum(dtype=torch.float64))
