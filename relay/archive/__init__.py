"""The flight recorder: every settled event, kept for `archive_days` and searchable.

Workers write one compact record per settled event into the `relay:archive` stream, in
their settlement MULTI (relay.state.archive), so no settled event can miss the archive.
The archiver moves the records into time-partitioned Parquet files (relay.archive.store),
off the delivery path, and only then removes them from Redis: Redis holds what the
archiver has not yet written, never the history. Search, replay of a slice and trace's
fallback read the files with DuckDB (relay.archive.schema names the columns).

The role imports the core and state; ops imports it (the CLI and the admin API).
"""
