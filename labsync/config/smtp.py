"""The ``[smtp]`` section: where labsync's own mail goes, validated into a frozen ``SmtpConfig``.

Used when ``notify.backend = "smtp"``: labsync renders the mail itself and hands it to an SMTP
server, instead of queueing a ``b_event`` row for the site's mail agent. Every problem is
reported with its key (``smtp.port: must be an integer from 1 to 65535``). Of the templates
only the folder is checked here: whether they render is the mail package's to say (jinja2,
above the config layer), and it says so when the notifier is built at start-up
(``SmtpNotifier``) and in ``labsync check``, naming the file and line.

The templates come with the package (``labsync/mail/default_templates/ru`` and ``.../en``;
``smtp.language`` picks one, Russian by default), so an installed labsync needs no template
files of its own. ``smtp.templates`` names a folder of the site's own instead, usually a
copy of a built-in set, edited.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from labsync.config.readers import Invalid, Secret
from labsync.config.schema import Context, Key, Kind, Section, read_section, table_of

# Shipped as package data of labsync.mail (pyproject.toml): one folder per language, the same
# six files each. A path only: the config layer does not import the mail package.
BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent / "mail" / "default_templates"
LANGUAGES = ("ru", "en")
DEFAULT_LANGUAGE = "ru"
# Good enough to catch a name or a typo where an address belongs; the server has the last word.
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def builtin_templates(language: str = DEFAULT_LANGUAGE) -> Path:
    """The folder of the templates labsync ships for ``language`` (one of ``LANGUAGES``)."""
    if language not in LANGUAGES:
        raise ValueError(f"no built-in templates for {language!r} (known: {LANGUAGES})")
    return BUILTIN_TEMPLATES / language


_DEFAULT_FOLDER = builtin_templates()


def _address(sender: str) -> str:
    if not _ADDRESS.match(parseaddr(sender)[1]):
        raise Invalid(f"{sender!r} is not an e-mail address "
                      "(like lab@example.ru or 'Lab <lab@example.ru>')")
    return sender


def _site_url(url: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        raise Invalid("must be the site's address, like https://lab.example.ru")
    return url.rstrip("/")


SMTP = Section("smtp", (
    Key("host", required=True, strip=True, nonempty=True),
    Key("port", Kind.INT, low=1, high=65535),  # default: 465 with ssl, else 587
    Key("from", required=True, strip=True, nonempty=True, check=_address),
    Key("starttls", Kind.BOOL),  # default: not ssl
    Key("ssl", Kind.BOOL, default=False),
    Key("username", strip=True, nonempty=True),
    Key("password", Kind.SECRET, inline=False, nonempty=True),  # password_file only
    Key("templates", Kind.PATH, strip=True, nonempty=True),
    Key("language", choices=LANGUAGES,
        message=f"must be {' or '.join(map(repr, LANGUAGES))} (the language of the built-in "
                "templates), not {value!r}"),
    Key("site_url", required=True, strip=True, nonempty=True, check=_site_url),
    Key("timeout", Kind.FLOAT, default=30.0, above=0,
        message="must be a number of seconds, more than zero"),
    Key("ca_file", Kind.PATH, strip=True, nonempty=True, exists="file"),
))


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


def smtp_from(raw: Any, ctx: Context, *, required: bool = False) -> SmtpConfig | None:
    """``[smtp]`` read into ``ctx``: the config, or None (absent, or a problem).

    ``required`` (``notify.backend = "smtp"``) makes an absent or empty section a problem.
    """
    table = table_of("smtp", raw, ctx)
    if table is None:
        return None
    if not table:
        if required:
            ctx.problem("smtp.host", 'required (notify.backend = "smtp")')
        return None
    found = len(ctx.problems)
    values = read_section(SMTP, table, ctx)
    problem = ctx.problem
    host, username, password = values["host"], values["username"], values["password"]
    use_ssl: bool = values["ssl"]
    starttls: bool = values["starttls"] if values.ok("starttls") else not use_ssl
    if use_ssl and starttls:
        problem("smtp.starttls", "give smtp.starttls or smtp.ssl, not both (ssl: TLS from the "
                                 "start, usually port 465; starttls: upgrade on port 587)")
    port = values["port"] if values.ok("port") else 465 if use_ssl else 587
    if username is not None and password is None and "password" not in values.given:
        problem("smtp.password_file", "required with smtp.username")
    if password is not None and username is None and "username" not in values.given:
        problem("smtp.username", "required with smtp.password_file")
    if (username is not None and not (starttls or use_ssl) and host is not None
            and not is_loopback(host)):
        problem("smtp.username", "the password would cross the network unencrypted; "
                                 "set smtp.starttls = true or smtp.ssl = true")
    language = values["language"]
    templates: Path | None = None
    if "templates" in values.given:  # the site's own folder; smtp.language does not apply
        if values.ok("templates"):
            templates = values["templates"]
            _check_template_folder(templates, ctx, builtin=False)
    else:
        templates = builtin_templates(language or DEFAULT_LANGUAGE)
        _check_template_folder(templates, ctx, builtin=True)
    if len(ctx.problems) > found or templates is None:
        return None
    return SmtpConfig(
        host=host, sender=values["from"], site_url=values["site_url"], port=port,
        starttls=starttls, ssl=use_ssl, username=username, password=password,
        templates=templates, language=language, timeout=values["timeout"],
        ca_file=values["ca_file"],
    )


def smtp_config_from(
    raw: Mapping[str, Any], env: Mapping[str, str] | None = None, *, required: bool = False
) -> tuple[SmtpConfig | None, list[str]]:
    """Validate an ``[smtp]`` table: the config (``None`` when absent) and every problem."""
    ctx = Context(os.environ if env is None else env)
    config = smtp_from(raw, ctx, required=required)
    return config, ctx.problems


def _check_template_folder(folder: Path, ctx: Context, *, builtin: bool) -> None:
    if not folder.is_dir():
        if builtin:  # a broken installation, not a setting to fix
            ctx.problem("smtp.templates", f"the built-in templates are missing ({folder} is "
                                          "not a directory): reinstall labsync, or set "
                                          "smtp.templates to a folder of your own")
        else:
            ctx.problem("smtp.templates", f"{folder} is not a directory (leave smtp.templates "
                                          "out for the built-in templates, or copy the files "
                                          f"of {BUILTIN_TEMPLATES}/ru/ or en/ there to edit "
                                          "them)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
