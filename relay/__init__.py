"""churnzero-relay: Segment identify and track calls, delivered to ChurnZero.

The package is laid out by role. At the root, the pure core: what a Segment event is, what
ChurnZero command it becomes and why, and the names of every setting, Redis key and queue
message, with no I/O (no Redis, HTTP or Celery). Around it, one subpackage per role:

    relay/                 the pure core: events, clock, mapping, resolution, translate,
    │                      plan, commands, eiv, retry, reasons, envelope, wire, keys,
    │                      settings, errors, logs
    ├── state/             what lives in Redis, shared by every process: the queue
    │                      (broker, transport), dead letters, the identity map, new names,
    │                      traces, stats (status, oldest, recent), clients (redis_conn),
    │                      the embedded Redis, the longer Redis scripts (lua/*.lua)
    ├── ingest/            the ingest process: HTTP in (app, receive, parsing, auth, cors),
    │                      the admission check, group commit, request log, metrics, OpenAPI
    ├── delivery/          the worker side: a batch delivered (batch, sending, settlement),
    │                      the ChurnZero client and its problems, throttle, dedupe, claims,
    │                      the delayed set
    ├── archive/           the flight recorder: the archived event's columns (schema), its
    │                      files on a disk or in a bucket (store), the archiver and its
    │                      upkeep (maintenance), search
    ├── ops/               the operator's side, which puts the others together: the `relay`
    │                      CLI, the admin API, preview, the supervisor, what `relay serve` and
    │                      `relay dev` run
    └── dev/               stand-ins for development and tests: the ChurnZero sandbox
    workers/ (beside relay/): the Celery app and its one task, over relay.delivery

The import rule, checked by tests/unit/test_layout.py:

    core      imports only the core
    state     imports the core and state
    ingest    imports the core, state and ingest         (never delivery, ops or dev)
    delivery  imports the core, state and delivery       (never ingest, ops or dev)
    archive   imports the core, state and archive
    dev       imports the core and dev
    ops       imports anything
    workers   imports the core, state and delivery

so each side can be read, changed and tested without the other, and the core without a
Redis. (What `relay serve` runs also mounts the admin, from ops, whose preview reuses the
worker's rules: that is the one place the two sides meet in a process.)
"""
