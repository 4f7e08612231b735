"""gRPC server reflection over services whose descriptors live in different pools.

grpcio-reflection answers from one descriptor pool. edgescope's own services
are in protobuf's default pool; the Open Inference Protocol is in
``edgescope.kserve.POOL`` under its standard names (the default pool may hold
tritonclient's definitions of the same names). Reflection gets a pool of its
own holding copies of each service's file and the files it imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


def reflection_pool(services: Sequence[ServiceDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool with the files that define ``services``, dependencies first."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for service in services:
        add(service.file)
    return pool


def enable_reflection(server: grpc.aio.Server, services: Sequence[ServiceDescriptor]) -> None:
    """Describe ``services`` and the reflection service itself to reflection clients (grpcurl, Postman)."""
    every = [*services, REFLECTION_SERVICE]
    reflection.enable_server_reflection([s.full_name for s in every], server, pool=reflection_pool(every))
