"""``reconstruct.py engine=libertem_live``: reconstruct while the frames arrive from a detector.

LiberTEM-live (the ``live`` extra, PyPI ``libertem-live``; imported only here and only when this engine
runs) receives the frames of a Quantum Detectors Merlin (Medipix3) over its TCP data port and runs
LiberTEM UDFs on them as they arrive, on a pipelined executor of ``live.workers`` worker processes. The
UDFs are engine=libertem's (:func:`evaluation.engines.libertem.udf_classes`): for riCOM and iCOM its
``CentreOfMassUDF`` (the per-frame physics of :func:`evaluation.references.centre_of_mass`); every
``live.preview_every_rows`` completed scan rows the centre-of-mass field of the rows received so far is
integrated (:func:`evaluation.references.ricom_from_com` / :func:`evaluation.references.icom_from_com`)
and written as ``<output stem>_partial.h5`` (deepstem.recon/1, only the completed rows) and its preview
``<output stem>_partial.png``, both atomically (temporary file + rename), so a viewer never reads a half
written file. When the last frame has arrived the whole field gives the final reconstruction, which
:mod:`evaluation.cli` writes like ``engine=local`` does (it equals ``engine=local`` on the same frames).

Methods (:data:`LIVE_METHODS`): ``ricom`` and ``icom`` mean-subtract the COM field over the rows received
so far, so a partial image is the reconstruction of the partial scan, not a crop of the final one.
``airpi``: engine=libertem's ``ResampleUDF`` resamples every frame onto the network grid as it arrives;
every ``preview_every_rows`` rows the local AIRPI runs on the resampled rows received so far (its 3x3
kernels need each position's neighbours, so the newest row is a scan edge until the next arrives) and
the final pass is engine=local's AIRPI on all of them. AIRPI needs ``airpi.detector_centre_px`` (the
mean pattern that engine=local takes the centre from is known only after the scan) and does not stream
``data_repetition``. The whole-scan methods (ssb, epie) and the other networks are refused with one line.

Scan geometry: ``live.scan_shape: [Rx, Ry]`` is required (the Merlin stream carries frames, not a scan
shape). Frame ``k`` (0-based, in arrival order) lies at scan position ``(k // Ry, k % Ry)``: the second
index is the fast scan axis, as when reading a Merlin ``.mib`` with this navigation shape; a "scan row"
is one value of the first index. The detector's frame ``(rows, columns)`` is ``(Kx, Ky)``.

Connection: the Merlin control port (``live.control_port``, default 6341: the detector's size and counter
depth are read from it) and data port (``live.data_port``, 6342) on ``live.host``. Both are probed first
with a plain TCP connect of at most ``live.connect_timeout_s`` seconds, so an unreachable detector is one
error line instead of a hang. The acquisition is then awaited passively (the operator or the scan
software arms and triggers the detector) for at most ``live.timeout_s`` seconds.

A detector that stops mid-scan: LiberTEM-live's receiver waits for frames without a timeout, so its result
loop runs in a daemon thread (:func:`watched`) and the engine waits at most ``live.stall_timeout_s``
seconds for the result of each partition of the scan (:func:`rows_per_partition` rows). When none comes in
that time it raises :class:`LiveStallError` naming the rows reconstructed; the partial reconstruction
written so far stays on disk, and the receiver thread, its connection and the executor are abandoned
(closing the connection under the blocked receive fails; they end with the process, which
``reconstruct.py`` leaves at once, see :func:`receivers_abandoned`). LiberTEM's pipelined executor
collects a partition's result only after it has received the next partition's frames, and the first
result also waits for the workers to start, so ``stall_timeout_s`` must exceed twice the time one partition
takes at the detector's frame rate plus the start-up (measured on 2 cores: an 8 x 8 scan in partitions of
16 frames arriving at 10 frames/s gave its first result only after its last frame, 6.4 s after the first);
the default 60 s suits partitions that arrive in well under 20 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from evaluation.engines.libertem import ShapeOnly, resampled_stream, udf_classes
from evaluation.references import Reconstruction, icom_from_com, ricom_from_com

__all__ = [
    "LIVE_METHODS",
    "LiveSettings",
    "LiveStallError",
    "completed_rows",
    "live_context",
    "partial_path",
    "receivers_abandoned",
    "rows_per_partition",
    "run_live",
    "unsupported_message",
    "watched",
]

#: methods engine=libertem_live runs
LIVE_METHODS = ("ricom", "icom", "airpi")
#: method -> why engine=libertem_live does not run it
UNSUPPORTED = {
    "ssb": "its transform runs over the scan axes of the whole scan at once",
    "epie": "it iterates over all positions of the whole scan",
}
MISSING = "engine=libertem_live needs LiberTEM-live: pip install -e '.[live]' (the live extra)"


def unsupported_message(method: str) -> str | None:
    """The one-line refusal for a method engine=libertem_live does not run, or None when it runs it."""
    if method in LIVE_METHODS:
        return None
    why = UNSUPPORTED.get(method, "it has no streaming path")
    return (
        f"method={method} does not run on engine=libertem_live: {why}; live methods: "
        f"{', '.join(LIVE_METHODS)}"
    )


def _whole(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _seconds(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not np.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return number


@dataclass(frozen=True)
class LiveSettings:
    """The ``live:`` block of conf/reconstruct.yaml, checked.

    ``scan_shape`` ``(Rx, Ry)`` positions; ``preview_every_rows``: write the partial result every this many
    completed scan rows; ``timeout_s``: seconds to wait for the acquisition to start;
    ``connect_timeout_s``: seconds each port probe may take; ``stall_timeout_s``: seconds to wait for each
    partition of frames once the acquisition runs; ``workers``: LiberTEM worker processes.
    """

    scan_shape: tuple[int, int]
    host: str = "127.0.0.1"
    control_port: int = 6341
    data_port: int = 6342
    preview_every_rows: int = 8
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    stall_timeout_s: float = 60.0
    workers: int = 1

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> LiveSettings:
        """Check ``section`` (``cfg.live`` as a dict); ValueError naming the key for a bad value."""
        values = dict(section or {})
        shape = values.get("scan_shape")
        if shape is None:
            raise ValueError(
                "live.scan_shape is not set: give live.scan_shape=[Rx,Ry] (scan positions; the Merlin "
                "stream does not carry the scan shape)"
            )
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 2:
            raise ValueError(f"live.scan_shape must be [Rx, Ry], got {shape!r}")
        scan_shape = (_whole(shape[0], "live.scan_shape[0]", 3), _whole(shape[1], "live.scan_shape[1]", 3))
        host = values.get("host") or "127.0.0.1"
        ports = {}
        for key, default in (("control_port", 6341), ("data_port", 6342)):
            port = _whole(values.get(key, default), f"live.{key}", 1)
            if port > 65535:
                raise ValueError(f"live.{key} must be a TCP port 1..65535, got {port}")
            ports[key] = port
        return cls(
            scan_shape=scan_shape,
            host=str(host),
            preview_every_rows=_whole(values.get("preview_every_rows", 8), "live.preview_every_rows", 1),
            timeout_s=_seconds(values.get("timeout_s", 60.0), "live.timeout_s"),
            connect_timeout_s=_seconds(values.get("connect_timeout_s", 5.0), "live.connect_timeout_s"),
            stall_timeout_s=_seconds(values.get("stall_timeout_s", 60.0), "live.stall_timeout_s"),
            workers=_whole(values.get("workers", 1), "live.workers", 1),
            **ports,
        )


class LiveStallError(RuntimeError):
    """The detector stopped sending frames mid-scan (no partition within ``live.stall_timeout_s``)."""


_Item = TypeVar("_Item")
#: receiver threads that :func:`watched` abandoned on a stall (still blocked in this process)
_abandoned = {"threads": 0}


def receivers_abandoned() -> int:
    """How many stalled receiver threads this process holds. They are blocked in LiberTEM-live's native
    receive, which fails loudly when the interpreter shuts down under it, so an entry point that saw one
    flushes its output and leaves with ``os._exit`` (as ``reconstruct.py`` does)."""
    return _abandoned["threads"]


def watched(
    items: Iterable[_Item], timeout_s: float, stalled: Callable[[float], Exception]
) -> Iterator[_Item]:
    """Iterate ``items`` in a daemon thread and yield each item here, failing with ``stalled(timeout_s)``
    when the next one takes longer than ``timeout_s`` seconds to come.

    The thread hands over one item at a time and waits until the caller asks for the next before it
    advances ``items``, so an item (e.g. LiberTEM's result buffers, updated in place) is not changed while
    the caller uses it and the clock runs only while ``items`` works. Exceptions of ``items`` are re-raised
    here. On a stall the thread is abandoned (it may be blocked in a call that cannot be interrupted); when
    the caller stops early, ``items`` is closed in its thread at its next step."""
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    proceed = threading.Event()
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                handoff.put(("item", item))
                proceed.wait()
                proceed.clear()
                if stop.is_set():
                    break
            else:
                handoff.put(("end", None))
        except BaseException as err:  # handed to the caller's thread
            handoff.put(("error", err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None and stop.is_set():
                close()

    thread = threading.Thread(target=produce, name="deepstem-live-receiver", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=timeout_s)
            except queue.Empty:
                _abandoned["threads"] += 1
                raise stalled(timeout_s) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
            proceed.set()
    finally:
        stop.set()
        proceed.set()


def partial_path(output: Path) -> Path:
    """Where the partial reconstruction of ``output`` goes: ``<stem>_partial.h5`` (preview: ``.png``)."""
    return output.with_name(f"{output.stem}_partial.h5")


def _probe(host: str, port: int, what: str, timeout: float) -> None:
    """A plain TCP connect to ``host:port`` (closed at once); RuntimeError in one line when refused."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise RuntimeError(
            f"engine=libertem_live: cannot connect to the Merlin {what} port {host}:{port} ({reason}); "
            f"is the detector software running? (live.host, live.{what}_port)"
        ) from None


def _live_api() -> Any:
    try:
        import libertem_live.api as api
    except ImportError as err:
        raise RuntimeError(f"{MISSING} ({err})") from None
    return api


@contextlib.contextmanager
def live_context(workers: int = 1) -> Iterator[Any]:
    """A ``libertem_live.api.LiveContext`` on a pipelined executor of ``workers`` CPU worker processes
    (not pinned to cores), closed on exit; LiberTEM's INFO logging is raised to WARNING meanwhile."""
    api = _live_api()
    from libertem.executor.pipelined import PipelinedExecutor

    previous = {}
    for name in ("libertem", "libertem_live"):
        logger = logging.getLogger(name)
        previous[logger] = logger.level
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        spec = PipelinedExecutor.make_spec(cpus=range(int(workers)), cudas=[])
        executor = PipelinedExecutor(spec=spec, pin_workers=False, startup_timeout=120.0)
        ctx = api.LiveContext(executor=executor)
        try:
            yield ctx
        except LiveStallError:
            # closing would wait on the abandoned receiver: stop the workers (else they outlive the
            # process, holding its output pipes) and leave the rest to the process's end
            _terminate_workers(executor)
            raise
        except BaseException:
            ctx.close()
            raise
        ctx.close()
    finally:
        for logger, level in previous.items():
            logger.setLevel(level)


def _terminate_workers(executor: Any, timeout_s: float = 5.0) -> None:
    """Terminate (then kill) the worker processes of a LiberTEM ``PipelinedExecutor`` that cannot be
    closed because its result loop is blocked (its pool is private API: nothing happens without one)."""
    for info in getattr(getattr(executor, "_pool", None), "workers", None) or ():
        process = getattr(info, "process", None)
        if process is None or process.exitcode is not None:
            continue
        process.terminate()
        process.join(timeout_s)
        if process.exitcode is None:
            process.kill()
            process.join(timeout_s)


#: at most this many frames per LiberTEM partition (one partition is merged, and may be written, at a time)
PARTITION_FRAMES = 1024


def rows_per_partition(every: int, rx: int, ry: int) -> int:
    """Scan rows per LiberTEM partition: the largest divisor of ``gcd(every, rx)`` whose rows hold at most
    :data:`PARTITION_FRAMES` frames (at least one row), so that the ``rx // rows`` equal partitions end
    on the multiples of ``every`` rows where the partial results are written."""
    common = int(np.gcd(int(every), int(rx)))
    fitting = [k for k in range(1, common + 1) if common % k == 0 and k * ry <= max(ry, PARTITION_FRAMES)]
    return max(fitting)


def completed_rows(damage: np.ndarray) -> int:
    """The number of leading scan rows whose every position has been processed (``damage`` ``(Rx, Ry)``
    bool, True where LiberTEM has merged the position's result)."""
    complete = np.all(np.asarray(damage, dtype=bool), axis=1)
    return int(np.argmin(complete)) if not complete.all() else int(complete.size)


def com_field(moment: np.ndarray, total: np.ndarray, rows: int) -> np.ndarray:
    """The COM field ``(rows, Ry, 2)`` (1/A, detector frame) of the first ``rows`` scan rows from the UDF's
    first moments ``moment`` ``(Rx, Ry, 2)`` and counts ``total`` ``(Rx, Ry)``, less its mean over those
    rows (as :func:`evaluation.references.centre_of_mass`)."""
    counts = total[:rows]
    if np.any(counts <= 0):
        raise ValueError("some diffraction patterns hold no counts; the centre of mass is undefined")
    com = moment[:rows] / counts[..., None]
    return com - com.mean(axis=(0, 1))


def _reconstruct(method: str, com: np.ndarray, scan: Any, params: Mapping[str, Any]) -> Reconstruction:
    common = {"scan_rotation_deg": scan.scan_rotation_deg, "transpose": scan.scan_transpose}
    if method == "icom":
        return icom_from_com(
            com, scan.scan_step_A, **common,
            estimate_rotation=bool(params.get("estimate_rotation", False)),
            boundary=str(params.get("boundary", "mirror")),
        )  # fmt: skip
    band = params.get("band_pass_invA")
    return ricom_from_com(
        com, scan.scan_step_A, int(params.get("kernel_size", 21)), tuple(band) if band else None, **common
    )


def run_live(
    scan: Any,
    method: str,
    params: Mapping[str, Any],
    settings: LiveSettings,
    output: Path,
    *,
    config: Any = None,
    progress: bool = True,
    ctx: Any = None,
    model: Any = None,
    precision: str = "auto",
) -> tuple[Reconstruction, dict[str, Any]]:
    """Receive one Merlin acquisition and reconstruct it with ``method`` while it arrives.

    ``scan``: an :class:`evaluation.io.Scan4D` that holds the calibration (its ``data`` is not read; the
    detector's frame size comes from the Merlin control port). Every ``settings.preview_every_rows``
    completed rows (and once all frames are in) the partial reconstruction of the completed rows is
    written to :func:`partial_path` ``(output)`` with its PNG (attrs ``info_rows_done``,
    ``info_rows_total``). ``ctx``: a ``LiveContext`` to use (kept open), else one from
    :func:`live_context`. ``model``: the loaded AIRPI network (``airpi``; run on the CPU at ``precision``).
    Returns the final reconstruction and a summary (``partial_writes``, ``frames``, ``seconds``: from the
    acquisition's start to its last frame). RuntimeError when the detector cannot be reached or no
    acquisition starts within ``settings.timeout_s``; :class:`LiveStallError` (a RuntimeError) when the
    frames stop for ``settings.stall_timeout_s`` mid-scan (the partial file written so far stays);
    ValueError for a bad method or setting.
    """
    message = unsupported_message(method)
    if message is not None:
        raise ValueError(message)
    if method == "airpi":
        if model is None:
            raise ValueError("method 'airpi' needs a network checkpoint: give ckpt=PATH")
        if params.get("detector_centre_px") is None:
            raise ValueError(
                "engine=libertem_live airpi needs airpi.detector_centre_px=[x,y] (the detector pixel of zero "
                "frequency: the mean pattern, which engine=local uses, is known only after the scan)"
            )
        if params.get("data_repetition"):
            raise ValueError("engine=libertem_live airpi does not stream airpi.data_repetition=true")
    _live_api()
    _probe(settings.host, settings.control_port, "control", settings.connect_timeout_s)
    _probe(settings.host, settings.data_port, "data", settings.connect_timeout_s)
    if ctx is None:
        with live_context(settings.workers) as own:
            return run_live(
                scan, method, params, settings, output, config=config, progress=progress, ctx=own,
                model=model, precision=precision,
            )  # fmt: skip
    from evaluation.cli import write_reconstruction

    rx, ry = settings.scan_shape
    partial = partial_path(output)
    state = {"writes": 0}

    def write(result: Reconstruction, rows: int, elapsed: float) -> None:
        result.info.update(rows_done=rows, rows_total=rx, engine="libertem_live")
        write_reconstruction(partial, result, rows * ry / max(elapsed, 1e-9), config=config, overwrite=True)
        state["writes"] += 1
        if progress:
            print(f"live: {rows}/{rx} scan rows -> {partial}", file=sys.stderr, flush=True)

    try:
        with _acquisition(ctx, settings) as acquisition:
            start = time.perf_counter()
            if method == "airpi":
                result = _airpi_live(
                    ctx, acquisition, scan, model, params, settings, write, progress, precision
                )
            else:
                udf = udf_classes()["com"](tuple(float(k) for k in scan.k_pixel_invA))
                result = None
                for rows, buffers in _partials(ctx, acquisition, udf, settings):
                    moment = buffers["moment"].reshape(rx, ry, 2)
                    total = buffers["total"].reshape(rx, ry)
                    result = _reconstruct(method, com_field(moment, total, rows), scan, params)
                    write(result, rows, time.perf_counter() - start)
            seconds = time.perf_counter() - start
    except LiveStallError as err:
        kept = f"the partial result stays in {partial}" if state["writes"] else "no partial was written"
        raise LiveStallError(f"{err} ({kept}; {output.name} not written)") from None
    if result is None:
        raise RuntimeError("engine=libertem_live: the acquisition ended before all scan rows arrived")
    result.info["engine"] = "libertem_live"
    return result, {"partial_writes": state["writes"], "frames": rx * ry, "seconds": seconds}


@contextlib.contextmanager
def _acquisition(ctx: Any, settings: LiveSettings) -> Iterator[Any]:
    """Connect to the Merlin, wait (at most ``settings.timeout_s``) for its acquisition to start and yield
    the LiberTEM-live acquisition of ``settings.scan_shape`` (partitions of :func:`rows_per_partition`)."""
    rx, ry = settings.scan_shape
    conn = ctx.make_connection("merlin").open(
        api_host=settings.host, api_port=settings.control_port,
        data_host=settings.host, data_port=settings.data_port, drain=False,
    )  # fmt: skip
    try:
        pending = conn.wait_for_acquisition(timeout=settings.timeout_s)
        if pending is None:
            raise RuntimeError(
                f"engine=libertem_live: no acquisition started on {settings.host}:{settings.data_port} "
                f"within {settings.timeout_s:g} s (live.timeout_s); arm and trigger the detector"
            )
        if pending.nimages and pending.nimages != rx * ry:
            raise ValueError(
                f"live.scan_shape={list(settings.scan_shape)} holds {rx * ry} positions but the detector "
                f"announces {pending.nimages} frames"
            )
        frames = rows_per_partition(settings.preview_every_rows, rx, ry) * ry
        yield ctx.make_acquisition(
            conn=conn, nav_shape=(rx, ry), pending_aq=pending, frames_per_partition=frames
        )
    except LiveStallError:
        raise  # the abandoned receiver thread still holds the connection: closing it would fail
    except BaseException:
        conn.close()
        raise
    conn.close()


def _partials(
    ctx: Any, acquisition: Any, udf: Any, settings: LiveSettings
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Run ``udf`` on the acquisition; yield ``(rows, buffers)`` (the completed leading scan rows, the
    result buffers as arrays over the whole scan) each time ``settings.preview_every_rows`` more rows are
    complete, and when all are. RuntimeError when the stream ends short."""
    rx, ry = settings.scan_shape
    last = 0

    def stalled(timeout_s: float) -> LiveStallError:
        return LiveStallError(
            f"engine=libertem_live: no frames for {timeout_s:g} s (live.stall_timeout_s) with {last} of {rx} "
            f"scan rows reconstructed; did the detector stop mid-scan?"
        )

    partitions = ctx.run_udf_iter(dataset=acquisition, udf=udf, progress=False)
    for part in watched(partitions, settings.stall_timeout_s, stalled):
        rows = completed_rows(np.asarray(part.damage.data).reshape(rx, ry))
        if rows == 0 or (rows - last < settings.preview_every_rows and rows < rx):
            continue
        last = rows
        yield rows, {key: np.asarray(value.data) for key, value in part.buffers[0].items()}
    if last < rx:
        raise RuntimeError(f"engine=libertem_live: the acquisition ended after {last} of {rx} scan rows")


def _airpi_live(
    ctx: Any,
    acquisition: Any,
    scan: Any,
    model: Any,
    params: Mapping[str, Any],
    settings: LiveSettings,
    write: Any,
    progress: bool,
    precision: str,
) -> Reconstruction:
    """AIRPI on a live acquisition: the frames resampled onto the network grid as they arrive (engine=
    libertem's ``ResampleUDF``, a ``nav`` buffer), and every ``preview_every_rows`` rows the local AIRPI
    (:func:`evaluation.networks.airpi.airpi_reconstruct` via
    :func:`evaluation.networks.reconstruct_with_network`) on the resampled rows received so far: its 3x3
    kernels need each position's neighbours, so the newest row is reconstructed as a scan edge until the
    next arrives. The final pass on all rows is engine=local's AIRPI on the same frames (same detector
    centre). Memory: the resampled stack, ``Rx * Ry * K * K`` float32."""

    from evaluation.networks import reconstruct_with_network
    from evaluation.networks.airpi import airpi_reconstruct
    from evaluation.networks.geometry import _PatternStream

    rx, ry = settings.scan_shape
    kx, ky = (int(n) for n in acquisition.shape.sig)
    full = dataclasses.replace(scan, data=ShapeOnly((rx, ry, kx, ky)))
    start = time.perf_counter()

    def reconstructor(whole: Any, predictor: Any, **options: Any) -> Reconstruction:
        def stream_factory(geometry: Any, *args: Any, **kwargs: Any) -> _PatternStream:
            stream = _PatternStream(
                dataclasses.replace(geometry, data=ShapeOnly((rx, ry, kx, ky))), *args, **kwargs
            )
            k = int(stream.pixels)
            stack = None
            for rows, buffers in _partials(ctx, acquisition, udf_classes()["resample"](stream), settings):
                stack = buffers["patterns"].reshape(rx, ry, k, k)
                if rows < min(rx, 3):
                    continue  # AIRPI needs at least 3 rows
                if rows < rx:
                    part = dataclasses.replace(whole, data=ShapeOnly((rows, ry, kx, ky)))
                    view = stack[:rows]
                    result = airpi_reconstruct(
                        part,
                        predictor,
                        **options,
                        stream_factory=lambda *a, view=view, **kw: resampled_stream(stream, view),
                    )
                    write(result, rows, time.perf_counter() - start)
            assert stack is not None
            return resampled_stream(stream, stack)

        final = airpi_reconstruct(whole, predictor, **options, stream_factory=stream_factory)
        return final

    result = reconstruct_with_network(
        full, "airpi", model, dict(params), device="cpu", progress=progress, precision=precision,
        reconstructor=reconstructor,
    )  # fmt: skip
    write(result, rx, time.perf_counter() - start)
    return result
