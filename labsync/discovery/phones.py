"""Phone numbers as people type them into a profile, made comparable: E.164 or nothing.

``b_user_phone_auth.PHONE_NUMBER`` is E.164 already; ``PERSONAL_MOBILE`` and
``PERSONAL_PHONE`` are free text (``8 (916) 123-45-67``, ``+7 916 1234567``,
``916-123-45-67``, sometimes two numbers or a note). ``phonenumbers`` parses them with
``discovery.default_region`` for numbers written without a country code; the Russian trunk
prefix ``8`` is understood. Only valid numbers of a kind a person owns count: a toll-free
``8 800`` line or a premium-rate number is a company's, and asking the LIS about it would
bring back every patient who ever gave it.
"""

from __future__ import annotations

import phonenumbers
from phonenumbers import Leniency, NumberParseException, PhoneNumber, PhoneNumberType

DEFAULT_REGION = "RU"
# Longer than any phone column labsync reads (255); longer text is not a phone field.
_MAX_TEXT = 255
PERSONAL_TYPES = frozenset({
    PhoneNumberType.MOBILE,
    PhoneNumberType.FIXED_LINE,
    PhoneNumberType.FIXED_LINE_OR_MOBILE,
    PhoneNumberType.PERSONAL_NUMBER,
    PhoneNumberType.VOIP,
})


def normalise_phone(text: str | None, region: str = DEFAULT_REGION) -> str | None:
    """``text`` as one E.164 number (``+79161234567``), or None if it is not one valid number."""
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_TEXT:
        return None
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException:
        return None
    return _personal_e164(number)


def phones_in(text: str | None, region: str = DEFAULT_REGION) -> list[str]:
    """Every valid personal number in a free-text field, as E.164, in the order written.

    A field holding exactly one number is parsed whole; otherwise the numbers are picked
    out of the text (``8-916-123-45-67, 8 495 123-45-67``; ``89161234567 (мама)``).
    """
    single = normalise_phone(text, region)
    if single is not None:
        return [single]
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        return []
    found: list[str] = []
    for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=Leniency.VALID):
        e164 = _personal_e164(match.number)
        if e164 is not None and e164 not in found:
            found.append(e164)
    return found


def national_digits(e164: str) -> str:
    """The national significant number of an E.164 number (``+79161234567`` → ``9161234567``).

    However a profile field is formatted, these digits appear in it without a break once
    spaces, dashes, dots and brackets are taken out: the SQL pre-filter for candidates.
    """
    return phonenumbers.national_significant_number(phonenumbers.parse(e164, None))


def mask_phone(phone: str | None) -> str:
    """A phone for logs and the admin log: enough to tell two apart, not enough to call."""
    return f"…{phone[-4:]}" if isinstance(phone, str) and len(phone) > 4 else "…"


def _personal_e164(number: PhoneNumber) -> str | None:
    if not phonenumbers.is_valid_number(number):
        return None
    if phonenumbers.number_type(number) not in PERSONAL_TYPES:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
