"""The word and sentence splitter every preparation stage shares.

datatrove's English default is spaCy's blank tokenizer (and NLTK's punkt for sentences in
some blocks); neither is a dependency here, and punkt is a download. This regex splitter
needs neither and runs offline: a word is a run of letters, digits and underscores, or
one other non-space character (so Gopher's symbol and punctuation rules still see `#`,
`...` and `-`). It splits contractions and decimals ("don't", "3.5") into more pieces than
spaCy does, so the word-count rules see slightly more, shorter words on such text.
"""

from __future__ import annotations

import re

from datatrove.utils.text import TERMINAL_PUNCTUATION
from datatrove.utils.word_tokenizers import WordTokenizer, simple_span_tokenize

_WORD = re.compile(r'\w+|[^\w\s]')
# A sentence runs to terminal punctuation (and any closing quote) or to a newline.
_SENTENCE = re.compile(
    r'[^\n]+?(?:[' + re.escape(''.join(TERMINAL_PUNCTUATION)) + r']+["\'\u201d]?(?=\s|$)|(?=\n)|$)')


class RegexWords(WordTokenizer):
  """Words and sentences by regular expression; picklable, so worker processes get it."""

  def __init__(self) -> None:
    super().__init__('en')

  def word_tokenize(self, text: str) -> list[str]:
    return _WORD.findall(text)

  def sent_tokenize(self, text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]

  def span_tokenize(self, text: str) -> list[tuple[int, int]]:
    return list(simple_span_tokenize(text, self.sent_tokenize(text)))


WORDS = RegexWords()  # Passed as `language=` to every datatrove block that splits words.
