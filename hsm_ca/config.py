"""Configuration: the only module that reads the home's config file and the environment.

Everything is turned into frozen dataclasses once, so services receive plain
objects and tests can build them without touching files or env.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsm_ca.errors import ConfigError, HsmCaError

CONFIG_FILE = "hsm-ca.toml"
DB_FILE = "ca.db"
HSM_DIR = "hsm"
PROFILES_DIR = "profiles"
PIN_ENV = "HSM_CA_PIN"
SO_PIN_ENV = "HSM_CA_SO_PIN"
HOME_ENV = "HSM_CA_HOME"
USER_ENV = "HSM_CA_USER"
DEFAULT_USER = "crypto-user"
DEFAULT_OFFICER = "admin"


@dataclass(frozen=True)
class Pkcs11Settings:
    module: str
    token_label: str | None = None
    uri: str | None = None
    # sign large batches in a helper process with its own session (see engine/p11_helper.py)
    signing_helper: bool = True


@dataclass(frozen=True)
class ServerSettings:
    """``[server]``: how long ``serve`` waits for clients and how many it holds at once.

    uvicorn alone lets a connection that sends nothing, or half a request, stay
    open forever, so a few hundred idle sockets exhaust the file descriptors
    and every request fails. These bound each connection's life and their number.
    """

    idle_timeout: float = 5.0  # no request in progress: new connections and keep-alive
    read_timeout: float = 10.0  # from a request's first byte until its headers and body are in
    write_timeout: float = 30.0  # a response the client stopped reading
    max_connections: int | None = None  # None: derived from RLIMIT_NOFILE (see hsm_ca.server)


OCSP_NONCE_MODES = ("honor", "ignore")
OCSP_KEYS = ("ocsp_nonces", "ocsp_nonce_rate", "ocsp_nonce_burst", "ocsp_nonce_global_rate",
             "ocsp_nonce_global_burst")


@dataclass(frozen=True)
class HomeConfig:
    """A CA home as described by its ``hsm-ca.toml``."""

    home: Path
    engine: str = "soft"
    base_url: str | None = None
    user: str = DEFAULT_USER
    officer: str = DEFAULT_OFFICER
    pkcs11: Pkcs11Settings | None = None
    ocsp_cache_seconds: int = 300
    # a nonce makes the HSM sign afresh and adds an audit row, so it is rationed per client
    ocsp_nonces: str = "honor"
    ocsp_nonce_rate: float = 2.0  # nonce signatures per second per client address
    ocsp_nonce_burst: int = 20
    # and for all clients together, so the audit table grows at a bounded rate
    ocsp_nonce_global_rate: float = 20.0
    ocsp_nonce_global_burst: int = 200
    server: ServerSettings = field(default_factory=ServerSettings)
    nodes: tuple[Path, ...] = ()
    partition_id: str | None = None
    configured_user: str | None = None  # the file's user; ``user`` may come from $HSM_CA_USER
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.home / DB_FILE

    @property
    def hsm_path(self) -> Path:
        return self.home / HSM_DIR

    @property
    def profiles_path(self) -> Path:
        return self.home / PROFILES_DIR

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE


def resolve_home(flag: str | None) -> Path:
    """``--home``, else ``$HSM_CA_HOME``, else ``~/.hsm-ca``."""
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.hsm-ca").expanduser()


# ------------------------------------------------------------ TOML files
MAX_TOML_NESTING = 16
"""Arrays, inline tables and dotted keys nested deeper than this are refused.

hsm-ca's files nest three levels at most; tomllib recurses per level, so a
hostile file of ``[[[[...`` would otherwise end in a RecursionError, and it
is quadratic in the parts of a dotted key. Brackets and key parts are counted
before parsing (with the line), the parsed result's depth after.
"""

# One linear scan of TOML text for what nests: brackets and dotted keys. Every alternative,
# once its first character is seen, matches (an unclosed string runs to the end of its line or
# of the text, as tomllib would read it) and never backtracks (possessive quantifiers), so no
# character is looked at more than a few times. The old pattern let each unclosed quote rescan
# the rest of the text: ``a = "`` and 40 KB of ``\"`` took 5 s, 1 MiB about an hour.
_TOML_TOKEN = re.compile(
    r'"""(?:[^"\\]++|\\.|"(?!""))*+(?:"{3,5}|\\?\Z)'  # multi-line basic string
    r"|'''(?:[^']++|'(?!''))*+(?:'{3,5}|\Z)"  # multi-line literal string
    r'|"(?:[^"\\\n]++|\\[^\n])*+(?:"|\\?(?=\n)|\\?\Z)'  # basic string, to the line's end
    r"|'[^'\n]*+'?"  # literal string
    r"|#[^\n]*+"  # comment
    r"|[\[{]++|[\]}]++|\.|[=,]|\n[ \t\r\n]*+",  # what nests, what ends a key
    re.DOTALL,
)


def _too_deep_at(text: str) -> int | None:
    """Where ``text`` first nests deeper than MAX_TOML_NESTING, or None; linear in its length.

    Counted before tomllib sees the text, for two reasons: the error can name
    the line, and tomllib is quadratic in the parts of one dotted key (each
    part rebuilds the key so far): ``[a.a.a...]`` of 1 MiB would take hours.
    Outside strings and comments a dot can only join key parts or sit in a
    number or time, which is followed by a separator before the next key.
    """
    depth = dots = 0
    for m in _TOML_TOKEN.finditer(text):
        start = m.start()
        c = text[start]
        if c in "\"'#":
            continue
        if c in "[{":
            depth, dots = depth + m.end() - start, 0
            if depth > MAX_TOML_NESTING:
                return start + MAX_TOML_NESTING - (depth - (m.end() - start))
        elif c in "]}":
            depth, dots = max(0, depth - (m.end() - start)), 0
        elif c == ".":
            dots += 1
            if dots >= MAX_TOML_NESTING:  # a key of MAX_TOML_NESTING + 1 parts
                return start
        else:
            dots = 0
    return None


def _toml_line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _deepest(data: Any) -> tuple[int, str]:
    """The nesting depth of parsed TOML (up to MAX_TOML_NESTING + 1), and a path to its deepest point.

    Level by level, so a wide document costs one pass with no per-value
    bookkeeping; the path is looked for only when the depth is refused.
    """
    level, depth = [data], 0
    while depth <= MAX_TOML_NESTING:
        below: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                below.extend(value.values())
            elif isinstance(value, list):
                below.extend(value)
        if not below:
            return depth, ""
        level, depth = below, depth + 1
    return depth, _path_to_depth(data, depth)


def _path_to_depth(data: Any, depth: int) -> str:
    """The dotted path of a value ``depth`` levels down in ``data`` (which has one)."""
    keys: list[str] = []
    stack = [iter(_children(data))]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            if keys:
                keys.pop()
            continue
        key, value = step
        keys.append(key)
        if len(keys) == depth:
            return "".join(keys).lstrip(".")
        if isinstance(value, dict | list):
            stack.append(iter(_children(value)))
        else:
            keys.pop()
    return ""


def _children(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        return ((f".{k}", v) for k, v in value.items())
    return ((f"[{i}]", v) for i, v in enumerate(value))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector while tomllib builds its result.

    A TOML document is a tree (no cycles), yet each of its many small dicts
    counts toward the collector's next full pass: a 1 MiB file of tables took
    1.6-3 s with the collector running and under 1 s without it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_toml(text: str, source: str, error: type[HsmCaError] = ConfigError) -> dict[str, Any]:
    """Parse TOML text, turning every way it can fail into ``error`` naming source and line.

    tomllib raises TOMLDecodeError for syntax, but RecursionError for deep
    nesting and ValueError for an integer of more than 4,300 digits (Python's
    int-from-str limit); those reached users as "internal error". Every step
    is linear in the text (a 1 MiB file of any shape is refused or read in
    about a second), so a hostile profile or config cannot stall a command.
    """
    deep_at = _too_deep_at(text)
    if deep_at is not None:
        raise error(f"{source}:{_toml_line(text, deep_at)}: nested deeper than "
                    f"{MAX_TOML_NESTING} levels")
    try:
        with _collector_paused():
            data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        found = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = f":{found.group(1)}" if found else ""
        raise error(f"{source}{line}: not valid TOML: {str(e)[:200]}") from None
    except RecursionError:
        raise error(f"{source}: nested deeper than {MAX_TOML_NESTING} levels") from None
    except ValueError:  # int("1" * 5000): more digits than int() converts
        digits = re.search(r"(?<![0-9_])[0-9][0-9_]{4000,}", text)  # linear
        line = field = ""
        if digits:
            line = f":{_toml_line(text, digits.start())}"
            start = text.rfind("\n", 0, digits.start()) + 1
            key = re.match(r"\s*([A-Za-z0-9_.\"'-]{1,64})\s*=", text[start:digits.start()])
            field = f" field {key.group(1)!r}:" if key else ""
        raise error(f"{source}{line}:{field} a number with thousands of digits; "
                    "no setting needs more than a few") from None
    deepest, where = _deepest(data)
    if deepest > MAX_TOML_NESTING:
        raise error(f"{source}: nested deeper than {MAX_TOML_NESTING} levels "
                    f"(at {where[:64]!r})")
    return data


def read_toml(path: str | Path, error: type[HsmCaError] = ConfigError,
              what: str = "configuration file") -> tuple[dict[str, Any], str]:
    """A TOML file (regular, at most fileio.CONFIG_BYTES, UTF-8), parsed; and its text.

    The one reader of hsm-ca's TOML: the home's config, profiles, bootstrap files.
    """
    from hsm_ca.fileio import CONFIG_BYTES, InputError, read_text_file

    try:
        text = read_text_file(path, CONFIG_BYTES, what)
    except InputError as e:  # "path: reason", like every other error about the file
        raise error(f"{path}: {e.reason}") from None
    return parse_toml(text, str(path), error), text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render_config(cfg: HomeConfig) -> str:
    lines = [
        "# hsm-ca home configuration (written by 'hsm-ca init')",
        f"engine = {_toml_value(cfg.engine)}",
        f"user = {_toml_value(cfg.configured_user or cfg.user)}",
        f"officer = {_toml_value(cfg.officer)}",
        f"ocsp_cache_seconds = {cfg.ocsp_cache_seconds}",
    ]
    if cfg.base_url:
        lines.append(f"base_url = {_toml_value(cfg.base_url)}")
    if cfg.partition_id:
        lines.append(f"partition_id = {_toml_value(cfg.partition_id)}")
    if cfg.nodes:
        lines.append("# replica partitions of the built-in engine (hsm-ca hsm node add)")
        lines.append("nodes = [" + ", ".join(_toml_value(str(n)) for n in cfg.nodes) + "]")
    defaults = HomeConfig(home=cfg.home)
    for key in OCSP_KEYS:
        if getattr(cfg, key) != getattr(defaults, key):
            lines.append(f"{key} = {_toml_value(getattr(cfg, key))}")
    if cfg.server != defaults.server:
        lines.append("")
        lines.append("[server]")
        for key in SERVER_KEYS:
            value = getattr(cfg.server, key)
            if value is not None and value != getattr(defaults.server, key):
                lines.append(f"{key} = {_toml_value(value)}")
    if cfg.pkcs11:
        lines.append("")
        lines.append("[pkcs11]")
        lines.append(f"module = {_toml_value(cfg.pkcs11.module)}")
        if cfg.pkcs11.token_label:
            lines.append(f"token_label = {_toml_value(cfg.pkcs11.token_label)}")
        if cfg.pkcs11.uri:
            lines.append(f"uri = {_toml_value(cfg.pkcs11.uri)}")
        if not cfg.pkcs11.signing_helper:
            lines.append("signing_helper = false")
    return "\n".join(lines) + "\n"


_TOP_KEYS = {"engine", "base_url", "user", "officer", "ocsp_cache_seconds", "pkcs11", "nodes",
             "partition_id", "server", *OCSP_KEYS}
SERVER_KEYS = ("idle_timeout", "read_timeout", "write_timeout", "max_connections")
_MAX_TIMEOUT = 86_400.0  # a day: anything longer is a typo, and huge floats overflow call_later


def _number(path: Path, field_name: str, value: Any, *, low: float, high: float,
            integer: bool = False) -> Any:
    """A number setting within [low, high]; the error names the file and the field."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not low <= value <= high:
        raise ConfigError(f"{path}: field {field_name!r} must be {kind} from {low:g} to {high:g}")
    return value


def _ocsp_settings(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The top-level OCSP nonce settings: the mode, and the per-client and global rations."""
    mode = data.get("ocsp_nonces", "honor")
    if mode not in OCSP_NONCE_MODES:
        raise ConfigError(f"{path}: field 'ocsp_nonces' must be 'honor' or 'ignore'")
    defaults = HomeConfig(home=path.parent)
    values: dict[str, Any] = {"ocsp_nonces": mode}
    for prefix in ("ocsp_nonce", "ocsp_nonce_global"):
        rate, burst = f"{prefix}_rate", f"{prefix}_burst"
        values[rate] = float(_number(path, rate, data.get(rate, getattr(defaults, rate)),
                                     low=0, high=1e6))
        values[burst] = _number(path, burst, data.get(burst, getattr(defaults, burst)), low=0,
                                high=1e6, integer=True)
    return values


def _server_settings(path: Path, section: Any) -> ServerSettings:
    """``[server]``: timeouts in seconds (greater than 0) and an optional connection cap."""
    if section is None:
        return ServerSettings()
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: field 'server' must be a [server] table")
    for key in section:
        if key not in SERVER_KEYS:
            raise ConfigError(f"{path}: unknown field 'server.{key}'")
    values: dict[str, Any] = {}
    for key in ("idle_timeout", "read_timeout", "write_timeout"):
        if key in section:
            value = _number(path, f"server.{key}", section[key], low=0, high=_MAX_TIMEOUT)
            if value == 0:
                raise ConfigError(f"{path}: field 'server.{key}' must be greater than 0")
            values[key] = float(value)
    if "max_connections" in section:
        values["max_connections"] = _number(path, "server.max_connections",
                                            section["max_connections"], low=1, high=1 << 20,
                                            integer=True)
    return ServerSettings(**values)


def load_config(home: Path) -> HomeConfig:
    """Parse and validate ``HOME/hsm-ca.toml``; errors name the file and field."""
    path = home / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{home} is not an hsm-ca home (no {CONFIG_FILE}); run 'hsm-ca init'")
    data, _text = read_toml(path)
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{path}: unknown field {key!r}")
    engine = data.get("engine", "soft")
    if engine not in ("soft", "pkcs11"):
        raise ConfigError(
            f"{path}: field 'engine' must be 'soft' or 'pkcs11', not {repr(engine)[:64]}")
    for key in ("base_url", "user", "officer"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{path}: field {key!r} must be a string")
    cache = data.get("ocsp_cache_seconds", 300)
    if isinstance(cache, bool) or not isinstance(cache, int) or not 0 <= cache <= 7 * 86400:
        raise ConfigError(
            f"{path}: field 'ocsp_cache_seconds' must be an integer from 0 to 604800 (a week)")
    pkcs11 = None
    if engine == "pkcs11":
        section = data.get("pkcs11")
        if not isinstance(section, dict) or not isinstance(section.get("module"), str):
            raise ConfigError(f"{path}: engine 'pkcs11' needs [pkcs11] with a 'module' path")
        for key in section:
            if key not in ("module", "token_label", "uri", "signing_helper"):
                raise ConfigError(f"{path}: unknown field 'pkcs11.{key}'")
        for key in ("token_label", "uri"):
            if key in section and not isinstance(section[key], str):
                raise ConfigError(f"{path}: field 'pkcs11.{key}' must be a string")
        helper = section.get("signing_helper", True)
        if not isinstance(helper, bool):
            raise ConfigError(f"{path}: field 'pkcs11.signing_helper' must be true or false")
        pkcs11 = Pkcs11Settings(
            module=section["module"],
            token_label=section.get("token_label"),
            uri=section.get("uri"),
            signing_helper=helper,
        )
    nodes = data.get("nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
        raise ConfigError(f"{path}: field 'nodes' must be a list of directory paths")
    base_url = data.get("base_url")
    ocsp_settings = _ocsp_settings(path, data)
    server = _server_settings(path, data.get("server"))
    return HomeConfig(
        **ocsp_settings,
        server=server,
        nodes=tuple(Path(n) for n in nodes),
        partition_id=data.get("partition_id") if isinstance(data.get("partition_id"), str) else None,
        configured_user=data.get("user", DEFAULT_USER),
        home=home,
        engine=engine,
        base_url=base_url.rstrip("/") if base_url else None,
        user=os.environ.get(USER_ENV) or data.get("user", DEFAULT_USER),
        officer=data.get("officer", DEFAULT_OFFICER),
        pkcs11=pkcs11,
        ocsp_cache_seconds=cache,
    )


def write_config(cfg: HomeConfig) -> None:
    """Rewrite the home's config atomically (node changes)."""
    from hsm_ca.fileio import atomic_write

    atomic_write(cfg.config_path, render_config(cfg).encode(), 0o600)


def validate_base_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"--base-url must be an http(s) URL without query, not {url!r}")
    return url.rstrip("/")


# ---------------------------------------------------------------- PINs
PinSource = Callable[[], str]


def _read_pin_file(path: Path) -> str:
    """A PIN from a regular file of at most fileio.PIN_FILE_BYTES (never /dev/zero or a FIFO)."""
    from hsm_ca.fileio import PIN_FILE_BYTES, InputError, read_text_file, show_path

    try:
        text = read_text_file(path, PIN_FILE_BYTES, "PIN file")
    except InputError as e:
        raise ConfigError(str(e)) from None
    pin = text.rstrip("\r\n")
    if not pin:
        raise ConfigError(f"PIN file {show_path(path)} is empty")
    return pin


def pin_source(
    kind: str, pin_file: Path | None, prompt: Callable[[str], str] | None = None
) -> PinSource:
    """A lazy PIN getter: env, then file, then a hidden prompt on a TTY; never argv.

    Lazy, so commands that turn out not to need the HSM never ask for a PIN.
    """
    env_name = PIN_ENV if kind == "user" else SO_PIN_ENV
    flag = "--pin-file" if kind == "user" else "--so-pin-file"
    label = "crypto-user PIN" if kind == "user" else "crypto-officer PIN"
    cached: list[str] = []

    def get() -> str:
        if cached:
            return cached[0]
        if pin_file is not None:
            pin = _read_pin_file(pin_file)
        elif os.environ.get(env_name):
            pin = os.environ[env_name]
        elif sys.stdin is not None and sys.stdin.isatty() and prompt is not None:
            pin = prompt(label)
        else:
            raise ConfigError(f"no {label}: set ${env_name}, pass {flag} FILE, or run on a terminal")
        cached.append(pin)
        return pin

    return get
