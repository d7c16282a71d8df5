"""The scheduler: `daemon` (the detached process, heartbeat, recovery), `loop` (one run's steps),
`placement` (which runner takes a job), `watching` (running jobs, their logs, lost hosts)."""
