"""One writer per work directory: `Trainer.fit` holds `<workdir>/train.lock` while it runs.

The lock file holds the owner's host and pid as JSON and is created atomically (O_EXCL), so two
runs started at the same moment cannot both win. A lock left by a process that died without
releasing it (SIGKILL, power loss) is detected when the pid no longer exists on this host and is
taken over with a warning; a lock of another host cannot be checked from here, so it is refused
with the owner named and the file to delete if that run is known to be dead.
"""
import json
import logging
import os
import pathlib
import socket

log = logging.getLogger(__name__)

LOCK_NAME = 'train.lock'


class WorkdirLockedError(RuntimeError):
  """Another live run writes to this work directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by another user
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` or acquire() / release()."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir).absolute() / LOCK_NAME
    self.owner = {'host': socket.gethostname(), 'pid': os.getpid()}
    self._held = False

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump(self.owner, f)
    return True

  def _read_owner(self):
    try:
      owner = json.loads(self.path.read_text())
      return {'host': str(owner['host']), 'pid': int(owner['pid'])}
    except FileNotFoundError:
      return None
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WorkdirLockedError(
          f'{self.path} exists but is unreadable ({type(e).__name__}: {e}); if no run writes to '
          f'{self.path.parent}, delete it and start again') from None

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):   # create, or take over a stale lock (a concurrent taker may win)
      if self._create():
        self._held = True
        return
      owner = self._read_owner()
      if owner is None:
        continue   # released between our create and read
      same_host = owner['host'] == self.owner['host']
      if same_host and owner['pid'] != self.owner['pid'] and not _alive(owner['pid']):
        log.warning('taking over the stale lock %s of process %d on %s (no longer running)',
                    self.path, owner['pid'], owner['host'])
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
        continue
      raise WorkdirLockedError(
          f'work directory {self.path.parent} is in use by process {owner["pid"]} on host '
          f'{owner["host"]} ({self.path}); one run writes to a work directory at a time. Use '
          f'another --workdir, or delete {self.path} if that run is known to be dead.')
    raise WorkdirLockedError(f'could not take the lock {self.path}: it keeps changing owner')

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:   # remove only our own lock (never one a later owner took over)
      if self._read_owner() == self.owner:
        os.unlink(self.path)
    except (OSError, WorkdirLockedError):
      log.warning('could not remove the lock %s', self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
