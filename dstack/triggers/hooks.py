"""Git hooks for repo triggers: post-commit and post-merge, chained with the hook already there.

An existing hook is moved aside to `NAME.dstack-saved` (a rename: bytes, mode, even a symlink stay as
they are) and our hook runs it first with the same arguments and stdin; `uninstall` renames it back.
Our hook starts dstack detached, output to `$DSTACK_HOME/triggers/hooks.log`, and never fails a commit.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dstack.errors import RepoError
from dstack.repo import find_repo_root
from dstack.store.state import State
from dstack.store.triggers import Install, delete_install, get_install, save_install

HOOKS = ("post-commit", "post-merge")
MARKER = "# dstack triggers hook"
SAVED = ".dstack-saved"
PROJECT = "# project: "
_GIT_VARS = "GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_PREFIX GIT_OBJECT_DIRECTORY GIT_COMMON_DIR"


@dataclass
class HookStatus:
    """One hook file: dstack's (maybe chained to a saved one), someone else's, or none."""

    name: str
    path: str
    state: str  # "installed" | "absent" | "not dstack's"
    chained: bool = False  # the hook that was there before runs first

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def hooks_dir(repo_root: Path) -> Path:
    """Where Git looks for this repo's hooks (`core.hooksPath` honoured)."""
    proc = subprocess.run(
        ["git", "rev-parse", "--git-path", "hooks"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RepoError(f"can't find the Git hooks folder of {repo_root}: {proc.stderr.strip()}")
    return (repo_root / proc.stdout.strip()).absolute()


def is_ours(path: Path) -> bool:
    """Whether a hook file is one dstack wrote."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        return MARKER.encode() in f.read(1024)


def hook_project(path: Path) -> str | None:
    """The project a dstack hook starts runs for."""
    import shlex

    for line in path.read_text().splitlines()[:5]:
        if line.startswith(PROJECT):
            return shlex.split(line[len(PROJECT) :])[0]
    return None


def hook_script(name: str, repo_root: Path, project_root: Path) -> str:
    """The hook: run the saved hook (if any) as Git would have, then start dstack in the background."""
    q = shlex.quote
    before = ' --before "$(git rev-parse -q --verify ORIG_HEAD 2>/dev/null)"' if name == "post-merge" else ""
    return f"""#!/bin/sh
{MARKER} ({name}): written by `dstack triggers install`; `dstack triggers uninstall` removes it and
# puts back the hook that was here (kept meanwhile as {name}{SAVED}, run first). Do not edit.
{PROJECT}{q(str(project_root))}
saved="$(dirname "$0")/{name}{SAVED}"
status=0
if [ -x "$saved" ]; then
    "$saved" "$@"
    status=$?
fi
if cd -P . && [ "$PWD" = {q(str(repo_root.resolve()))} ]; then
    logs="${{DSTACK_HOME:-$HOME/.dstack}}/triggers"
    [ -d "$logs" ] || (umask 077 && mkdir -p "$logs") 2>/dev/null
    {{ read -r commit; read -r merge_dir; read -r apply_dir; }} <<EOF
$(git rev-parse HEAD --git-path rebase-merge --git-path rebase-apply 2>/dev/null)
EOF
    rebasing=""  # the commits a rebase makes start no runs
    if [ -d "$merge_dir" ] || [ -d "$apply_dir" ]; then rebasing=" --rebasing"; fi
    (
        unset {_GIT_VARS}
        cd {q(str(project_root))} &&
            exec {q(sys.executable)} -m dstack triggers hook {name} --commit "$commit"$rebasing{before}
    ) </dev/null >>"$logs/hooks.log" 2>&1 &
fi
exit $status
"""


def hook_statuses(project_root: Path) -> list[HookStatus]:
    """The post-commit and post-merge hooks of the project's repo, as they are now."""
    folder = hooks_dir(find_repo_root(project_root))
    found = []
    for name in HOOKS:
        path = folder / name
        chained = os.path.lexists(folder / (name + SAVED))
        if is_ours(path):
            found.append(HookStatus(name, str(path), "installed", chained))
        elif os.path.lexists(path):
            left = f" ({name}{SAVED}, the hook dstack had moved aside, is left over)" if chained else ""
            found.append(HookStatus(name, str(path), "not dstack's" + left))
        else:
            found.append(HookStatus(name, str(path), "absent"))
    return found


def install_hooks(state: State, project_root: Path) -> list[HookStatus]:
    """Write dstack's post-commit and post-merge hooks, moving any hook already there aside to chain it."""
    repo_root = find_repo_root(project_root)
    folder = hooks_dir(repo_root)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    for name in HOOKS:
        path, saved = folder / name, folder / (name + SAVED)
        record = get_install(state, str(path))
        other = hook_project(path) if is_ours(path) else None
        if other and other != str(project_root):
            raise RepoError(
                f"{path} already starts runs for the project in {other} (one project per hooks folder)",
                hint=f"run `dstack triggers uninstall` in {other} first",
            )
        if not is_ours(path) and os.path.lexists(path):
            if os.path.lexists(saved):
                raise RepoError(
                    f"{saved} is in the way of saving your {name} hook", hint="move it elsewhere and retry"
                )
            os.rename(path, saved)
        temp = folder / f".{name}.dstack-tmp"
        temp.write_text(hook_script(name, repo_root, project_root))
        temp.chmod(0o755)
        os.replace(temp, path)
        detail = record.detail if record else {"created_dir": str(folder) if created else None}
        save_install(state, Install(str(path), "hook", str(project_root), detail))
    return hook_statuses(project_root)


def uninstall_hooks(state: State, project_root: Path) -> list[HookStatus]:
    """Remove dstack's hooks and put back the ones they chained, exactly as they were."""
    folder = hooks_dir(find_repo_root(project_root))
    created_dir = None
    for name in HOOKS:
        path, saved = folder / name, folder / (name + SAVED)
        record = get_install(state, str(path))
        if is_ours(path):
            os.remove(path)
            if os.path.lexists(saved):
                os.rename(saved, path)
        if record is not None:
            created_dir = created_dir or record.detail.get("created_dir")
            delete_install(state, str(path))
    if created_dir and Path(created_dir).is_dir() and not any(Path(created_dir).iterdir()):
        Path(created_dir).rmdir()
    return hook_statuses(project_root)


def changed_paths(repo_root: Path, commit: str, before: str | None = None) -> list[str]:
    """Repo paths a commit changed (against `before`, e.g. ORIG_HEAD after a merge, else its parent)."""
    if before:
        args = ["diff", "--name-only", "-z", "--no-renames", before, commit]
    else:
        args = ["diff-tree", "-r", "-z", "--no-commit-id", "--name-only", "--no-renames", "--root", commit]
    proc = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RepoError(f"`git {' '.join(args)}` failed: {proc.stderr.decode(errors='replace').strip()}")
    return [os.fsdecode(p) for p in proc.stdout.split(b"\0") if p]
