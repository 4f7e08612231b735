"""Drawing results over frames, shared by the client and the web preview."""
