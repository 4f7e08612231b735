"""The edgescope runtime: backends, the frame pipeline, the gRPC server and client.

Importing it loads neither torch nor TensorRT nor CUDA; those are imported
lazily by the backends that need them.
"""
