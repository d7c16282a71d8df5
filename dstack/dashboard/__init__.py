"""`dstack ui`: a local web app over the same SQLite state (runs, a run's DAG, logs, artifacts, metrics,
hosts, tags), served on 127.0.0.1 only behind a random token; every asset ships in the package."""
