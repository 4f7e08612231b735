"""Generated protobuf modules for the Open Inference Protocol messages (see proto/)."""
