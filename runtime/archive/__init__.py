"""Results leaving for the hospital's systems: the audit trail, shared by the server and the client."""
