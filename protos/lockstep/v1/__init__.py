"""Lockstep gRPC API v1: generated stubs for lockstep.proto (see protos/README.md).

    from protos.lockstep.v1 import lockstep_pb2 as pb, lockstep_pb2_grpc as pb_grpc
"""

from protos.lockstep.v1 import lockstep_pb2, lockstep_pb2_grpc

__all__ = ["lockstep_pb2", "lockstep_pb2_grpc"]
