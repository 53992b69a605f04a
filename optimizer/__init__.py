"""pruneserve.optimizer: the offline wing (needs the `optimizer` extra: torch, transformers, onnx).

Stages, each a module with typed inputs and outputs (see ``pipeline.py``):
data -> importance -> search -> pruning -> recovery -> export -> fusion -> quantize -> validate -> artifact.
"""
