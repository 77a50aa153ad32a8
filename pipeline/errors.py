"""The root of the errors that stop a command with one line (and a non-zero exit)."""


class StripinspectError(Exception):
    """A problem the user can fix (bad config, bundle, data or weights); str() is one line."""
