"""Helpers for the electric-fish environment (arXiv:2511.08436): receptor layouts and the
conversion of :func:`fastmodels.ops.electric_image`'s normalized outputs to physical units."""

from fastmodels.efish.units import COULOMB_K, EOD_CHARGE, field_scale, to_volts_per_metre
from fastmodels.efish.receptors import receptor_ring

__all__ = ["receptor_ring", "field_scale", "to_volts_per_metre", "COULOMB_K", "EOD_CHARGE"]
