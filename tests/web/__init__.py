"""Helpers for the `outbox web` tests: the server in a thread of its own, signed-in clients."""
