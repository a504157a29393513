"""The YAML config file (--config-file) read into key -> text, the form flags arrive in.

The values are validated later by config.convert(), the same converter a flag goes through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .config import KEY_BY_NAME, ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; 1 MiB is plenty


# What a config file holds once read: key -> text, a list of texts, or None (key: with no
# value, `~` or `null`: unset, the default applies).
FileValue = str | list[str] | None


def read_config_file(path: str) -> dict[str, FileValue]:
    """Read a YAML config file into {key: text | [text, ...] | None}, validating its shape.

    Every scalar is kept as the text the operator wrote: YAML 1.1's implicit types are not
    applied, so `listen-unix-mode: 0660` is the mode 0660 (not the integer 432), `1:30` is
    not sexagesimal, and `yes` is not a boolean. A plain empty value, `~` or `null` means
    "unset" (the default applies). Aliases are refused (an alias bomb cannot expand), as are
    nested lists or maps, duplicate and unknown keys, files over 1 MiB and non-UTF-8 bytes.

    Raises:
        ConfigError: `invalid config file <path>: <reason>` or `cannot read config file ...`
            (stderr).
    """
    import yaml

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"invalid config file {path}: {reason}", stream="stderr")

    data = _read_regular_file(path)
    if len(data) > MAX_CONFIG_BYTES:
        raise bad(f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        events = list(yaml.parse(text, Loader=parser))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None)
        raise bad(f"YAML error{at}" + (f": {problem}" if problem else "")) from None
    return _from_events(events, bad)


def _read_regular_file(path: str) -> bytes:
    """At most MAX_CONFIG_BYTES + 1 bytes of path, which must be a regular file.

    A FIFO blocked open() for good (at start-up with no message; each SIGHUP left a thread
    behind), /dev/zero was read up to the size cap, and opening some devices acts by itself
    (a watchdog arms, a tape rewinds). So what stat() calls other than a regular file is
    never opened, and the file is opened without waiting (O_NONBLOCK: a FIFO swapped in
    meanwhile), without becoming our controlling terminal (O_NOCTTY), and checked again
    with fstat(): the path may name something else by then.

    Raises:
        ConfigError: `--config-file <path>: not a regular file (<kind>)` or `cannot read
            config file <path>: <reason>` (stderr).
    """
    import os
    import stat

    def not_regular(mode: int) -> ConfigError:
        kind = _KINDS.get(stat.filemode(mode)[0], "not a file")
        return ConfigError(f"--config-file {path}: not a regular file ({kind})", stream="stderr")

    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise not_regular(mode)
            return f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(
            f"cannot read config file {path}: {e.strerror or e}", stream="stderr"
        ) from None


# stat.filemode()'s first letter -> what the file is, for the message.
_KINDS = {
    "p": "a FIFO",
    "c": "a character device",
    "b": "a block device",
    "d": "a directory",
    "s": "a socket",
}

_NULLS = ("", "~", "null", "Null", "NULL")


def _from_events(
    events: Sequence[object], bad: Callable[[str], ConfigError]
) -> dict[str, FileValue]:
    import yaml

    out: dict[str, FileValue] = {}
    body = [e for e in events if not isinstance(e, yaml.StreamStartEvent | yaml.StreamEndEvent)]
    if not body:
        return out
    if any(isinstance(e, yaml.AliasEvent) for e in body):
        # Refused outright: an alias bomb (aliases of aliases) must not expand.
        raise bad("YAML aliases (*name) are not supported")
    docs = sum(isinstance(e, yaml.DocumentStartEvent) for e in body)
    if docs != 1:
        raise bad("expected one YAML document")
    body = [e for e in body if not isinstance(e, yaml.DocumentStartEvent | yaml.DocumentEndEvent)]
    if len(body) == 1 and isinstance(body[0], yaml.ScalarEvent) and _is_null(body[0]):
        return out  # an empty document
    if not body or not isinstance(body[0], yaml.MappingStartEvent):
        raise bad("expected a mapping of flag names to values")
    i = 1

    def scalar_text(e: yaml.ScalarEvent) -> str:
        return str(e.value)

    while i < len(body) - 1:
        k = body[i]
        if isinstance(k, yaml.AliasEvent):
            raise bad("YAML aliases are not supported")
        if not isinstance(k, yaml.ScalarEvent):
            raise bad("keys must be flag names")
        name = scalar_text(k)
        key = KEY_BY_NAME.get(name)
        if key is None or not key.in_file:
            raise bad(f"unknown key {name!r}")
        if name in out:
            raise bad(f"duplicate key {name!r}")
        i += 1
        v = body[i]
        if isinstance(v, yaml.AliasEvent):
            raise bad(f"{name}: YAML aliases are not supported")
        if isinstance(v, yaml.ScalarEvent):
            out[name] = None if _is_null(v) else scalar_text(v)
            i += 1
            continue
        if isinstance(v, yaml.MappingStartEvent):
            raise bad(f"{name}: expected a single value, not a mapping")
        assert isinstance(v, yaml.SequenceStartEvent)
        if key.kind not in ("listen", "endpoints"):
            raise bad(f"{name}: expected a single value, not a list")
        items: list[str] = []
        i += 1
        while not isinstance(body[i], yaml.SequenceEndEvent):
            item = body[i]
            if isinstance(item, yaml.AliasEvent):
                raise bad(f"{name}: YAML aliases are not supported")
            if not isinstance(item, yaml.ScalarEvent):
                raise bad(f"{name}: expected a list of values, not nested lists or mappings")
            if _is_null(item):
                raise bad(f"{name}: empty list item")
            items.append(scalar_text(item))
            i += 1
        out[name] = items
        i += 1
    return out


def _is_null(e: object) -> bool:
    # Only a plain (unquoted) scalar can be null: `key: ""` is an explicit empty text.
    return getattr(e, "style", None) in (None, "") and getattr(e, "value", None) in _NULLS
