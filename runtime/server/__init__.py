"""The server side: gRPC services, streams, model workers, the model registry, KServe, shared memory, captures."""
