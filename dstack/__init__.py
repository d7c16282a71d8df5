"""dstack: workflows as code, run on your own GPU boxes or the cloud, every output versioned."""

__version__ = "0.1.0"
