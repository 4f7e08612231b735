"""The client side: the streaming client, overlay video, clock estimate, shared-memory sender, demo, top."""
