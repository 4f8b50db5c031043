"""``reconstruct.py engine=libertem``: the per-pattern part of a method as a LiberTEM UDF.

LiberTEM (the ``libertem`` extra, imported only here and only when this engine runs) partitions a scan over
its navigation axes and runs a UDF on each partition, on its inline executor (this process,
``engine_workers=null``), on a local Dask cluster of ``engine_workers`` single-threaded workers, or on an
existing Dask cluster (``engine_scheduler=tcp://HOST:PORT``, e.g. one started by dask-jobqueue on SLURM).
The UDFs compute only what is independent per pattern, with deepstem's own per-pattern physics; the rest is
the local engine's code, so the results equal ``engine=local``:

* ``icom``, ``ricom``: the centre of mass of every frame (:class:`CentreOfMassUDF`, as
  :func:`evaluation.references.centre_of_mass`), then :func:`evaluation.references.icom_from_com` /
  :func:`evaluation.references.ricom_from_com`.
* ``vadf``: the mean pattern (:class:`FrameSumUDF`) fixes the disc centre, then the sum of every frame
  over :func:`evaluation.references.annulus_weights` (:class:`AnnulusUDF`).
* ``ssb``: the mean pattern fixes the bright-field disc; :class:`SSBTransformUDF` transforms the
  bright-field pixels of every frame along the scan rows (the smoothly extended DFT over ``y``, one matrix
  product per row of a tile, so partitions that split rows and tiles that split frames add up) into a
  ``single`` buffer ``(Rx, Ny, M)`` merged by addition; the merged buffer is extended and FFT'd along
  ``x`` as the local engine does, and :func:`evaluation.references.ssb.ssb_from_spectrum` (the local
  engine's own post-transform code) finishes. Memory: every partition holds and returns a buffer of the
  size of the whole half-transformed bright-field stack (``Rx * Ny * M`` complex64, ``M`` bright-field
  pixels, ``Ny`` the padded row length); the main process then holds it and the ``Nx * Ny * M`` spectrum:
  ``O(N)`` in scan positions like local SSB, but times the number of partitions in transfer.
* ``ptychonn``: :class:`PtychoNNUDF` resamples, normalises and predicts every frame of a partition in
  batches and adds the weighted patches into object-grid sums (one buffer per partition, merged by
  addition); placement, weights and normalisation are :class:`evaluation.networks.PtychoNNPlacement`'s.
* ``airpi``, ``chang_unet``: each position needs its neighbours (AIRPI's 3x3 kernels and data repetition,
  the Chang U-Net's least-squares offsets of overlapping patches), which a partition does not hold, so
  only the per-frame part is distributed: :class:`ResampleUDF` resamples every frame onto the network grid
  with the local engine's own pattern stream (a ``nav`` buffer); the local reconstruction
  (:func:`evaluation.networks.airpi_reconstruct`, :func:`evaluation.networks.chang_reconstruct`) then runs
  on the resampled stack in this process: kernels, network in row blocks, placement, stitching, trust map
  (:func:`_streamed_reconstructor`). Memory: the stack, ``Rx * Ry * K * K`` float32.

Not offered (:data:`UNSUPPORTED`, one error naming ``engine=local``): ``epie`` iterates over all positions
updating one object and probe.

A deepstem.4dstem/1 or EMD 1.0 file reaches LiberTEM through its HDF5 reader on the file's 4D dataset
(``data``, ``(Rx, Ry, Kx, Ky)``), a file that :func:`evaluation.io.load_4dstem` reads through a LiberTEM
reader (.raw with its shape in the calibration YAML, EMPAD .xml, ...) through that reader on the file; other
inputs (.npy, .mib through RosettaSciIO, ...) as a memory dataset of the loaded scan. On a cluster of other
machines the file must be readable at the same path on the workers (a shared filesystem); a memory dataset
and the network travel to the workers pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import scipy.fft

from evaluation.references import (
    Reconstruction,
    annulus_weights,
    icom_from_com,
    ricom_from_com,
    scan_detector_angles_mrad,
)
from evaluation.references._common import check_scan_array, pair, pattern_centre, smooth_periodic_extension

__all__ = [
    "LIBERTEM_METHODS",
    "UNSUPPORTED",
    "ShapeOnly",
    "libertem_context",
    "load_dataset",
    "resampled_stream",
    "run_libertem",
    "udf_classes",
    "unsupported_message",
]

#: methods engine=libertem runs
LIBERTEM_METHODS = ("icom", "ricom", "vadf", "ssb", "ptychonn", "airpi", "chang_unet")
#: method -> why engine=libertem does not run it
UNSUPPORTED = {
    "epie": "it iterates over all positions, updating one object and probe (sequential, not per frame)",
}
#: seconds to wait for engine_scheduler to answer
CONNECT_TIMEOUT_S = 20
MISSING = "engine=libertem needs LiberTEM: pip install -e '.[libertem]' (the libertem extra)"


def unsupported_message(method: str) -> str | None:
    """The one-line refusal for a method engine=libertem does not run, or None when it runs it."""
    if method in LIBERTEM_METHODS:
        return None
    why = UNSUPPORTED.get(method, "it is not a 4D-STEM method with a per-frame part")
    return f"method={method} does not run on engine=libertem: {why}; use engine=local"


def _libertem() -> Any:
    """``libertem.api`` (RuntimeError naming the extra when LiberTEM is not installed)."""
    try:
        import libertem.api as api
    except ImportError as err:
        raise RuntimeError(f"{MISSING} ({err})") from None
    return api


def _check_workers(workers: Any) -> int | None:
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or int(workers) < 1:
        raise ValueError(f"engine_workers must be null (inline) or a whole number >= 1, got {workers!r}")
    return int(workers)


def _check_scheduler(scheduler: Any) -> str | None:
    if scheduler is None or scheduler == "":
        return None
    text = str(scheduler)
    if "://" not in text or not text.split("://", 1)[1]:
        raise ValueError(f"engine_scheduler must be tcp://HOST:PORT of a Dask scheduler, got {scheduler!r}")
    return text


@contextlib.contextmanager
def libertem_context(workers: Any = None, scheduler: Any = None) -> Iterator[Any]:
    """A ``libertem.api.Context``: on ``scheduler`` (tcp://HOST:PORT) when given, else on a local Dask
    cluster of ``workers`` single-threaded CPU workers, else on the inline executor; closed on exit (a
    connected scheduler keeps running)."""
    workers = _check_workers(workers)
    scheduler = _check_scheduler(scheduler)
    if workers is not None and scheduler is not None:
        raise ValueError("give engine_workers or engine_scheduler, not both")
    api = _libertem()
    quiet = _quiet_loggers()
    try:
        if scheduler is not None:
            from libertem.executor.dask import DaskJobExecutor

            try:
                executor = DaskJobExecutor.connect(scheduler, client_kwargs={"timeout": CONNECT_TIMEOUT_S})
            except (OSError, TimeoutError) as err:
                raise RuntimeError(f"engine_scheduler={scheduler}: cannot connect ({err})") from None
            ctx = api.Context(executor=executor)
        elif workers is not None:
            ctx = api.Context.make_with("dask", cpus=workers, gpus=0)
        else:
            ctx = api.Context.make_with("inline")
        try:
            yield ctx
        finally:
            ctx.close()
    finally:
        for logger, level in quiet.items():
            logger.setLevel(level)


def _quiet_loggers() -> dict[logging.Logger, int]:
    """Raise Dask's and LiberTEM's loggers to WARNING (Hydra logs INFO: dozens of lines per cluster start and
    stop); returns the previous levels."""
    previous = {}
    for name in ("distributed", "libertem"):
        logger = logging.getLogger(name)
        previous[logger] = logger.level
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    return previous


def load_dataset(ctx: Any, data: Any, partitions: int | None = None) -> Any:
    """``data`` ``(Rx, Ry, Kx, Ky)`` as a LiberTEM dataset: an ``h5py.Dataset`` through LiberTEM's HDF5
    reader on its file and path, an :class:`evaluation.io.LiberTEMArray` (.raw, EMPAD, ...) through its
    LiberTEM reader on its file, anything else as a memory dataset (read whole into memory).
    ``partitions``: at least that many partitions (None: LiberTEM's choice)."""
    check_scan_array(data, minimum_scan=1)
    import h5py

    from evaluation.io import LiberTEMArray

    if isinstance(data, LiberTEMArray):  # a file read through a LiberTEM reader: that reader on the file
        extra = {} if partitions is None else {"num_partitions": int(partitions)}
        return ctx.load(data.kind, path=str(data.path), **data.options, **extra)
    options = {} if partitions is None else {"min_num_partitions": int(partitions)}
    if isinstance(data, h5py.Dataset):
        return ctx.load("hdf5", path=str(data.file.filename), ds_path=data.name, **options)
    array = np.ascontiguousarray(np.asarray(data))
    memory = {} if partitions is None else {"num_partitions": int(partitions)}
    return ctx.load("memory", data=array, sig_dims=2, **memory)


# ------------------------------------------------------------------------------------------------------
# UDFs (defined on first use: their base class is LiberTEM's)

_UDFS: dict[str, type] = {}


def udf_classes() -> dict[str, type]:
    """The UDF classes, created once LiberTEM is importable."""
    if _UDFS:
        return _UDFS
    _libertem()
    from libertem.udf import UDF

    def sig_slices(udf: Any) -> tuple[slice, slice]:
        """The detector rows and columns of the current tile (LiberTEM may split frames into tiles)."""
        return tuple(udf.meta.slice.get(sig_only=True))  # type: ignore[return-value]

    class FrameSumUDF(UDF):
        """Sum of all frames (float64), for the mean pattern."""

        def get_result_buffers(self) -> dict[str, Any]:
            return {"total": self.buffer(kind="sig", dtype=np.float64)}

        def process_tile(self, tile: np.ndarray) -> None:
            self.results.total[:] += np.asarray(tile, dtype=np.float32).sum(axis=0, dtype=np.float64)

        def merge(self, dest: Any, src: Any) -> None:
            dest.total[:] += src.total

    class CentreOfMassUDF(UDF):
        """First moments (1/A, detector frame) and counts of every frame, summed over its tiles."""

        def __init__(self, k_pixel_invA: tuple[float, float]) -> None:
            super().__init__(k_pixel_invA=k_pixel_invA)

        def get_result_buffers(self) -> dict[str, Any]:
            return {
                "moment": self.buffer(kind="nav", extra_shape=(2,), dtype=np.float64),
                "total": self.buffer(kind="nav", dtype=np.float64),
            }

        def process_tile(self, tile: np.ndarray) -> None:
            block = np.asarray(tile, dtype=np.float32)
            rows, cols = sig_slices(self)
            k_pixel = self.params.k_pixel_invA
            ix = np.arange(rows.start, rows.stop, dtype=np.float64) * k_pixel[0]
            iy = np.arange(cols.start, cols.stop, dtype=np.float64) * k_pixel[1]
            self.results.moment[:, 0] += np.einsum("aij,i->a", block, ix, dtype=np.float64)
            self.results.moment[:, 1] += np.einsum("aij,j->a", block, iy, dtype=np.float64)
            self.results.total[:] += block.sum(axis=(1, 2), dtype=np.float64)

    class AnnulusUDF(UDF):
        """Sum of every frame over a float32 detector mask, summed over its tiles."""

        def __init__(self, weights: np.ndarray) -> None:
            super().__init__(weights=weights)

        def get_result_buffers(self) -> dict[str, Any]:
            return {"image": self.buffer(kind="nav", dtype=np.float64)}

        def process_tile(self, tile: np.ndarray) -> None:
            block = np.asarray(tile, dtype=np.float32)
            rows, cols = sig_slices(self)
            weights = np.ascontiguousarray(np.asarray(self.params.weights, dtype=np.float32)[rows, cols])
            self.results.image[:] += block.reshape(block.shape[0], -1) @ weights.ravel()

    class PtychoNNUDF(UDF):
        """PtychoNN on every frame of a tile (whole frames), the weighted patches summed on the object
        grid (one sum per partition, merged by addition)."""

        def __init__(self, placement: Any, predictor: Any, batch_size: int) -> None:
            super().__init__(placement=placement, predictor=predictor, batch_size=batch_size)

        def get_tiling_preferences(self) -> dict[str, Any]:
            return {"depth": int(self.params.batch_size), "total_size": self.TILE_SIZE_MAX}

        def get_result_buffers(self) -> dict[str, Any]:
            grid = self.params.placement.grid
            size = grid.shape[0] * grid.shape[1]
            return {
                "complex_sum": self.buffer(kind="single", extra_shape=(size, 2), dtype=np.float32),
                "amplitude_sum": self.buffer(kind="single", extra_shape=(size,), dtype=np.float32),
                "consistency": self.buffer(kind="nav", dtype=np.float32),  # the trust map (issue 17.4)
            }

        def process_tile(self, tile: np.ndarray) -> None:
            import torch

            plan = self.params.placement
            if tuple(tile.shape[1:]) != tuple(plan.geometry.shape[2:]):
                raise RuntimeError(
                    f"engine=libertem ptychonn needs whole frames per tile, got {tuple(tile.shape[1:])} of "
                    f"{tuple(plan.geometry.shape[2:])} (the file's HDF5 chunks split the patterns)"
                )
            device = torch.device("cpu")
            stream = plan.stream(device)
            complex_sum, amplitude_sum = plan.accumulators(device)
            coordinates = np.asarray(self.meta.coordinates).reshape(-1, 2)
            batch = int(self.params.batch_size)
            for start in range(0, len(coordinates), batch):
                stop = min(len(coordinates), start + batch)
                cbed = stream._resample(np.asarray(tile[start:stop], dtype=np.float32))
                e, c = coordinates[start:stop, 0], coordinates[start:stop, 1]
                trust = plan.place_batch(self.params.predictor, cbed, e, c, complex_sum, amplitude_sum)
                if trust is not None:
                    self.results.consistency[start:stop] = trust.numpy()
            self.results.complex_sum[:] += complex_sum.numpy()
            self.results.amplitude_sum[:] += amplitude_sum.numpy()

        def merge(self, dest: Any, src: Any) -> None:
            dest.complex_sum[:] += src.complex_sum
            dest.amplitude_sum[:] += src.amplitude_sum
            dest.consistency[:] = src.consistency  # a nav buffer: this partition's positions

    class SSBTransformUDF(UDF):
        """SSB's scan transform along the fast scan axis: for every scan row ``x`` of the partition, the
        (smoothly extended) DFT over the row's positions ``y`` of the bright-field pixels,
        ``H[x, Qy, k] = sum_y E[Qy, y] I(x, y, k)`` (``E``: DFT of the extension, ``(Ny, Ry)``), as one matrix
        product per row and tile (partial rows and detector tiles add up). Buffer ``(Rx, Ny, M)`` complex64,
        ``kind="single"``: every partition holds and returns one of the size of the whole half-transformed
        bright-field stack, merged by addition (rows of other partitions are zero)."""

        def __init__(self, bf_index: np.ndarray, row_transform: np.ndarray, rows: int) -> None:
            super().__init__(bf_index=bf_index, row_transform=row_transform, rows=rows)

        def get_result_buffers(self) -> dict[str, Any]:
            ny = self.params.row_transform.shape[0]
            size = int(np.count_nonzero(self.params.bf_index >= 0))
            return {
                "half": self.buffer(
                    kind="single", extra_shape=(self.params.rows, ny, size), dtype=np.complex64
                )
            }

        def process_tile(self, tile: np.ndarray) -> None:
            rows, cols = sig_slices(self)
            index = np.asarray(self.params.bf_index)[rows, cols]
            inside = index >= 0
            if not inside.any():
                return
            values = np.asarray(tile, dtype=np.float32)[:, inside]  # (frames, bright-field pixels here)
            where = index[inside]
            if where[-1] - where[0] + 1 == len(where):  # contiguous in the C order of the disc
                where = slice(int(where[0]), int(where[-1]) + 1)
            transform = np.asarray(self.params.row_transform)
            coordinates = np.asarray(self.meta.coordinates).reshape(-1, 2)
            half = self.results.half
            for x in np.unique(coordinates[:, 0]):
                mine = coordinates[:, 0] == x
                half[int(x)][:, where] += transform[:, coordinates[mine, 1]] @ values[mine]

        def merge(self, dest: Any, src: Any) -> None:
            dest.half[:] += src.half

    class ResampleUDF(UDF):
        """Every frame resampled onto a network's input grid by a local engine's pattern stream
        (:class:`evaluation.networks.geometry._PatternStream`: detector -> network grid, transpose,
        rotation onto the scan frame): a ``nav`` buffer ``(K, K)`` float32 per position. Needs whole frames
        per tile."""

        def __init__(self, stream: Any) -> None:
            super().__init__(stream=stream)

        def get_tiling_preferences(self) -> dict[str, Any]:
            return {"depth": 64, "total_size": self.TILE_SIZE_MAX}

        def get_result_buffers(self) -> dict[str, Any]:
            k = int(self.params.stream.pixels)
            return {"patterns": self.buffer(kind="nav", extra_shape=(k, k), dtype=np.float32)}

        def process_tile(self, tile: np.ndarray) -> None:
            stream = self.params.stream
            if tuple(tile.shape[1:]) != tuple(stream.geometry.shape[2:]):
                raise RuntimeError(
                    f"engine=libertem needs whole frames per tile, got {tuple(tile.shape[1:])} of "
                    f"{tuple(stream.geometry.shape[2:])} (the file's HDF5 chunks split the patterns)"
                )
            self.results.patterns[:] = stream._resample(np.asarray(tile, dtype=np.float32)).cpu().numpy()

    _UDFS.update(
        resample=ResampleUDF,
        ssb=SSBTransformUDF,
        frame_sum=FrameSumUDF,
        com=CentreOfMassUDF,
        annulus=AnnulusUDF,
        ptychonn=PtychoNNUDF,
    )
    return _UDFS


def _run(ctx: Any, dataset: Any, udf: Any) -> dict[str, np.ndarray]:
    results = ctx.run_udf(dataset=dataset, udf=udf, progress=False)
    return {key: np.asarray(value.data) for key, value in results.items()}


def _mean_pattern(ctx: Any, dataset: Any, shape: tuple[int, int, int, int]) -> np.ndarray:
    total = _run(ctx, dataset, udf_classes()["frame_sum"]())["total"]
    return total / (shape[0] * shape[1])


class ShapeOnly:
    """Stands in for a scan's data where only its shape is needed (keeps a placement picklable)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(n) for n in shape)


def resampled_stream(stream: Any, stack: np.ndarray) -> Any:
    """A copy of ``stream`` (an :class:`evaluation.networks.geometry._PatternStream`) over ``stack``
    ``(Rx, Ry, K, K)``, patterns already resampled onto its network grid (by :class:`ResampleUDF` on the
    workers, or as frames arrive: :mod:`evaluation.engines.live`): nothing is resampled again."""
    from evaluation.networks.geometry import _PatternStream

    class ResampledStream(_PatternStream):
        def __init__(self) -> None:
            self.__dict__.update(stream.__dict__)
            self.geometry = dataclasses.replace(stream.geometry, data=stack)

        def _resample(self, block: np.ndarray) -> Any:
            import torch

            return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(self.device)

    return ResampledStream()


# ------------------------------------------------------------------------------------------------------
# Methods


def _com_field(ctx: Any, dataset: Any, scan: Any) -> np.ndarray:
    rx, ry = scan.data.shape[:2]
    out = _run(ctx, dataset, udf_classes()["com"](pair(scan.k_pixel_invA, "k_pixel_invA")))
    total = out["total"].reshape(rx, ry)
    if np.any(total <= 0):
        raise ValueError("some diffraction patterns hold no counts; the centre of mass is undefined")
    com = out["moment"].reshape(rx, ry, 2) / total[..., None]
    return com - com.mean(axis=(0, 1))


def _vadf(ctx: Any, dataset: Any, scan: Any, params: Mapping[str, Any]) -> Reconstruction:
    shape = tuple(int(n) for n in scan.data.shape)
    kind = params.get("detector", "adf")
    inner, outer = scan_detector_angles_mrad(
        shape[2:], scan.k_pixel_invA, scan.energy_eV, scan.semiangle_mrad, kind,
        params.get("inner_mrad"), params.get("outer_mrad"),
    )  # fmt: skip
    if not 0 <= inner < outer:
        raise ValueError(f"virtual_detector: need 0 <= inner < outer, got {inner}, {outer} mrad")
    centre = pattern_centre(_mean_pattern(ctx, dataset, shape))  # type: ignore[arg-type]
    weights = annulus_weights(shape[2:], scan.k_pixel_invA, scan.energy_eV, inner, outer, centre)
    image = _run(ctx, dataset, udf_classes()["annulus"](weights))["image"].reshape(shape[:2])
    return Reconstruction(
        phase=image.astype(np.float32),
        pixel_size_A=pair(scan.scan_step_A, "scan_step_A"),
        origin_A=(0.0, 0.0),
        method="vadf",
        info={
            "inner_mrad": float(inner), "outer_mrad": float(outer), "centre_px": centre.tolist(),
            "detector": kind,
        },
    )  # fmt: skip


def _extended_dft(n: int, size: int) -> np.ndarray:
    """``(size, n)`` complex: the FFT of length ``size`` of :func:`smooth_periodic_extension` of ``n``
    samples (the DFT matrix when ``size == n``), the linear map SSB's scan transform applies per axis."""
    extension = smooth_periodic_extension(np.eye(n), (size,))
    return np.fft.fft(extension, axis=0)


def _ssb(ctx: Any, dataset: Any, scan: Any, params: Mapping[str, Any], progress: bool) -> Reconstruction:
    """SSB: the mean pattern (:class:`FrameSumUDF`) fixes the disc, :class:`SSBTransformUDF` transforms the
    bright-field pixels along the scan rows in the partitions, the merged result is transformed along the
    slow scan axis (smooth extension + FFT, as the local engine) and :func:`ssb_from_spectrum` finishes.
    Memory: the UDF buffer is ``Rx * Ny * M`` complex64 (``M`` bright-field pixels, ``Ny`` the padded row
    length) in every partition and in the merge, then the ``Nx * Ny * M`` spectrum: ``O(N)`` in scan
    positions, as the local engine's bright-field stack and spectrum."""
    from evaluation.references.ssb import (
        check_ssb_memory,
        ssb_from_spectrum,
        ssb_geometry,
        ssb_intensity_scale,
    )

    options = dict(params)
    boundary = options.pop("boundary", "smooth")
    pad_fraction = options.pop("pad_fraction", 0.25)
    memory_limit_GB = options.pop("memory_limit_GB", None)
    known = {"aberration_compensation", "normalize", "q_chunk", "aberrations"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"ssb: unknown option(s) {', '.join(unknown)}")
    shape = tuple(int(n) for n in scan.data.shape)
    mean = _mean_pattern(ctx, dataset, shape)  # type: ignore[arg-type]
    geometry = ssb_geometry(
        shape, pattern_centre(mean), scan.energy_eV, scan.semiangle_mrad, scan.scan_step_A, scan.k_pixel_invA,
        scan.scan_rotation_deg, scan.scan_transpose, boundary, pad_fraction,
    )  # fmt: skip
    scale = ssb_intensity_scale(mean[geometry.in_disc], geometry)
    bf_index = np.full(geometry.in_disc.shape, -1, dtype=np.int64)
    bf_index[geometry.in_disc] = np.arange(int(geometry.in_disc.sum()))
    (rx, ry), (nx, ny) = geometry.scan_shape, geometry.fft_shape
    bright = int(geometry.in_disc.sum())
    # this process: the merge buffer and one partition's (Rx Ny M complex64 each), then the extended stack
    # and its in-place transform (Nx Ny M complex64, twice while extending); workers hold Rx Ny M each
    check_ssb_memory(8 * bright * (2 * rx * ny + 2 * nx * ny), geometry, memory_limit_GB)
    row_transform = _extended_dft(ry, ny).astype(np.complex64)
    half = _run(ctx, dataset, udf_classes()["ssb"](bf_index, row_transform, rx))["half"]
    if nx > rx:
        half = smooth_periodic_extension(half, (nx,))
    spectrum = scipy.fft.fft(half, axis=0, overwrite_x=True).reshape(nx * ny, -1)  # complex64
    del half
    spectrum /= np.float32(scale)
    return ssb_from_spectrum(spectrum, geometry, scan.defocus_A, scan.Cs_A, progress=progress, **options)


def _ptychonn_reconstructor(ctx: Any, dataset: Any) -> Any:
    """A reconstructor for :func:`evaluation.networks.reconstruct_with_network` that runs the predictor
    in :class:`PtychoNNUDF` and stitches with the local engine's placement."""
    from evaluation.networks import ptychonn_placement

    def reconstruct(
        scan: Any,
        predictor: Any,
        *,
        device: Any = "cpu",
        progress: bool = True,
        crop_to_scan: bool = True,
        unwrap_phase: bool = True,
        batch_size: int = 256,
        detector_centre_px: Any = None,
        block_rows: int | None = None,
        **options: Any,
    ) -> Reconstruction:
        start = time.perf_counter()
        shape = tuple(int(n) for n in scan.data.shape)
        check_scan_array(scan.data)
        if detector_centre_px is None:  # the mean CBED's centre of mass, as the local engine finds it
            detector_centre_px = pattern_centre(_mean_pattern(ctx, dataset, shape))  # type: ignore[arg-type]
        plan = ptychonn_placement(scan, detector_centre_px=detector_centre_px, progress=progress, **options)
        geometry = plan.geometry
        plan.geometry = dataclasses.replace(geometry, data=ShapeOnly(shape))
        udf = udf_classes()["ptychonn"](plan, predictor, int(batch_size))
        out = _run(ctx, dataset, udf)
        elapsed = time.perf_counter() - start
        count = shape[0] * shape[1]
        trust = out["consistency"].reshape(shape[:2]) if plan.consistency else None
        return plan.finish(
            out["complex_sum"], out["amplitude_sum"], crop_to_scan, unwrap_phase, count / max(elapsed, 1e-9),
            trust,
        )  # fmt: skip

    return reconstruct


def _streamed_reconstructor(ctx: Any, dataset: Any, method: str) -> Any:
    """A reconstructor for :func:`evaluation.networks.reconstruct_with_network` that runs AIRPI's or the
    Chang U-Net's local reconstruction with its pattern stream fed by :class:`ResampleUDF`.

    The local reconstruction creates its :class:`evaluation.networks.geometry._PatternStream` (the network
    grid, ``gmax``, centre and rotation margin are decided there) through its ``stream_factory`` keyword;
    the factory given here creates the same stream, resamples every frame with it in :class:`ResampleUDF`
    (distributed) and hands back a stream over the resampled stack (no resampling left). The 3x3
    neighbourhoods (AIRPI), data repetition, the network in batches of row blocks, the placement,
    stitching and trust map are then the local code on the stack. Memory: the stack,
    ``Rx * Ry * K * K`` float32 in this process (``K`` the resampled grid: ``pixels`` for AIRPI,
    ``pixels * bin_factor`` for Chang), where the local engine holds a block of rows."""
    import importlib

    from evaluation.networks.geometry import _PatternStream

    module = importlib.import_module(f"evaluation.networks.{'airpi' if method == 'airpi' else 'chang'}")
    local = module.airpi_reconstruct if method == "airpi" else module.chang_reconstruct

    def reconstruct(scan: Any, predictor: Any, *, detector_centre_px: Any = None, **options: Any) -> Any:
        shape = tuple(int(n) for n in scan.data.shape)
        check_scan_array(scan.data)
        if detector_centre_px is None:  # the mean CBED's centre of mass, as the local engine finds it
            detector_centre_px = pattern_centre(_mean_pattern(ctx, dataset, shape))  # type: ignore[arg-type]
        made = []

        def stream_factory(geometry: Any, *args: Any, **kwargs: Any) -> Any:
            stream = _PatternStream(dataclasses.replace(geometry, data=ShapeOnly(shape)), *args, **kwargs)
            k = int(stream.pixels)
            stack = _run(ctx, dataset, udf_classes()["resample"](stream))["patterns"]
            made.append(k)
            return resampled_stream(stream, stack.reshape(shape[0], shape[1], k, k))

        result = local(
            scan, predictor, detector_centre_px=detector_centre_px, stream_factory=stream_factory, **options
        )
        if len(made) != 1:
            raise RuntimeError(f"engine=libertem {method}: the local reconstruction made {len(made)} streams")
        return result

    return reconstruct


def run_libertem(
    scan: Any,
    method: str,
    params: Mapping[str, Any],
    *,
    workers: Any = None,
    scheduler: Any = None,
    ctx: Any = None,
    model: Any = None,
    precision: str = "auto",
    channels_last: bool = True,
    progress: bool = True,
    partitions: int | None = None,
) -> Reconstruction:
    """Run ``method`` on ``scan`` (an :class:`evaluation.io.Scan4D`) with ``engine=libertem``.

    ``ctx``: a ``libertem.api.Context`` to use (kept open); else one made by :func:`libertem_context` from
    ``workers`` / ``scheduler`` and closed afterwards. ``model``: the loaded network of ``ptychonn``.
    ``partitions``: at least that many LiberTEM partitions (None: LiberTEM's choice). ValueError for a
    method this engine does not run (:func:`unsupported_message`), RuntimeError without LiberTEM.
    """
    message = unsupported_message(method)
    if message is not None:
        raise ValueError(message)
    if ctx is None:
        with libertem_context(workers, scheduler) as own:
            return run_libertem(
                scan, method, params, ctx=own, model=model, precision=precision, channels_last=channels_last,
                progress=progress, partitions=partitions,
            )  # fmt: skip
    check_scan_array(scan.data)
    dataset = load_dataset(ctx, scan.data, partitions)
    result = _dispatch(ctx, dataset, scan, method, dict(params), model, precision, channels_last, progress)
    result.info["engine"] = "libertem"
    result.info["engine_executor"] = type(ctx.executor).__name__
    return result


def _dispatch(
    ctx: Any,
    dataset: Any,
    scan: Any,
    method: str,
    params: dict[str, Any],
    model: Any,
    precision: str,
    channels_last: bool,
    progress: bool,
) -> Reconstruction:
    """One method on a loaded LiberTEM dataset (see :func:`run_libertem`)."""
    common = {"scan_rotation_deg": scan.scan_rotation_deg, "transpose": scan.scan_transpose}
    if method == "icom":
        return icom_from_com(
            _com_field(ctx, dataset, scan), scan.scan_step_A, **common,
            estimate_rotation=bool(params.get("estimate_rotation", False)),
            boundary=str(params.get("boundary", "mirror")),
        )  # fmt: skip
    if method == "ricom":
        band = params.get("band_pass_invA")
        return ricom_from_com(
            _com_field(ctx, dataset, scan), scan.scan_step_A, int(params.get("kernel_size", 21)),
            tuple(band) if band else None, **common,
        )  # fmt: skip
    if method == "vadf":
        return _vadf(ctx, dataset, scan, params)
    if method == "ssb":
        return _ssb(ctx, dataset, scan, params, progress)
    from evaluation.networks import reconstruct_with_network

    if model is None:
        raise ValueError(f"method {method!r} needs a network checkpoint: give ckpt=PATH")
    if method == "ptychonn":
        reconstructor = _ptychonn_reconstructor(ctx, dataset)
    else:
        reconstructor = _streamed_reconstructor(ctx, dataset, method)
    return reconstruct_with_network(
        scan, method, model, params, device="cpu", progress=progress, precision=precision,
        channels_last=channels_last, reconstructor=reconstructor,
    )  # fmt: skip
