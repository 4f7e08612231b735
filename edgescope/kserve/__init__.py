"""The Open Inference Protocol (KServe v2) messages, generated from proto/edgescope/kserve.

``POOL`` holds their descriptors under the standard package name,
``inference``. It is not protobuf's default pool: tritonclient registers the
same names there, and both must load in one process (the remote backend runs
inside the server).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
