"""The adapter interface: send one rendered message, get back a result.

A failed delivery is a result, not an exception. The statuses the dispatcher acts on:

    SENT      the provider accepted the message (provider_message_id set when it gives one)
    FAILED    permanent: never retried
    RETRY     transient and the request was not accepted: safe to send again later
    UNKNOWN   the request may have reached the provider (timeout, connection lost after
              sending): never re-sent blindly, left for reconciliation
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ENTRY_POINT_GROUP",
    "Channel",
    "ChannelSettings",
    "OutgoingMessage",
    "SendResult",
    "SendStatus",
    "adapter_names",
    "load_adapter",
]

ENTRY_POINT_GROUP = "touchpoints.channels"


class SendStatus(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    RETRY = "retry"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OutgoingMessage:
    """A rendered message ready for a provider."""

    message_id: int
    channel: str
    recipient: str
    body: str
    subject: str | None = None
    trigger_id: str = ""
    customer_external_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    status: SendStatus
    provider_message_id: str | None = None
    error: str | None = None
    retry_after: float | None = None
    error_class: str | None = None  # permanent | transient | opt_out | invalid_recipient


class ChannelSettings(BaseModel):
    """Base of every adapter's settings; secrets are declared as `SecretStr`."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Channel(ABC):
    """One configured channel instance."""

    Settings: ClassVar[type[ChannelSettings]] = ChannelSettings

    def __init__(self, name: str, settings: ChannelSettings) -> None:
        self.name = name
        self.settings = settings

    @classmethod
    def from_config(cls, name: str, raw: dict[str, Any]) -> Channel:
        """Build from `config/channels.yaml` settings; a bad setting fails here, not at send."""
        return cls(name, cls.Settings.model_validate(raw))

    @abstractmethod
    def send(self, message: OutgoingMessage) -> SendResult:
        """Send one message."""

    def close(self) -> None:  # noqa: B027 - optional hook, most adapters hold nothing
        """Release connections; the default has none."""


def adapter_names() -> list[str]:
    """Names of every registered adapter."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_adapter(name: str) -> type[Channel]:
    """The adapter class registered as `name`; LookupError lists the known ones."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            adapter = ep.load()
            if not (isinstance(adapter, type) and issubclass(adapter, Channel)):
                raise LookupError(f"entry point {name!r} is not a Channel subclass")
            return adapter
    raise LookupError(f"unknown channel adapter {name!r}; known: {', '.join(adapter_names())}")
