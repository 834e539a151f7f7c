"""Personal data out: e-mail addresses, phone numbers and public IP addresses become
placeholders, counted per kind.

datatrove's PIIFormatter replaces e-mails and IPs with plausible fakes and counts nothing;
placeholders say what was there without inventing data, and the counts feed the report.
IPs go first so that a dotted address is never read as a phone number. An IP is replaced
only when public (`ipaddress`'s is_global), as datatrove does: 127.0.0.1 and 10.0.0.1 in
code and docs are not personal. A phone number is 7 to 15 digits in groups joined by
spaces, dots or dashes, with an optional +country code or (area code); bare digit runs
(ids, constants) and groups joined by spaces alone, without a + or (area code), are left
alone.
"""

from __future__ import annotations

import ipaddress
import re

from datatrove.pipeline.formatters.base import BaseFormatter

PLACEHOLDERS = {'email': '<EMAIL>', 'ip': '<IP_ADDRESS>', 'phone': '<PHONE>'}

_EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r'@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b')
_OCTET = r'(?:25[0-5]|2[0-4]\d|1?\d?\d)'
_IPV4 = re.compile(rf'(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\d.]*\d)')
_PHONE = re.compile(
    r'(?<![\w.+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])'
    r'\d{3,4}[ .-]\d{3,4}(?![\w.-]*\d)')


def _is_public_ip(text: str) -> bool:
  try:
    return ipaddress.ip_address(text).is_global
  except ValueError:
    return False


def _is_phone(text: str) -> bool:
  # Groups joined by spaces alone ("100 200 3000") are as often a row of numbers: such a
  # match counts only with a +country code or an (area code).
  marked = '+' in text or '(' in text or '-' in text or '.' in text
  return marked and 7 <= sum(c.isdigit() for c in text) <= 15


def scrub(text: str) -> tuple[str, dict[str, int]]:
  """The text with personal data replaced, and how many of each kind were replaced."""
  counts = dict.fromkeys(PLACEHOLDERS, 0)

  def replacer(kind, check=None):
    def replace(m: re.Match) -> str:
      if check is not None and not check(m.group(0)):
        return m.group(0)
      counts[kind] += 1
      return PLACEHOLDERS[kind]
    return replace

  text = _EMAIL.sub(replacer('email'), text)
  text = _IPV4.sub(replacer('ip', _is_public_ip), text)
  text = _PHONE.sub(replacer('phone', _is_phone), text)
  return text, counts


class PIIScrubber(BaseFormatter):
  """The datatrove block: scrubs each document, counting `pii_<kind>` and `pii_documents`."""

  name = 'pii'

  def format(self, text: str) -> str:
    text, counts = scrub(text)
    for kind, n in counts.items():
      if n:
        self.stat_update(f'pii_{kind}', value=n)
    if any(counts.values()):
      self.stat_update('pii_documents')
    return text
