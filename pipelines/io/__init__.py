"""Reading and writing: fsspec storage, training shards, completion markers, payloads, model loading."""
