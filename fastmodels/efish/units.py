"""Physical units for :func:`fastmodels.ops.electric_image`.

The op works in normalized units: a pole of unit amplitude at distance d (cm) has field
d / |d|^3 (cm^-2). One EOD pole of the paper carries q = 1.11e-15 C, so the physical field is
k q / (1 cm)^2 times the normalized one, in V/m (k = 8.99e9 N m^2 C^-2, 1 cm = 1e-2 m).
"""

from __future__ import annotations

COULOMB_K = 8.99e9  # N m^2 / C^2
EOD_CHARGE = 1.11e-15  # C, one EOD pole of the paper's fish
CM = 1e-2  # m


def field_scale(charge: float = EOD_CHARGE, k: float = COULOMB_K) -> float:
    """V/m per normalized unit: k q / (1 cm)^2 (about 0.0998 V/m for the paper's charge)."""
    return k * charge / CM**2


def to_volts_per_metre(signal, charge: float = EOD_CHARGE, k: float = COULOMB_K):
    """Convert a normalized signal (tensor or float) to V/m."""
    return signal * field_scale(charge, k)
