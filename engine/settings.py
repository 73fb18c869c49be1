"""Runtime settings: environment variables first, then an optional TOML/YAML-free `.env` file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "default_database_url"]


def default_database_url(base: Path | None = None) -> str:
    """The default SQLite database, a file under `var/` of the working directory."""
    root = (base or Path.cwd()) / "var"
    return f"sqlite:///{root / 'touchpoints.db'}"


class Settings(BaseSettings):
    """Where data, rules, templates and config live; every field reads `TOUCHPOINTS_<NAME>`."""

    model_config = SettingsConfigDict(
        env_prefix="TOUCHPOINTS_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str = Field(default_factory=default_database_url)
    # SQLite's durability: NORMAL survives a process crash (a power cut may lose the last
    # commits); FULL survives a power cut; OFF only for a database that is rebuilt anyway.
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"
    rules_dir: Path = Path("rules")
    templates_dir: Path = Path("templates")
    config_dir: Path = Path("config")
    api_key: SecretStr | None = None
    tick_interval_seconds: float = Field(default=60.0, gt=0)
    dispatch_interval_seconds: float = Field(default=5.0, gt=0)
    dispatch_batch_size: int = Field(default=500, gt=0)
    console_outbox_path: Path | None = None
    # what the outside world calls us at (behind any proxy), e.g. https://tp.example.com
    public_url: str | None = None
    unsubscribe_secret: SecretStr | None = None  # signs the unsubscribe links in emails
    telegram_webhook_secret: SecretStr | None = None  # X-Telegram-Bot-Api-Secret-Token

    def ensure_var_dir(self) -> None:
        """Create the directory of a SQLite database file if it is missing."""
        prefix = "sqlite:///"
        if self.database_url.startswith(prefix) and ":memory:" not in self.database_url:
            Path(self.database_url[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
