"""pruneserve.server: the online wing. A KServe v2 / Triton-compatible gRPC server.

Never imports torch or transformers: onnxruntime, tokenizers, grpcio, protobuf,
prometheus-client and numpy only.
"""
