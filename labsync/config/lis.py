"""The ``[lis]`` section: the transport keys every adapter shares, and how labsync logs in.

``lis.auth`` chooses the credential (existing configs, without it, keep ``X-Api-Key``):

- ``"api-key"`` (default): ``api_key`` / ``api_key_file`` in the header ``X-Api-Key``, or in
  the one ``auth_header`` names;
- ``"bearer"``: ``token`` / ``token_file`` as ``Authorization: Bearer …``;
- ``"basic"``: ``username`` and ``password`` / ``password_file`` as HTTP Basic;
- ``"header"``: ``auth_header`` with the whole value in ``auth_value`` / ``auth_value_file``.

Each adapter's own keys live in ``[lis.<adapter>]`` (``adapters.py`` declares them); its
schema also says whether it needs ``base_url`` and a credential at all.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from labsync.config.adapters import AdapterSchema, adapter_names, adapter_schema
from labsync.config.readers import NO_SECRET, Invalid, Secret
from labsync.config.schema import Context, Key, Kind, Section, read_section, table_of

AUTH_MODES = ("api-key", "bearer", "basic", "header")
DEFAULT_KEY_HEADER = "X-Api-Key"
# The keys each mode uses, and of those the ones it cannot do without.
_USES = {"api-key": ("api_key", "auth_header"), "bearer": ("token",),
         "basic": ("username", "password"), "header": ("auth_header", "auth_value")}
_NEEDS = {"api-key": ("api_key",), "bearer": ("token",), "basic": ("username", "password"),
          "header": ("auth_header", "auth_value")}
_AUTH_KEYS = ("api_key", "auth_header", "token", "username", "password", "auth_value")
# What the operator fixes when the LIS refuses the credential: (key, what it holds)
_CREDENTIAL = {"api-key": ("lis.api_key", "API key"), "bearer": ("lis.token", "token"),
               "basic": ("lis.password", "user name and password"),
               "header": ("lis.auth_value", "lis.auth_header value")}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
# Headers labsync sends itself: an auth_header of one of these would replace it.
_OWN_HEADERS = frozenset({"accept", "user-agent", "content-type", "content-length", "host",
                          "accept-encoding", "connection", "cookie"})


def _known_adapter(name: str) -> str:
    if adapter_schema(name) is None:
        raise Invalid(f"unknown adapter {name!r} (known: {', '.join(adapter_names())})")
    return name


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise Invalid("must start with http:// or https://")
    return url.rstrip("/")


def _header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise Invalid(f"{name!r} is not an HTTP header name")
    if name.lower() in _OWN_HEADERS:
        raise Invalid(f"{name} is a header labsync sets itself")
    return name


LIS = Section("lis", (
    Key("adapter", default="qlab", check=_known_adapter),
    Key("base_url", check=_http_url),
    Key("auth", default="api-key", choices=AUTH_MODES),
    Key("api_key", Kind.SECRET, nonempty=True),
    Key("auth_header", nonempty=True, check=_header_name),
    Key("token", Kind.SECRET, nonempty=True),
    Key("username", nonempty=True),
    Key("password", Kind.SECRET, nonempty=True),
    Key("auth_value", Kind.SECRET, nonempty=True),
    Key("connect_timeout", Kind.FLOAT, default=5.0, above=0),
    Key("read_timeout", Kind.FLOAT, default=30.0, above=0),
    Key("max_concurrency", Kind.INT, default=8, above=0),
    Key("max_rps", Kind.FLOAT, default=0.0, low=0),
    Key("retry_attempts", Kind.INT, default=4, above=0),
    Key("retry_max_seconds", Kind.FLOAT, default=60.0, low=0),
    Key("ca_file", Kind.PATH, exists="file"),
    Key("download_timeout", Kind.FLOAT, default=300.0, above=0),
))


@dataclass(frozen=True)
class LisConfig:
    """The shared ``[lis]`` keys, the credential, and the adapter's own section (``options``)."""

    adapter: str
    base_url: str
    api_key: Secret = NO_SECRET
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_concurrency: int = 8
    max_rps: float = 0.0  # 0: no cap
    retry_attempts: int = 4  # tries per request, the first included
    retry_max_seconds: float = 60.0  # total time budget for one request's retries
    ca_file: Path | None = None  # extra CA bundle for a self-signed LIS; TLS is always verified
    download_timeout: float = 300.0  # a whole PDF download, however slowly the bytes come
    auth: str = "api-key"  # one of AUTH_MODES
    auth_header: str | None = None  # api-key: the header (X-Api-Key); header: the header
    token: Secret = NO_SECRET
    username: str | None = None
    password: Secret = NO_SECRET
    auth_value: Secret = NO_SECRET
    # [lis.<adapter>], validated; read-only. Not hashed: a mapping proxy is not hashable.
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}),
                                       hash=False)

    def auth_headers(self) -> dict[str, str]:
        """The headers that carry the credential, ``{}`` when there is none."""
        if self.auth == "bearer":
            return {"Authorization": f"Bearer {self.token.reveal()}"} if self.token else {}
        if self.auth == "basic":
            if not self.username:
                return {}
            pair = f"{self.username}:{self.password.reveal()}".encode()
            return {"Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}"}
        if self.auth == "header":
            if not self.auth_header or not self.auth_value:
                return {}
            return {self.auth_header: self.auth_value.reveal()}
        return {self.auth_header or DEFAULT_KEY_HEADER: self.api_key.reveal()} if self.api_key \
            else {}

    def secret_values(self) -> list[str]:
        """Every secret string: the declared secrets, and what the auth headers carry."""
        found = secret_strings(LIS, self)
        schema = adapter_schema(self.adapter)
        if schema is not None:
            for value in secret_strings(schema.section, self.options):
                found += [value, value.partition(" ")[2]]  # "Token abc": abc alone too
        for value in self.auth_headers().values():
            found += [value, value.partition(" ")[2]]  # "Basic <base64>": the base64 too
        return list(dict.fromkeys(s for s in found if s))

    def secret_header_names(self) -> list[str]:
        """The headers whose values are secret: the shared credential's, the adapter's own."""
        names = list(self.auth_headers())
        schema = adapter_schema(self.adapter)
        if schema is not None and schema.secret_headers is not None:
            names += schema.secret_headers(self.options)
        return list(dict.fromkeys(names))

    @property
    def credential(self) -> tuple[str, str]:
        """(the key to fix, what it holds) when the LIS refuses the credential."""
        return _CREDENTIAL.get(self.auth, _CREDENTIAL["api-key"])


def secret_strings(section: Section, values: Any) -> list[str]:
    """The values of ``section``'s secret keys in ``values`` (a mapping or an object)."""
    found = []
    for key in section.secret_keys:
        value = (values.get(key.name) if isinstance(values, Mapping)
                 else getattr(values, key.name, None))
        text = value.reveal() if isinstance(value, Secret) else value
        if isinstance(text, str) and text:
            found.append(text)
    return found


def lis_config_from(raw: Any, ctx: Context) -> LisConfig:
    """Validate ``[lis]`` and the adapter's ``[lis.<name>]``; problems go into ``ctx``."""
    table = table_of("lis", raw, ctx) or {}
    subtables = [name for name, value in table.items() if name not in LIS.known
                 and (isinstance(value, Mapping) or adapter_schema(name) is not None)]
    values = read_section(LIS, raw, ctx, tables=subtables)
    adapter: str = values["adapter"]
    schema = adapter_schema(adapter)
    options: Any = MappingProxyType({})
    for name in subtables:
        if adapter_schema(name) is None:
            ctx.problem(f"lis.{name}", f"unknown key (not an adapter's section; adapters: "
                                       f"{', '.join(adapter_names())})")
        elif name != adapter:
            ctx.problem(f"lis.{name}", f"[lis.{name}] has no effect: lis.adapter is "
                                       f"{adapter!r}")
    if schema is not None:
        section = read_section(schema.section, table.get(schema.name), ctx)
        options = schema.options(section)
    # An unknown adapter: its needs are not known; assume an HTTP one's, as qlab's.
    needs = schema or AdapterSchema(adapter)
    if needs.needs_base_url and "base_url" not in values.given:
        ctx.problem("lis.base_url", "required")
    if "auth" not in values.failed:
        _check_auth(values, table, ctx, required=needs.needs_credentials
                    or "auth" in values.given)
    return LisConfig(
        adapter=adapter, base_url=values["base_url"] or "",
        api_key=values["api_key"] or NO_SECRET, auth=values["auth"],
        auth_header=values["auth_header"], token=values["token"] or NO_SECRET,
        username=values["username"], password=values["password"] or NO_SECRET,
        auth_value=values["auth_value"] or NO_SECRET, options=options,
        **{name: values[name] for name in (
            "connect_timeout", "read_timeout", "max_concurrency", "max_rps", "retry_attempts",
            "retry_max_seconds", "ca_file", "download_timeout")},
    )


def _check_auth(values: Any, table: Mapping[str, Any], ctx: Context, *, required: bool
                ) -> None:
    mode: str = values["auth"]
    for name in _AUTH_KEYS:
        if name in values.given and name not in _USES[mode]:
            key = LIS.key(name)
            written = key.file_name if key.file_name in table else name
            users = " or ".join(f'"{m}"' for m, used in _USES.items() if name in used)
            ctx.problem(f"lis.{written}", f"used only with lis.auth = {users} "
                                          f'(lis.auth is "{mode}")')
    if required:
        for name in _NEEDS[mode]:
            if name in values.given:
                continue
            key = LIS.key(name)
            alternative = f" (or lis.{key.file_name})" if key.kind is Kind.SECRET else ""
            if mode == "api-key":
                ctx.problem(f"lis.{name}", f"required{alternative}")
            else:
                ctx.problem(f"lis.{name}", f'required with lis.auth = "{mode}"{alternative}')
    username = values["username"]
    if mode == "basic" and values.ok("username") and ":" in username:
        ctx.problem("lis.username", "must not contain ':' (HTTP Basic puts it between the "
                                    "user name and the password)")
