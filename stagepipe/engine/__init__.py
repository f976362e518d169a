"""The stage engine: partitions, content-addressed keys, atomic commits, executors.

It imports no stage, method, model or ML library: a caller hands it a ``Pipeline`` (stages,
config, model-fact discovery) and it decides from the manifests what is done and runs the rest.
"""
