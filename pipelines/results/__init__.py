"""Reading a run's results: ``influence sql``, ``show``, ``report`` and ``ddl`` (see each module)."""
