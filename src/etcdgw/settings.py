"""The configuration in force, for the parts that follow a SIGHUP reload.

`Gateway.configure()` replaces `Settings.cfg`; every part that follows a reload (a dial's
--dial-timeout, the acceptor's --max-connections, the monitor's --health-check and
--retry-delay, the socket options of --tcp-keepalive) holds the one `Settings` and reads
`settings.cfg.<key>` when it uses the value, so no part keeps a stale copy of a setting.
"""

from __future__ import annotations

from .config import Config

__all__ = ["Settings"]


class Settings:
    """Holds the Config in force; replaced as a whole by a reload (Config is frozen)."""

    __slots__ = ("cfg",)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
