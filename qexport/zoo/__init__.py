"""Shipped models and MODEL_ID resolution: the registry, the data set, the architectures, the loader."""
