"""DARE + TIES: random drop and rescale of each task vector, then sign election and disjoint merge.

    m_i ~ Bernoulli(density_i),  tau_i <- m_i * tau_i / density_i
    gamma = sign(sum_i w_i tau_i);  tau = sum_i [sign(w_i tau_i) = gamma] w_i tau_i / sum_i [...] w_i
    theta = theta_base + lambda * tau            (normalize: false drops the division)

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv:2311.03099), with the sign election of TIES (Yadav et al. 2023).
Masks are seeded per (seed, tensor name, expert index). Kernel: :mod:`mergesweep.merge.methods.dare`.
"""

from mergesweep.merge.methods._common import check_weight_sum
from mergesweep.merge.methods.dare import PAPER, dare, dare_params, make_merge  # noqa: F401
from mergesweep.merge.spec import MethodSpec

SPEC = MethodSpec(
    name="dare_ties",
    summary="random drop + rescale of task vectors, then TIES sign election and disjoint merge",
    paper=PAPER,
    params=dare_params(normalize=True),
    merge=make_merge(sign_consensus=True),
    base="required",
    validate=check_weight_sum,
    doc=__doc__,
)
