"""Operator tooling: ``autointerv status`` (offsets and lag), ``autointerv top`` (a terminal view of
a process's ``/metrics``) and the faust-streaming topic monitor (windowed throughput per experiment).

Submodules are imported lazily by the CLI: faust is heavy to import and only the monitor needs it.
"""
