"""Reconstruction and evaluation of 4D-STEM scans.

* :mod:`evaluation.io`: read/write scans with calibration (deepstem.4dstem/1, EMD 1.0, RosettaSciIO,
  .npy + YAML), lazily.
* :mod:`evaluation.references`: ePIE, SSB, iCOM/iDPC, riCOM, virtual detectors.
* :mod:`evaluation.frc`, :mod:`evaluation.metrics`: Fourier ring correlation and resolution; xc, PSNR,
  SSIM; both register and crop with :mod:`evaluation.align`.
* :mod:`evaluation.networks`: network reconstructions (AIRPI, Chang U-Net, PtychoNN) from checkpoints.
* :mod:`evaluation.image_io`, :mod:`evaluation.restore`: 2D (HA)ADF images (.npy + YAML, .tif,
  deepstem.image/1, RosettaSciIO) restored by a CGRDN in overlapping tiles (``method=cgrdn``).
* :mod:`evaluation.suite`: the ``python evaluate.py`` benchmark (scans x doses x methods).
* :mod:`evaluation.cli`: the body of ``python reconstruct.py``.
"""
