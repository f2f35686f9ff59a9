"""The one base class for mistakes a user can fix.

    cifar-ray train --workers 0      # a UserError (here a ValueError): one line, exit status 2

Every error that names a flag, file, URI or run the user can change derives from `UserError`
(each module keeps its own subclass: StorageError, DataError, RunExistsError, ...). The CLI
prints such errors as one line, without a traceback. It lives alone so that every module can
import it without importing any other.
"""


class UserError(Exception):
    """Bad input or state that the user can fix: the CLI prints it as one line, no traceback."""
