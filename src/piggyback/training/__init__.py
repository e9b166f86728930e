"""The steps of ``python train.py``, one module each.

``run_folder`` says where a run's files go, ``assembly`` builds each task's loggers,
callbacks and Trainer, ``interrupt`` turns SIGTERM / Ctrl+C into a saved checkpoint,
``task`` trains, tests and exports one task, ``sequence`` tests every task learned so far
(the continual-learning accuracy matrix), ``records`` summarises and prints the run.
:mod:`piggyback.train` calls them in order.
"""
