"""The only layer that knows WebSockets and HTTP: server, sessions, hub, auth, admin, CLI."""
