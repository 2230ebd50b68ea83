"""The operator surface: `commands` (status, failed, show, retry, discard, prune: typed
results from named queries), `cli` (their click commands and rendering), `roles` (roles-sql)."""
