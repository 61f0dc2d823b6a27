"""The electric-fish environment (arXiv:2511.08436): a batched multi-agent foraging environment
whose senses are :func:`fastmodels.ops.electric_image`, receptor layouts, and the conversion of
the op's normalized outputs to physical units."""

from fastmodels.efish.units import COULOMB_K, EOD_CHARGE, field_scale, to_volts_per_metre
from fastmodels.efish.receptors import receptor_ring
from fastmodels.efish.env import ACTION_SIZES, EnvConfig, ForagingEnv

__all__ = ["ForagingEnv", "EnvConfig", "ACTION_SIZES", "receptor_ring", "field_scale", "to_volts_per_metre", "COULOMB_K", "EOD_CHARGE"]
