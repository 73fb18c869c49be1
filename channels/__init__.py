"""Channel adapters: the interface in `channels.base`, one module per provider.

Built-in adapters are registered as entry points (group `touchpoints.channels`) of our own
distribution; a third-party package adds a channel the same way.
"""

from channels.base import (
    Channel,
    ChannelSettings,
    OutgoingMessage,
    SendResult,
    SendStatus,
    adapter_names,
    load_adapter,
)

__all__ = [
    "Channel",
    "ChannelSettings",
    "OutgoingMessage",
    "SendResult",
    "SendStatus",
    "adapter_names",
    "load_adapter",
]
