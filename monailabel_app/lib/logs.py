"""Secrets kept out of the server's logs, which ``GET /logs/`` serves."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

MASK = "***"


class RedactFilter(logging.Filter):
    """Replace each secret in a log record's message with :data:`MASK`."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            record.msg, record.args = redact(message, self.secrets), None
        return True


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def keep_out_of_logs(secrets: Sequence[str], log_dir: str | Path) -> None:
    """Mask ``secrets`` in every record any handler writes from now on, and in the log files already written.

    ``monailabel start_server`` logs its arguments (``--conf api_key KEY`` included) and the app conf before the
    app is loaded, so the files are rewritten too; the log handlers open them in append mode, which stays correct.
    """
    secrets = [s for s in secrets if s]
    if not secrets:
        return
    log_filter = RedactFilter(secrets)
    named = logging.Logger.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(lg for lg in named if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        handler.addFilter(log_filter)
    for path in Path(log_dir).glob("*.log*"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(s in text for s in secrets):
            path.write_text(redact(text, secrets), encoding="utf-8")
