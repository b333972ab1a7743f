"""User-facing errors.

Anything the user can fix (a missing file, a bad column, an unknown config key) raises
:class:`MetasftError` with one line that names the file, row, task or key. The CLI turns it into
exit code 2 and that line on stderr, with no traceback unless ``--debug`` is given.
"""


class MetasftError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""


class ConfigError(MetasftError):
    """A bad configuration key or value; the message names the dotted key."""


class DataError(MetasftError):
    """A bad data file, column, row or task; the message names the file/row/task."""
