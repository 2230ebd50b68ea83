"""The delivery engine: the services `outbox run` is made of, one module each.

- `claimer`: claims due rows under leases and hands each to the executor, within the slots;
- `executor`: delivers one claimed row (lookup before create, the lease check, the policy);
- `writer`: writes results in batches, guarded by lease tokens, keeping them while it cannot;
- `listener`: LISTEN for new rows; `rescuer`: clears expired leases;
- `keycheck`: `GET /v1/test` before the first delivery and after every pause;
- `monitor`: the backlog figures, the STATUS= line and the watchdog;
- `supervisor`: runs each service, logs and counts a crash, restarts it or stops the daemon;
- `health`: what the daemon knows about itself, read by the watchdog and /healthz.

`outbox.daemon` wires them together. Each service is a loop around a `run_once()` that returns
a small result a unit test can drive.
"""
