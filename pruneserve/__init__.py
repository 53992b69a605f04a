"""pruneserve: prune, fuse and quantize BERT-family encoders, then serve them.

Subpackages:
- ``pruneserve.optimizer`` (offline, needs torch): scoring, pruning, recovery, export.
- ``pruneserve.server`` (online, no torch): a KServe v2 / Triton-compatible gRPC server.
- ``pruneserve.artifact``: the artifact format, the only contract between the two.
"""

__version__ = "0.1.0"
