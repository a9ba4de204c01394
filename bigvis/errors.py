"""Exceptions the CLI turns into one line and an exit status: mistakes a user can fix (2), preemption (143)."""


class UserError(Exception):
  """A problem with the user's config, data, paths or environment.

  Raised where the problem is first visible, with a message that names the
  culprit in one sentence. `bigvis` prints it without a traceback and exits 2.
  """


class Preempted(Exception):
  """SIGTERM (preemption, scancel) stopped a run at `step`, checkpointed. It is not finished, so the
  command exits 143 (killed by SIGTERM, as shells and schedulers read it), not 0."""

  def __init__(self, step: int):
    super().__init__(f"stopped by SIGTERM at step {step}; checkpoint saved, rerun the command to resume.")
    self.step = step
