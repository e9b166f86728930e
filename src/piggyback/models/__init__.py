"""The models layer: the LightningModule (``module``), the multi-task model that switches tasks
(``multitask``), task storage and prototypes, a task's stored state in a checkpoint, and the
quick builders used by tests and notebooks (``testing``)."""
