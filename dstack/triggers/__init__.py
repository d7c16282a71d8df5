"""Triggers: runs started by commits (Git hooks), schedules (crontab) and file changes (`dstack watch`).

dstack has no server, so triggers use what every machine has; `dstack triggers install` writes them,
`dstack triggers uninstall` puts back exactly what was there.
"""
