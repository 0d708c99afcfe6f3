"""The ingest process: Segment events in over HTTP, validated and durably queued, answered
fast. Imports the core and relay.state, never the worker side (see relay)."""
