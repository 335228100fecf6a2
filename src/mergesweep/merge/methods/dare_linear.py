"""DARE + task arithmetic: random drop and rescale of each task vector, then a weighted sum.

    m_i ~ Bernoulli(density_i),  tau_i <- m_i * tau_i / density_i
    theta = theta_base + lambda * sum_i w_i tau_i     [/ sum_i w_i if normalize]

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv:2311.03099). Masks are seeded per (seed, tensor name, expert
index): bit-identical across runs and thread counts. Kernel: :mod:`mergesweep.merge.methods.dare`.
"""

from mergesweep.merge.methods._common import check_weight_sum
from mergesweep.merge.methods.dare import PAPER, dare, dare_params, make_merge  # noqa: F401
from mergesweep.merge.spec import MethodSpec

SPEC = MethodSpec(
    name="dare_linear",
    summary="random drop + rescale of task vectors, then task arithmetic",
    paper=PAPER,
    params=dare_params(normalize=False),
    merge=make_merge(sign_consensus=False),
    base="required",
    validate=check_weight_sum,
    doc=__doc__,
)
