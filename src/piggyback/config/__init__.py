"""Config checks and Hydra glue shared by both entry points: the config folder and user errors
(``cli``), every check that runs before any training (``validate``), and the multirun callback
that makes a sweep with a failed job exit 2 (``sweep``)."""
