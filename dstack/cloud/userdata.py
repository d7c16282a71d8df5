"""What a launched instance runs at boot: an idle check every minute that powers it off (so it terminates)
when no dstack job has been active for a while, even when no dstack command runs anywhere."""

from __future__ import annotations

IDLE_CHECK = r"""#!/bin/bash
# dstack: power the instance off (it terminates) when no dstack job has been active for IDLE seconds
idle=${DSTACK_IDLE_TIMEOUT:-__IDLE__}
roots=${DSTACK_IDLE_ROOTS:-"/root/.dstack/jobs /home/*/.dstack/jobs"}
stamp=${DSTACK_IDLE_STAMP:-/var/lib/dstack/last-active}
mkdir -p "$(dirname "$stamp")"
[ -f "$stamp" ] || touch "$stamp"
active=0
for d in $(for r in $roots; do echo $r/*; done); do
  [ -d "$d" ] || continue
  if [ -s "$d/pid" ] && [ ! -f "$d/exit" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then active=1; break; fi
  if [ -n "$(find "$d" -maxdepth 1 -newer "$stamp" -print -quit 2>/dev/null)" ]; then active=1; break; fi
done
if [ "$active" = 1 ]; then touch "$stamp"; exit 0; fi
age=$(( $(date +%s) - $(stat -c %Y "$stamp") ))
if [ "$age" -ge "$idle" ]; then
  logger -t dstack "idle for ${age}s, powering off" 2>/dev/null || true
  ${DSTACK_IDLE_POWEROFF:-shutdown -h now}
fi
"""

USER_DATA = r"""#!/bin/bash
# dstack runner set-up: an idle check every minute; powering off terminates the instance
cat > /usr/local/sbin/dstack-idle-check <<'DSTACK_EOF'
__SCRIPT__DSTACK_EOF
chmod 755 /usr/local/sbin/dstack-idle-check
mkdir -p /var/lib/dstack && touch /var/lib/dstack/last-active
if command -v systemctl >/dev/null 2>&1; then
  cat > /etc/systemd/system/dstack-idle.service <<'DSTACK_EOF'
[Unit]
Description=dstack: power off when idle
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/dstack-idle-check
DSTACK_EOF
  cat > /etc/systemd/system/dstack-idle.timer <<'DSTACK_EOF'
[Unit]
Description=dstack: idle check every minute
[Timer]
OnBootSec=60
OnUnitActiveSec=60
[Install]
WantedBy=timers.target
DSTACK_EOF
  systemctl daemon-reload && systemctl enable --now dstack-idle.timer
else
  echo '* * * * * root /usr/local/sbin/dstack-idle-check' > /etc/cron.d/dstack-idle
fi
"""


def instance_idle_timeout(idle_timeout: int) -> int:
    """How long the instance itself waits: dstack's reaper normally acts first; this is the safety net."""
    return idle_timeout + min(300, max(60, idle_timeout // 2))


def idle_check_script(idle_timeout: int) -> str:
    """The shell script the instance runs every minute (powers off after `idle_timeout` seconds idle)."""
    return IDLE_CHECK.replace("__IDLE__", str(int(idle_timeout)))


def user_data(idle_timeout: int) -> str:
    """Cloud-init user data: install the idle check as a systemd timer (cron where there is no systemd)."""
    return USER_DATA.replace("__SCRIPT__", idle_check_script(instance_idle_timeout(idle_timeout)))
