"""Process settings every entry point shares: thread budget and the one error-line convention.

These live in the bottom package because datagen, training and evaluation all use them and none may
import another upward. Nothing here is physics; it is the small runtime contract of the command line.

Error convention: every error deepstem reports itself (bad config, bad file, bad checkpoint) is one
line ``deepstem: error: <message>`` on stderr and exit status ``EXIT_ERROR`` (2), whatever the entry
point. Tracebacks are for bugs only.

Threads: loader worker processes plus torch's default intra-op pool (one thread per core) oversubscribe
a small machine (a 3.6x slowdown was measured on 2 cores), so each entry point sets the intra-op thread
count deliberately from the cores it may use and the worker processes it starts.
"""

from __future__ import annotations

import os
import sys

EXIT_ERROR = 2
ERROR_PREFIX = "deepstem: error: "

# Variables read by the BLAS/OpenMP pools of numpy, torch and numexpr when a process starts; set for
# child processes (loader workers, datagen workers) so that each of them uses one thread.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | str | None, workers: int = 0) -> int:
    """Intra-op threads for the main process.

    ``threads`` is a positive integer, or ``None`` / ``"auto"``: the cores left after one core per
    worker process (at least 1). ``workers`` is the number of other busy processes this run starts
    (DataLoader workers, datagen workers).
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if threads is None or (isinstance(threads, str) and threads.strip().lower() == "auto"):
        return max(1, available_cores() - workers)
    try:
        value = int(threads)
    except (TypeError, ValueError):
        raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}") from None
    if value < 1 or (isinstance(threads, float) and threads != value):
        raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
    return value


def configure_threads(threads: int | str | None = "auto", workers: int = 0) -> int:
    """Set torch's intra-op threads (and one thread per child process); returns the count used.

    Child processes (``workers``) inherit ``OMP_NUM_THREADS=1`` and friends unless the user set them,
    so that a loader worker does not start a pool of its own on every core.
    """
    count = resolve_threads(threads, workers)
    if workers > 0:
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, "1")
    if "torch" in sys.modules or _torch_importable():
        import torch

        torch.set_num_threads(count)
    return count


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return True


def report_error(message: object) -> int:
    """Print ``deepstem: error: <message>`` to stderr; returns ``EXIT_ERROR`` for ``sys.exit``."""
    text = str(message).strip() or type(message).__name__
    sys.stderr.write(f"{ERROR_PREFIX}{text}\n")
    sys.stderr.flush()
    return EXIT_ERROR


# Inference precision ------------------------------------------------------------------------------------
# bf16 autocast pays only where the hardware has bf16 arithmetic: on x86 CPUs the AVX512-BF16 or AMX-BF16
# units (oneDNN uses them), on CUDA GPUs of compute capability >= 8.0. Elsewhere torch emulates bf16 and
# it runs slower than fp32, so ``precision=auto`` uses fp32 there.

PRECISIONS = ("auto", "bf16", "32")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The bf16 instruction-set flags this CPU reports (``cpuinfo``, Linux; empty where unknown)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_BF16_FLAGS if flag in present]
    except OSError:
        pass
    return []


def bf16_supported(device_type: str) -> bool:
    """Whether ``device_type`` (``"cpu"`` or ``"cuda"``) has native bf16 arithmetic."""
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device_type != "cpu":
        return False
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        onednn = bool(checker()) if checker is not None else True
    except RuntimeError:  # pragma: no cover - a build without oneDNN
        onednn = False
    return onednn and bool(cpu_bf16_flags())


def check_precision(precision: str | int | None) -> str:
    """``precision`` normalised to one of :data:`PRECISIONS` (``fp32``/``float32`` -> ``32``, ``bfloat16`` ->
    ``bf16``); ValueError naming ``precision`` otherwise."""
    value = "auto" if precision is None else str(precision).strip().lower()
    value = {"fp32": "32", "float32": "32", "bfloat16": "bf16", "bf16-mixed": "bf16"}.get(value, value)
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return value


#: ``reconstruct.py compile=``: torch.compile of the network (evaluation.networks.resolve_compile)
COMPILE_CHOICES = ("auto", "true", "false")


def check_compile(compile: bool | str | None) -> str:
    """``compile`` normalised to one of :data:`COMPILE_CHOICES` (booleans, ``on`` / ``off``, ``1`` / ``0``
    accepted); ValueError naming ``compile`` otherwise."""
    if isinstance(compile, bool):
        return "true" if compile else "false"
    value = "auto" if compile is None else str(compile).strip().lower()
    aliases = {"on": "true", "1": "true", "yes": "true", "off": "false", "0": "false", "no": "false"}
    value = aliases.get(value, value)
    if value not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}")
    return value


def resolve_precision(precision: str | int | None, device_type: str) -> str:
    """``"bf16"`` or ``"32"``: the inference precision of ``precision`` (auto | bf16 | 32) on ``device_type``.

    ``auto`` (or ``None``) picks bf16 where :func:`bf16_supported`, fp32 otherwise. An explicit ``bf16`` is
    honoured everywhere (emulated where the hardware lacks it: slower, with a warning). Raises ValueError
    naming ``precision`` for anything else.
    """
    import warnings

    value = check_precision(precision)
    if value == "auto":
        return "bf16" if bf16_supported(device_type) else "32"
    if value == "bf16" and not bf16_supported(device_type):
        warnings.warn(
            f"precision=bf16: this {device_type} has no native bf16 units ({' / '.join(CPU_BF16_FLAGS)} on a "
            "CPU); bf16 is emulated and runs slower than precision=32",
            RuntimeWarning,
            stacklevel=2,
        )
    return value


# Training precision (Lightning's ``trainer.precision``) ------------------------------------------------
# ``auto`` is resolved once, before the Trainer is built, to Lightning's ``bf16-mixed`` where the accelerator
# has native bf16 arithmetic (:func:`bf16_supported`) and to ``32-true`` elsewhere. Every other value is
# Lightning's own and passes through unchanged (Lightning validates it).

TRAINING_AUTO = "auto"
TRAINING_BF16 = "bf16-mixed"
TRAINING_FP32 = "32-true"


def accelerator_device_type(accelerator: str | None) -> str:
    """The torch device type (``"cpu"``, ``"cuda"``, ...) of a Lightning ``trainer.accelerator`` value.

    ``gpu`` and ``cuda`` are ``"cuda"``; ``auto`` / ``None`` is ``"cuda"`` where CUDA is available and
    ``"cpu"`` otherwise (the choice Lightning makes on a machine without TPUs or Apple GPUs); any other name
    (``mps``, ``tpu``, ...) is returned lower-cased.
    """
    value = "auto" if accelerator is None else str(accelerator).strip().lower()
    if value in ("gpu", "cuda"):
        return "cuda"
    if value == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def resolve_training_precision(precision: str | int | None, device_type: str) -> str | int:
    """Lightning's ``trainer.precision`` for ``precision`` on ``device_type`` (``"cpu"`` / ``"cuda"``).

    ``auto`` (or ``None``) is ``"bf16-mixed"`` where :func:`bf16_supported` and ``"32-true"`` otherwise.
    Any other value is returned unchanged (``32-true``, ``bf16-mixed``, ``16-mixed``, ``32``, ...); a bf16
    value on hardware without bf16 units warns (RuntimeWarning: emulated, slower than ``32-true``) and is
    honoured.
    """
    import warnings

    if precision is None or (isinstance(precision, str) and precision.strip().lower() == TRAINING_AUTO):
        return TRAINING_BF16 if bf16_supported(device_type) else TRAINING_FP32
    if "bf16" in str(precision).lower() and not bf16_supported(device_type):
        warnings.warn(
            f"trainer.precision={precision}: this {device_type} has no native bf16 units "
            f"({' / '.join(CPU_BF16_FLAGS)} on a CPU); bf16 is emulated and trains slower than 32-true",
            RuntimeWarning,
            stacklevel=2,
        )
    return precision
