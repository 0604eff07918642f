"""Lockstep gRPC API, by version (`protos.lockstep.v1`)."""
