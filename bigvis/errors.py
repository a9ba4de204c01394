"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
  """A problem with the user's config, data, paths or environment.

  Raised where the problem is first visible, with a message that names the
  culprit in one sentence. `bigvis` prints it without a traceback and exits 2.
  """
