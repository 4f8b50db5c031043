"""Conventional references: ePIE, SSB, iCOM/iDPC (with scan-rotation estimation), riCOM, virtual detectors.

Every function takes a 4D scan ``data`` indexed ``[Rx, Ry, Kx, Ky]`` (a NumPy array, ``np.memmap`` or
``h5py.Dataset``; it is read in blocks of scan rows) plus its calibration, and returns a
:class:`Reconstruction`. Geometry conventions are in :mod:`evaluation.references._common`.
"""

from evaluation.references._common import Reconstruction
from evaluation.references.com import (
    centre_of_mass,
    estimate_scan_rotation,
    icom,
    icom_from_com,
    integrate_gradient,
    ricom,
    ricom_from_com,
    ricom_kernel,
)
from evaluation.references.epie import epie
from evaluation.references.ssb import ssb
from evaluation.references.vdet import (
    annulus_weights,
    detector_angles_mrad,
    scan_detector_angles_mrad,
    virtual_detector,
)

__all__ = [
    "Reconstruction",
    "annulus_weights",
    "centre_of_mass",
    "detector_angles_mrad",
    "epie",
    "estimate_scan_rotation",
    "icom",
    "icom_from_com",
    "integrate_gradient",
    "ricom",
    "ricom_from_com",
    "ricom_kernel",
    "scan_detector_angles_mrad",
    "ssb",
    "virtual_detector",
]
