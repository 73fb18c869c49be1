"""The console channel: prints each message, or appends it as a JSON line to a file."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import TextIO

from channels.base import Channel, ChannelSettings, OutgoingMessage, SendResult, SendStatus

__all__ = ["ConsoleChannel", "ConsoleSettings"]


class ConsoleSettings(ChannelSettings):
    path: Path | None = None
    quiet: bool = False


class ConsoleChannel(Channel):
    """Development channel: no provider, no credentials."""

    Settings = ConsoleSettings
    _lock = threading.Lock()
    _file: TextIO | None = None  # the outbox file, opened on the first message

    def send(self, message: OutgoingMessage) -> SendResult:
        settings = self.settings
        assert isinstance(settings, ConsoleSettings)
        record = {"id": message.message_id, "channel": message.channel, "to": message.recipient,
                  "trigger": message.trigger_id, "subject": message.subject,
                  "body": message.body}
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            if settings.path is not None:
                if self._file is None:
                    settings.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = settings.path.open("a", encoding="utf-8")
                self._file.write(line + "\n")
                self._file.flush()  # each line complete on disk before the send counts
            elif not settings.quiet:
                print(line, file=sys.stdout, flush=True)
        return SendResult(SendStatus.SENT, provider_message_id=f"console-{message.message_id}")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
