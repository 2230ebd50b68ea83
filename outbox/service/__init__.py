"""How `outbox run` lives as a service: settings, logs, metrics and /healthz, sd_notify."""
