"""Engines of ``reconstruct.py``: where the per-pattern work of a method runs.

``engine=local`` (the default) is :mod:`evaluation.references` and :mod:`evaluation.networks` in this
process; ``engine=libertem`` (:mod:`evaluation.engines.libertem`, the ``libertem`` extra) runs the
per-pattern part of the methods that allow it as LiberTEM UDFs, on LiberTEM's inline executor, a local
Dask cluster or an existing one, and finishes with the same deepstem code as the local engine.
"""

ENGINES = ("local", "libertem")

__all__ = ["ENGINES"]
