"""Development tools that the runtime never imports: the fake Partnero, `outbox demo`, and
the throwaway PostgreSQL the tests and the demo start."""
