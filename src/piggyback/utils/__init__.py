"""The lowest layer: atomic writes, the checkpoint writer, the run lock, write errors, Hydra
instantiation, config resolvers and the console. Knows nothing of models, data or methods."""
