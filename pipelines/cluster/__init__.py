"""Running jobs on a Ray cluster: submission through the Ray Jobs API, and job operations."""
