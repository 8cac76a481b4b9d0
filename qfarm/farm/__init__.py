"""The farm: Redis state, the scheduler and its placement on the Ray cluster, the Ray Jobs API, the watchdog,
connections, secrets handed to workers, expected durations.
"""
