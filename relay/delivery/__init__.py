"""The worker side: a queued batch delivered to ChurnZero, throttled, retried and
settled. Imports the core and relay.state, never ingest (see relay); workers/ runs it
under Celery."""
