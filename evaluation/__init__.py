"""Reconstruction and evaluation of 4D-STEM scans.

* :mod:`evaluation.io`: read/write scans with calibration (deepstem.4dstem/1, EMD 1.0, RosettaSciIO,
  .npy + YAML), lazily.
* :mod:`evaluation.references`: ePIE, SSB, iCOM/iDPC, riCOM, virtual detectors.
* :mod:`evaluation.frc`, :mod:`evaluation.metrics`: Fourier ring correlation and resolution; xc, PSNR,
  SSIM; both register and crop with :mod:`evaluation.align`.
* :mod:`evaluation.cli`: the body of ``python reconstruct.py``.
"""
