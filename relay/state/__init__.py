"""What lives in Redis, shared by every process of a deployment: the queue and its
counts (broker, transport), dead letters, the identity map, new ChurnZero names, traces,
the deployment's stats and status (status), and the clients that reach Redis (redis_conn,
embedded). Imports the core only (see relay)."""
