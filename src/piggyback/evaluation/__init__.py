"""The steps of ``python evaluate.py``, one module each.

``runs`` finds artifacts and picks runs, ``rebuild`` restores each task's backbone and test
data, ``tester`` measures a task on the multi-task model, ``rows`` turns it all into the
report's tables. :mod:`piggyback.evaluate` calls them in order.
"""
