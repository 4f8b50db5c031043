"""Physics self-check: computes deepstem's electron-optics numbers and compares them with abTEM.

Run ``python scripts/selfcheck.py``. Everything printed is computed in this run; the exit status is
non-zero when a comparison with abTEM or with the check values of REFERENCE.md fails.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from physics import (
    interaction_parameter,
    probe,
    probe_diameter_A,
    rayleigh_radius_A,
    scherzer_defocus,
    transmission_function,
    wavelength,
)

# REFERENCE.md section 1: energy -> (wavelength A, sigma rad/(V A), Scherzer defocus A at Cs = 1e4 A)
CHECK_VALUES = {
    30e3: (0.069791, 1.5433e-3, 32.355),
    80e3: (0.041757, 1.0087e-3, 25.027),
    200e3: (0.025079, 7.2884e-4, 19.396),
    300e3: (0.019687, 6.5262e-4, 17.185),
}


def optics_table() -> bool:
    ok = True
    print(
        "energy_kV  wavelength_A  sigma_rad/(V*A)  scherzer_A(Cs=1e4A)  rayleigh_A(20mrad)  d_002_A(20mrad)"
    )
    for energy, (lam_ref, sigma_ref, df_ref) in CHECK_VALUES.items():
        lam, sigma, df = wavelength(energy), interaction_parameter(energy), scherzer_defocus(1e4, energy)
        print(
            f"{energy / 1e3:9.0f}  {lam:12.6f}  {sigma:15.5e}  {df:19.3f}  "
            f"{rayleigh_radius_A(20.0, energy):18.3f}  {probe_diameter_A(20.0, energy):15.3f}"
        )
        # five significant digits in the check values: agreement to 4e-5 relative
        for value, ref in ((lam, lam_ref), (sigma, sigma_ref), (df, df_ref)):
            ok &= abs(value - ref) <= 4e-5 * abs(ref)
    return ok


def probe_vs_abtem() -> bool:
    import abtem

    ok = True
    print("\nprobe intensity vs abtem.Probe (normalised to sum 1): max |difference| / max")
    for energy, semiangle, defocus, soft in ((80e3, 20.0, 25.0, False), (300e3, 25.0, -50.0, True)):
        n, pixel, Cs = 128, 0.07, 1e4
        ours = np.abs(
            probe(energy, semiangle, n, sampling_A=pixel, defocus_A=defocus, Cs_A=Cs, soft_aperture=soft)
        )
        theirs = abtem.Probe(
            energy=energy,
            semiangle_cutoff=semiangle,
            defocus=defocus,
            Cs=Cs,
            gpts=n,
            sampling=pixel,
            soft=soft,
        ).build(lazy=False)
        theirs_intensity = np.abs(theirs.array) ** 2 / np.sum(np.abs(theirs.array) ** 2)
        deviation = np.abs(ours**2 - theirs_intensity).max() / theirs_intensity.max()
        ok &= deviation <= 1e-3
        print(f"  {energy / 1e3:.0f} kV {semiangle} mrad defocus {defocus} A soft={soft}: {deviation:.2e}")
    return ok


def transmission_vs_abtem() -> bool:
    import abtem
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    potential = abtem.Potential(atoms, sampling=0.05, slice_thickness=atoms.cell[2, 2], projection="infinite")
    array = potential.build(lazy=False)
    v_z = array.array[0]
    theirs = array.transmission_function(energy=200e3).array[0]
    ours = transmission_function(v_z, 200e3)
    deviation = np.abs(ours - theirs).max()
    print(
        f"\nSi unit cell, one slice at 200 kV: max phase sigma*v_z = {np.angle(ours).max():.3f} rad, "
        f"|T_ours - T_abtem| max = {deviation:.2e}"
    )
    return deviation < 1e-4


def main() -> int:
    start = time.perf_counter()
    results = {"optics": optics_table(), "probe": probe_vs_abtem(), "transmission": transmission_vs_abtem()}
    print(f"\nself-check {'passed' if all(results.values()) else 'FAILED'}: {results} ", end="")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
