"""WhatsApp through Twilio's Messages API: SMS with `whatsapp:` addresses.

Outside the 24-hour customer-care window WhatsApp only delivers approved templates; Twilio
rejects free text there with an error code that `config/provider_errors.yaml` classifies.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from channels.twilio_sms import TwilioSettings, TwilioSmsChannel

__all__ = ["TwilioWhatsAppChannel", "TwilioWhatsAppSettings"]

PREFIX = "whatsapp:"


class TwilioWhatsAppSettings(TwilioSettings):
    """As for SMS; a WhatsApp sender takes about 80 messages a second."""

    rate_per_second: float | None = Field(default=80.0, gt=0)


class TwilioWhatsAppChannel(TwilioSmsChannel):
    """WhatsApp messages through Twilio; numbers get the `whatsapp:` prefix."""

    Settings = TwilioWhatsAppSettings
    kind: ClassVar[str] = "twilio_whatsapp"

    def address(self, number: str) -> str:
        """`number` as a WhatsApp address."""
        return number if number.startswith(PREFIX) else PREFIX + number
