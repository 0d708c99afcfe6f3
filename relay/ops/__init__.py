"""The operator's side, where the roles meet: the `relay` CLI, the admin API, preview,
the process supervisor and the application `relay serve` runs. May import anything
(see relay)."""
