"""The one exception type users see: a one-line message naming the file, row or flag."""


class HPAError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    The CLI prints ``error: <message>`` and exits with code 2. The constructor takes a
    single string so the exception survives being re-raised from a DataLoader worker.
    """

    exit_code = 2

    def __init__(self, message: str = ""):
        message = _from_worker(str(message))
        # Messages quote CSV headers, ids and paths, which can hold newlines or other control
        # characters: escape them as repr() does, so the message stays one line.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))

    def __str__(self) -> str:
        # fastai rewrites the message of any exception a callback raises to "Exception occured in
        # `Name` when calling event `event`:\n\t<message>" (fastai.callback.core, modify_exception);
        # the user's one line is the original message
        text = super().__str__()
        head, sep, original = text.partition(":\n\t")
        return original if sep and head.startswith("Exception occured in `") else text


def _from_worker(message: str) -> str:
    """The original message of an HPAError re-raised by torch from a DataLoader worker, which
    arrives as "Caught HPAError in DataLoader worker process N. Original Traceback ..." with the
    worker's whole traceback; its last line is ``...HPAError: <original message>``."""
    if not (message.startswith("Caught HPAError ") and "\nOriginal Traceback" in message):
        return message
    _, found, original = message.rstrip("\n").rsplit("\n", 1)[-1].partition("HPAError: ")
    return original if found else message
