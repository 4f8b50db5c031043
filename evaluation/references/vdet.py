"""Virtual detectors: annular sums of every CBED (BF, ABF, ADF, HAADF)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.references._common import (
    Reconstruction,
    check_scan_array,
    iter_scan_rows,
    mean_pattern,
    pair,
    pattern_centre,
)
from physics import wavelength

__all__ = ["annulus_weights", "detector_angles_mrad", "scan_detector_angles_mrad", "virtual_detector"]


def detector_angles_mrad(kind: str, semiangle_mrad: float, max_angle_mrad: float) -> tuple[float, float]:
    """Inner and outer angles (mrad) of the usual detectors for a probe of ``semiangle_mrad``.

    ``bf``: 0 .. alpha; ``abf``: alpha / 2 .. alpha; ``adf``: alpha .. edge; ``haadf``: max(3 alpha, 50
    mrad) .. edge, where the edge is ``max_angle_mrad`` (the largest angle the detector records).
    """
    alpha = float(semiangle_mrad)
    table = {
        "bf": (0.0, alpha),
        "abf": (0.5 * alpha, alpha),
        "adf": (alpha, max_angle_mrad),
        "haadf": (max(3.0 * alpha, 50.0), max_angle_mrad),
    }
    if kind not in table:
        raise ValueError(f"unknown detector {kind!r}; known: {', '.join(table)}")
    return table[kind]


def scan_detector_angles_mrad(
    detector_shape: Sequence[int],
    k_pixel_invA: float | Sequence[float],
    energy_eV: float,
    semiangle_mrad: float,
    kind: str = "adf",
    inner_mrad: float | None = None,
    outer_mrad: float | None = None,
) -> tuple[float, float]:
    """Inner and outer angles (mrad) of ``kind`` (:func:`detector_angles_mrad`) on a detector of
    ``detector_shape`` pixels, whose edge is half its smaller side; ``inner_mrad`` / ``outer_mrad``
    replace them when given (``reconstruct.py method=vadf``, every engine)."""
    k_pixel = pair(k_pixel_invA, "k_pixel_invA")
    kx, ky = (int(n) for n in detector_shape)
    edge_mrad = 1e3 * wavelength(energy_eV) * min(kx * k_pixel[0], ky * k_pixel[1]) / 2
    inner, outer = detector_angles_mrad(kind, semiangle_mrad, edge_mrad)
    return (
        float(inner_mrad) if inner_mrad is not None else inner,
        float(outer_mrad) if outer_mrad is not None else outer,
    )


def annulus_weights(
    detector_shape: Sequence[int],
    k_pixel_invA: float | Sequence[float],
    energy_eV: float,
    inner_mrad: float,
    outer_mrad: float,
    centre_px: Sequence[float],
) -> np.ndarray:
    """float32 mask ``(Kx, Ky)`` of the pixels with ``inner_mrad <= theta < outer_mrad`` about
    ``centre_px`` (``theta = lambda |k|``): the virtual detector of :func:`virtual_detector` and of every
    engine. ValueError when no pixel lies in the annulus."""
    kx, ky = (int(n) for n in detector_shape)
    k_pixel = pair(k_pixel_invA, "k_pixel_invA")
    centre = np.asarray(centre_px, dtype=np.float64)
    lam = wavelength(energy_eV)
    qx = (np.arange(kx) - centre[0]) * k_pixel[0]
    qy = (np.arange(ky) - centre[1]) * k_pixel[1]
    theta_mrad = 1e3 * lam * np.hypot(qx[:, None], qy[None, :])
    mask = (theta_mrad >= inner_mrad) & (theta_mrad < outer_mrad)
    if not mask.any():
        raise ValueError(
            f"virtual_detector: no detector pixel between {inner_mrad} and {outer_mrad} mrad "
            f"(the detector records up to {theta_mrad.max():.1f} mrad)"
        )
    return mask.astype(np.float32)


def virtual_detector(
    data: Any,
    k_pixel_invA: float | Sequence[float],
    energy_eV: float,
    inner_mrad: float,
    outer_mrad: float,
    scan_step_A: float | Sequence[float] = 1.0,
    centre_px: Sequence[float] | None = None,
    progress: bool = True,
) -> Reconstruction:
    """Sum of each CBED over the annulus ``inner_mrad <= theta < outer_mrad`` (angles from the disc centre).

    The centre defaults to the centre of mass of the position-averaged pattern. Scattering angle
    ``theta = lambda |k|``. The image (counts, or fraction of the beam for normalised data) is on the scan
    grid: pixel = scan step, origin = first probe position.
    """
    rx, ry, kx, ky = check_scan_array(data, minimum_scan=1)
    if not 0 <= inner_mrad < outer_mrad:
        raise ValueError(f"virtual_detector: need 0 <= inner < outer, got {inner_mrad}, {outer_mrad} mrad")
    centre = np.asarray(centre_px, dtype=np.float64) if centre_px is not None else None
    if centre is None:
        centre = pattern_centre(mean_pattern(data, progress=progress))
    weights = annulus_weights((kx, ky), k_pixel_invA, energy_eV, inner_mrad, outer_mrad, centre).ravel()
    image = np.empty((rx, ry))
    for rows, block in iter_scan_rows(data, desc="virtual detector", progress=progress):
        image[rows] = block.reshape(*block.shape[:2], -1) @ weights
    return Reconstruction(
        phase=image.astype(np.float32),
        pixel_size_A=pair(scan_step_A, "scan_step_A"),
        origin_A=(0.0, 0.0),
        method="vadf",
        info={"inner_mrad": float(inner_mrad), "outer_mrad": float(outer_mrad), "centre_px": centre.tolist()},
    )
