"""etcd-style log lines on stderr: zap JSON (level, ts, caller, msg + fields) or plain text.

The Go gateway (v3.5+) logs through zap with keys level/ts/caller/msg, `ts` as
2006-01-02T15:04:05.000000Z0700, durations as Go strings ("1m0s"). Scripts grep `msg`
values such as "ready to proxy client requests", so the messages are kept verbatim.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40}


class Logger:
    """A small structured logger; one line per event, written and flushed at once."""

    def __init__(
        self,
        *,
        level: str = "info",
        fmt: str = "json",
        stream: TextIO | None = None,
        name: str = "",
    ) -> None:
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stderr
        self.name = name

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def log(self, level: str, msg: str, /, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        frame = sys._getframe(2)
        caller = f"{os.path.basename(os.path.dirname(frame.f_code.co_filename))}/" + (
            f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        )
        now = time.time()
        if self.fmt == "json":
            rec: dict[str, Any] = {
                "level": level,
                "ts": _ts(now),
                "caller": caller,
                "msg": msg,
            }
            rec.update(fields)
            line = json.dumps(rec, default=str, ensure_ascii=False, separators=(",", ":"))
        else:
            extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
            line = f"{_ts(now)} {level.upper():5} {msg}" + (f" {extra}" if extra else "")
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            # stderr closed or a broken pipe: logging must never take the gateway down.
            pass

    def debug(self, msg: str, /, **fields: Any) -> None:
        self.log("debug", msg, **fields)

    def info(self, msg: str, /, **fields: Any) -> None:
        self.log("info", msg, **fields)

    def warn(self, msg: str, /, **fields: Any) -> None:
        self.log("warn", msg, **fields)

    def error(self, msg: str, /, **fields: Any) -> None:
        self.log("error", msg, **fields)


def _ts(now: float) -> str:
    t = time.gmtime(now)
    micros = int((now % 1) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{micros:06d}Z"


def _text(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v) if (" " in v or not v) else v
    return json.dumps(v, default=str)
