"""A search's jobs (qfarm.sweep.search): sensitivity probes, and the allocation its mixed candidates make."""
