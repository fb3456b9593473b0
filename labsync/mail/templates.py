"""The mail's subject, text and HTML body, from jinja2 templates in one folder.

Per kind of mail (``ready``, ``updated``) the folder holds ``{kind}.subject.j2``,
``{kind}.txt.j2`` and ``{kind}.html.j2``. The folder chooses the language: labsync ships
``labsync/mail/default_templates/ru/`` (the default) and ``.../en/`` as package data,
chosen by ``smtp.language``; ``smtp.templates`` names a folder of the site's own instead
(``labsync.config.smtp``).

A template may use only the variables in ``VARIABLES``. Anything else, a syntax error or a
missing file is found by ``validate()`` at start-up and reported as a ``ConfigError``
naming the file (and the line): never a blank in a patient's mail. The HTML body is
autoescaped (a patient's name is data, not markup); the subject and the text body are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    meta,
    nodes,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment

from labsync.errors import ConfigError, LabsyncError

KINDS = ("ready", "updated")
PARTS = ("subject", "txt", "html")
VARIABLES: Mapping[str, str] = {
    "NAME": "the patient's first name (b_user.NAME; may be empty)",
    "LAST_NAME": "the patient's last name (b_user.LAST_NAME; may be empty)",
    "EMAIL": "the address the mail goes to (b_user.EMAIL)",
    "ORDER_ID": "the laboratory's order number (EXTERNAL_ORDER_ID)",
    "LOCAL_ORDER_ID": "the site's order ID (local_lab_orders.ID)",
    "RESULT_URL": "absolute link to the results: smtp.site_url + notify.result_url",
    "SITE_URL": "smtp.site_url",
    "VERSION": "version of the results: 1 for ready, 2, 3, ... for each correction",
}
# What validate() renders with: every variable set, as a real mail would have it.
SAMPLE: Mapping[str, Any] = {
    "NAME": "Анна", "LAST_NAME": "Иванова", "EMAIL": "patient@example.org",
    "ORDER_ID": "QL-2026-000123", "LOCAL_ORDER_ID": "123",
    "RESULT_URL": "https://lab.example.ru/personal/lab-results/123/",
    "SITE_URL": "https://lab.example.ru", "VERSION": 2,
}


class MailTemplateError(LabsyncError):
    """A validated template still failed on real data (the order is retried next pass)."""


@dataclass(frozen=True, slots=True)
class RenderedMail:
    """One mail as it will be sent: a one-line subject, a text body and an HTML body."""

    subject: str
    text: str
    html: str


def template_name(kind: str, part: str) -> str:
    return f"{kind}.{part}.j2"


class MailTemplates:
    """The templates of one folder: checked once by ``validate()``, then rendered per mail."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(self.folder)),
            undefined=StrictUndefined,
            # "ready.html.j2" ends in ".html.j2", which plain ["html"] would not match.
            autoescape=select_autoescape(enabled_extensions=("html", "html.j2"),
                                         default_for_string=False, default=False),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,  # what validate() checked is what is sent, whatever the disk says
        )
        self._compiled: dict[str, Template] | None = None

    def validate(self) -> None:
        """Load every template and render it with a sample; raise ``ConfigError`` listing
        every problem as ``smtp.templates: <file>[:line]: <what>``."""
        problems: list[str] = []
        compiled: dict[str, Template] = {}
        for kind in KINDS:
            for part in PARTS:
                name = template_name(kind, part)
                template = self._check(name, problems)
                if template is not None:
                    compiled[name] = template
        if problems:
            raise ConfigError(problems)
        self._compiled = compiled

    def render(self, kind: str, context: Mapping[str, Any]) -> RenderedMail:
        """The mail of ``kind`` for ``context`` (every name of ``VARIABLES``)."""
        if self._compiled is None:
            self.validate()
        assert self._compiled is not None
        parts: dict[str, str] = {}
        for part in PARTS:
            name = template_name(kind, part)
            try:
                parts[part] = self._compiled[name].render(context)
            except KeyError:
                raise MailTemplateError(f"no mail of kind {kind!r}") from None
            except TemplateError as exc:
                raise MailTemplateError(f"{self.folder / name}: {exc}") from None
        subject = " ".join(parts["subject"].split())  # one line, whatever the template did
        return RenderedMail(subject=subject, text=parts["txt"], html=parts["html"])

    # -- checks -------------------------------------------------------------------------

    def _check(self, name: str, problems: list[str]) -> Template | None:
        where = self.folder / name
        try:
            source = self.env.loader.get_source(self.env, name)[0]  # type: ignore[union-attr]
            ast = self.env.parse(source, name, str(where))
            template = self.env.get_template(name)
        except TemplateNotFound:
            problems.append(f"smtp.templates: {where}: missing")
            return None
        except TemplateSyntaxError as exc:
            problems.append(f"smtp.templates: {where}:{exc.lineno}: {exc.message}")
            return None
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"smtp.templates: {where}: cannot read ({exc})")
            return None
        # Every name the template looks up, including ones in branches a sample would skip.
        unknown = sorted(meta.find_undeclared_variables(ast) - set(VARIABLES)
                         - set(self.env.globals))
        for variable in unknown:
            problems.append(f"smtp.templates: {where}:{_first_line(ast, variable)}: "
                            f"'{variable}' is undefined (known: {', '.join(VARIABLES)})")
        if unknown:
            return None
        try:
            text = template.render(SAMPLE)
        except TemplateError as exc:
            line = _template_line(exc.__traceback__, str(where))
            problems.append(f"smtp.templates: {where}{f':{line}' if line else ''}: {exc}")
            return None
        if name.endswith(".subject.j2") and not text.strip():
            problems.append(f"smtp.templates: {where}: the subject is empty")
            return None
        return template


def _first_line(ast: nodes.Template, variable: str) -> int:
    for node in ast.find_all(nodes.Name):
        if node.name == variable and node.ctx == "load":
            return node.lineno
    return 1


def _template_line(tb: TracebackType | None, filename: str) -> int | None:
    """The template line an error happened on: jinja2 rewrites tracebacks so that the
    template's own frames carry its file name and line numbers."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
