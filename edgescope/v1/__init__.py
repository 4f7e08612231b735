"""Generated protobuf and gRPC modules for the edgescope.v1 API (see proto/)."""
