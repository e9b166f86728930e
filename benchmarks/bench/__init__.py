"""The figures of ``benchmarks/run.py``, one module per section, and what they share.

``run.py`` parses the command line (:mod:`bench.cli`) and calls each section's
``bench_<section>(args)``; every section prints its lines through :mod:`bench.report`, times
its variants with :mod:`bench.timing` and builds its models with :mod:`bench.trainee` or
:mod:`bench.masks`. The sections that need a fresh process (memory, compile) re-run
``run.py`` with a hidden flag, so the entry stays the only script.
"""
