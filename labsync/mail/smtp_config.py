"""The ``[smtp]`` section: where labsync's own mail goes, validated into a frozen ``SmtpConfig``.

Used when ``notify.backend = "smtp"``: labsync renders the mail itself and hands it to an SMTP
server, instead of queueing a ``b_event`` row for the site's mail agent. Every problem is
reported with its key (``smtp.port: must be an integer from 1 to 65535``); the templates are
loaded and checked here too, so a template mistake is a config error at start-up.

The templates come with the package (``default_templates/ru`` and ``default_templates/en``
beside this module; ``smtp.language`` picks one, Russian by default), so an installed
labsync needs no template files of its own. ``smtp.templates`` names a folder of the
site's own instead, usually a copy of a built-in set, edited.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labsync.errors import ConfigError

if TYPE_CHECKING:  # labsync.config imports this module: no import of it at load time
    from labsync.config import Secret

# Shipped as package data (pyproject.toml): one folder per language, the same six files each.
BUILTIN_TEMPLATES = Path(__file__).resolve().parent / "default_templates"
LANGUAGES = ("ru", "en")
DEFAULT_LANGUAGE = "ru"
KNOWN_KEYS = frozenset({
    "host", "port", "from", "starttls", "ssl", "username", "password_file", "templates",
    "language", "site_url", "timeout", "ca_file",
})


def builtin_templates(language: str = DEFAULT_LANGUAGE) -> Path:
    """The folder of the templates labsync ships for ``language`` (one of ``LANGUAGES``)."""
    if language not in LANGUAGES:
        raise ValueError(f"no built-in templates for {language!r} (known: {LANGUAGES})")
    return BUILTIN_TEMPLATES / language


_DEFAULT_FOLDER = builtin_templates()
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Good enough to catch a name or a typo where an address belongs; the server has the last word.
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class SmtpConfig:
    """How to reach the SMTP server, who the mail is from, and where its templates are."""

    host: str
    sender: str  # the ``from`` key: "lab@example.ru" or "Лаборатория <lab@example.ru>"
    site_url: str  # "https://lab.example.ru", no trailing slash: makes result links absolute
    port: int = 587
    starttls: bool = True
    ssl: bool = False  # implicit TLS (port 465)
    username: str | None = None
    password: Secret | None = None
    templates: Path = _DEFAULT_FOLDER  # the folder in use: built-in, or smtp.templates
    language: str | None = None  # smtp.language as given: the built-in set (None: "ru")
    timeout: float = 30.0  # seconds, per SMTP command
    ca_file: Path | None = None  # extra CA bundle for a relay with its own CA; always verified

    @property
    def uses_builtin_templates(self) -> bool:
        """Whether the mail comes from a set labsync ships (no ``smtp.templates``)."""
        return self.templates.parent == BUILTIN_TEMPLATES

    @property
    def sender_address(self) -> str:
        """The bare address of ``from`` (the envelope sender)."""
        return parseaddr(self.sender)[1]

    @property
    def message_id_domain(self) -> str:
        """The right-hand side of every Message-ID: the sender's domain."""
        return self.sender_address.rpartition("@")[2].lower()


def smtp_config_from(
    raw: Mapping[str, Any], env: Mapping[str, str], *, required: bool = False
) -> tuple[SmtpConfig | None, list[str]]:
    """Validate an ``[smtp]`` table: the config (``None`` when absent) and every problem.

    ``required`` (``notify.backend = "smtp"``) makes an absent or empty section a problem.
    """
    if not isinstance(raw, Mapping):
        return None, ["smtp: must be a table ([smtp])"]
    if not raw:
        return None, (['smtp.host: required (notify.backend = "smtp")'] if required else [])
    reader = _Reader(raw, env)
    config = reader.build()
    return (None, reader.problems) if reader.problems else (config, [])


class _Reader:
    def __init__(self, raw: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.raw = raw
        self.env = env
        self.problems = [f"smtp.{name}: unknown key" for name in raw if name not in KNOWN_KEYS]

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"smtp.{key}: {message}")

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if key not in self.raw:
            if required:
                self.problem(key, "required")
            return default
        value = self.raw[key]
        if not isinstance(value, str):
            self.problem(key, "must be a string")
            return default
        missing = sorted({m for m in _ENV_REF.findall(value) if m not in self.env})
        if missing:
            self.problem(key, f"environment variable {', '.join(missing)} is not set")
            return default
        value = _ENV_REF.sub(lambda m: self.env[m.group(1)], value).strip()
        if not value:
            self.problem(key, "must not be empty")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.problem(key, "must be true or false")
            return default
        return value

    def build(self) -> SmtpConfig | None:
        host = self.text("host", required=True)
        sender = self.text("from", required=True)
        if sender is not None and not _ADDRESS.match(parseaddr(sender)[1]):
            self.problem("from", f"{sender!r} is not an e-mail address "
                                 "(like lab@example.ru or 'Lab <lab@example.ru>')")
        site_url = self.text("site_url", required=True)
        if site_url is not None and not re.match(r"^https?://[^/\s]+", site_url):
            self.problem("site_url", "must be the site's address, like https://lab.example.ru")

        use_ssl = self.flag("ssl", False)
        starttls = self.flag("starttls", not use_ssl)
        if use_ssl and starttls:
            self.problem("starttls", "give smtp.starttls or smtp.ssl, not both "
                                     "(ssl: TLS from the start, usually port 465; "
                                     "starttls: upgrade on port 587)")
        port = self.raw.get("port", 465 if use_ssl else 587)
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            self.problem("port", "must be an integer from 1 to 65535")
            port = 587
        timeout = self.raw.get("timeout", 30.0)
        if (not isinstance(timeout, int | float) or isinstance(timeout, bool)
                or timeout <= 0):
            self.problem("timeout", "must be a number of seconds, more than zero")
            timeout = 30.0

        username = self.text("username")
        password = self._password()
        if username is not None and password is None and "password_file" not in self.raw:
            self.problem("password_file", "required with smtp.username")
        if password is not None and username is None and "username" not in self.raw:
            self.problem("username", "required with smtp.password_file")
        if (username is not None and not (starttls or use_ssl) and host is not None
                and not is_loopback(host)):
            self.problem("username", "the password would cross the network unencrypted; "
                                     "set smtp.starttls = true or smtp.ssl = true")

        ca_file = self.text("ca_file")
        if ca_file is not None and not Path(ca_file).is_file():
            self.problem("ca_file", f"{ca_file} is not a file")
        language = self.raw.get("language")
        if language is not None and language not in LANGUAGES:
            self.problem("language", f"must be {' or '.join(map(repr, LANGUAGES))} (the "
                                     f"language of the built-in templates), not {language!r}")
            language = None
        templates: Path | None = None
        if "templates" in self.raw:  # the site's own folder; smtp.language does not apply
            folder = self.text("templates")
            if folder is not None:
                templates = Path(folder)
                self._check_templates(templates, builtin=False)
        else:
            templates = builtin_templates(language or DEFAULT_LANGUAGE)
            self._check_templates(templates, builtin=True)

        if (self.problems or host is None or sender is None or site_url is None
                or templates is None):
            return None
        return SmtpConfig(
            host=host, sender=sender, site_url=site_url.rstrip("/"), port=port,
            starttls=starttls, ssl=use_ssl, username=username, password=password,
            templates=templates, language=language, timeout=float(timeout),
            ca_file=Path(ca_file) if ca_file else None,
        )

    def _password(self) -> Secret | None:
        from labsync.config import Secret

        file_name = self.text("password_file")
        if file_name is None:
            return None
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.problem("password_file", f"cannot read {file_name} ({exc.strerror})")
            return None
        except UnicodeDecodeError:
            self.problem("password_file", f"{file_name} is not UTF-8 text")
            return None
        if not value:
            self.problem("password_file", f"{file_name} is empty")
            return None
        return Secret(value)

    def _check_templates(self, folder: Path, *, builtin: bool) -> None:
        if not folder.is_dir():
            if builtin:  # a broken installation, not a setting to fix
                self.problem("templates", f"the built-in templates are missing ({folder} is "
                                          "not a directory): reinstall labsync, or set "
                                          "smtp.templates to a folder of your own")
            else:
                self.problem("templates", f"{folder} is not a directory (leave smtp.templates "
                                          "out for the built-in templates, or copy the files "
                                          f"of {BUILTIN_TEMPLATES}/ru/ or en/ there to edit "
                                          "them)")
            return
        from labsync.mail.templates import MailTemplates

        try:
            MailTemplates(folder).validate()
        except ConfigError as exc:
            self.problems.extend(exc.problems)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
