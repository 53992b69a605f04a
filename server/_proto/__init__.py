"""Generated gRPC stubs (``python -m pruneserve.server.protogen``); never edit by hand.

Import as ``from pruneserve.server._proto import grpc_service_pb2 as pb``. ``POOL`` is the
private descriptor pool the stubs register in (see :mod:`pruneserve.server.protogen`).
"""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()
