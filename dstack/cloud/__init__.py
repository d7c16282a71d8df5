"""Cloud runners: GPU instances rented when no registered host fits a job, given back when idle."""
