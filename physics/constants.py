"""Physical constants (CODATA 2018, SI units), the single source for every module."""

PLANCK_Js = 6.62607015e-34
ELECTRON_MASS_kg = 9.1093837015e-31
ELEMENTARY_CHARGE_C = 1.602176634e-19
SPEED_OF_LIGHT_m_per_s = 299792458.0
ANGSTROM_m = 1e-10
