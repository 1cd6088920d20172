"""Step 1 of the CLIP tokenizer (``common.tokenizers.clip_bpe``): the reference's text cleaning,
``whitespace_clean(basic_clean(text)).lower()`` of openai/CLIP ``clip/simple_tokenizer.py``, string for string:
``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse every ``regex`` ``\\s+`` run to one space, strip,
``str.lower``.

Fast paths skip the steps that cannot change the text:
* Text made only of printable ASCII without ``&`` (plus tab, newline and carriage return) skips
  ``ftfy`` and ``html.unescape``: on that alphabet every ftfy fixer, NFC normalization and HTML
  unescaping is the identity, and ``str.split`` splits on exactly the characters ``regex``'s
  ``\\s`` matches. With ``&`` (HTML entities) it skips ftfy's mojibake detection and the fixers that
  cannot apply (``_fix_ascii_text``). Other text skips ftfy when ftfy would return it unchanged, told
  without running it (``_ftfy_leaves_unchanged``: one NFC line without ``&``, no character that one of
  ftfy's fixers changes, and none of the characters every mojibake match needs, both sets read off
  ftfy's own tables and detector regex).

``tests/test_clip_bpe.py`` checks this cleaning against the reference's and each set against ftfy over
all of Unicode.
"""

from __future__ import annotations

import html
import re as std_re
import unicodedata
from collections.abc import Iterable

import ftfy
import ftfy.badness
import ftfy.chardata
import ftfy.fixes
import regex

_WHITESPACE_RUN = regex.compile(r"\s+")
# Anything outside printable ASCII minus '&', plus \t \n \r, needs the full ftfy + HTML cleaning.
NEEDS_FULL_CLEAN = std_re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")
# ... and ftfy itself only outside printable ASCII plus \t \n \r (see _fix_ascii_text).
NEEDS_FTFY = std_re.compile(r"[^\t\n\r\x20-\x7e]")
ASCII_CONTROLS = std_re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # the ASCII outside that alphabet
_FTFY_MAX_SEGMENT = 1_000_000  # ftfy's max_decode_length: longer lines are cut into segments


def _fix_ascii_text(text: str) -> str | None:
    """``ftfy.fix_text(text)`` (default configuration) for text of printable ASCII plus tab, newline and
    carriage return, or None when its HTML entities decode to anything else (then ftfy decides).

    On that alphabet every ftfy fixer but two is the identity (mojibake detection returns ASCII text
    unchanged; ligatures, widths, quotes, C1 and terminal controls, surrogates, NFC need non-ASCII or
    control characters), so ftfy reduces to its loop of ``unescape_html`` and ``fix_line_breaks`` per
    line, with HTML unescaping switched off from the first line holding a ``<`` on, as ``fix_text`` does.
    ``tests/test_clip_bpe.py`` checks this against ftfy on fuzzed entity-laden text.
    """
    if len(text) > _FTFY_MAX_SEGMENT:
        return None
    out, unescape = [], True
    lines = text.split("\n")
    for n, line in enumerate(lines):
        segment = line if n == len(lines) - 1 else line + "\n"
        unescape = unescape and "<" not in segment
        # ftfy repeats (unescape, fix line breaks) until nothing changes. Line breaks (\r) never take part
        # in an entity, so that fixed point is: unescape until nothing changes, then fix line breaks once.
        while unescape and "&" in segment:
            fixed = ftfy.fixes.unescape_html(segment)
            if fixed == segment:
                break
            if NEEDS_FTFY.search(fixed):
                return None
            segment = fixed
        if "\r" in segment:
            segment = ftfy.fixes.fix_line_breaks(segment)
        out.append(segment)
    return "".join(out)


def _char_class(codepoints: Iterable[int]) -> str:
    """A regex character class of exactly these code points, written as ranges."""
    ranges: list[list[int]] = []
    for c in sorted(set(codepoints)):
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[" + "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]"


def _ftfy_touched_pattern() -> std_re.Pattern:
    """Every character that one of ftfy's per-character fixers (all of ``fix_text``'s steps but HTML
    unescaping, mojibake detection and NFC) can change or needs: ligatures, fullwidth and halfwidth
    forms, control characters, C1 controls, curly quotes, line breaks (CR, U+0085, U+2028, U+2029),
    surrogates and ESC (terminal escapes). Built from ftfy's own tables; ``tests/test_clip_bpe.py``
    checks every code point outside it against each fixer."""
    codepoints = {*ftfy.chardata.LIGATURES, *ftfy.chardata.WIDTH_MAP, *ftfy.chardata.CONTROL_CHARS,
                  *range(0x80, 0xA0), 0x0D, 0x1B, 0x2028, 0x2029, *range(0xD800, 0xE000)}
    quotes = (ftfy.chardata.SINGLE_QUOTE_RE.pattern, ftfy.chardata.DOUBLE_QUOTE_RE.pattern)
    return std_re.compile("|".join((_char_class(codepoints), *quotes)))


def _mojibake_codepoints() -> set[int] | None:
    """Non-ASCII code points of which every match of ftfy's mojibake detector (``badness.BADNESS_RE``)
    holds at least one, read off the regex itself: each of its alternatives must have a character or
    character class that is not optional and holds only non-ASCII characters, and the set is the union
    of those. Text with none of them is not bad, with no regex search over it. None when an
    alternative has no such element (a future ftfy's), and then every text goes to ``is_bad``."""
    try:  # the standard library's regex parser (private, but what re.compile runs)
        import re._constants as sre
        import re._parser
    except ImportError:
        return None

    def members(op, arg) -> set[int] | None:
        if op is sre.LITERAL:
            return {arg}
        if op is sre.IN and all(o in (sre.LITERAL, sre.RANGE) for o, _ in arg):
            return {c for o, a in arg for c in ((a,) if o is sre.LITERAL else range(a[0], a[1] + 1))}
        return None

    try:
        tree = re._parser.parse(ftfy.badness.BADNESS_RE.pattern, ftfy.badness.BADNESS_RE.flags)
        (op, (_, alternatives)), = tree.data
        if op is not sre.BRANCH:
            return None
    except (AttributeError, ValueError, TypeError, std_re.error):
        return None
    codepoints = set()
    for alternative in alternatives:
        required = [m for m in (members(op, arg) for op, arg in alternative.data) if m and min(m) >= 0x80]
        if not required:
            return None
        codepoints.update(*required)
    return codepoints


_FTFY_TOUCHED = _ftfy_touched_pattern()
_MOJIBAKE_CODEPOINTS = _mojibake_codepoints()
# Text with none of these characters is left as it is by every ftfy step but HTML unescaping and NFC.
_FTFY_SUSPECT = None if _MOJIBAKE_CODEPOINTS is None else std_re.compile(
    f"{_char_class(_MOJIBAKE_CODEPOINTS)}|{_FTFY_TOUCHED.pattern}")


def _ftfy_leaves_unchanged(text: str) -> bool:
    """True when ``ftfy.fix_text(text)`` (default configuration) is ``text`` itself, told without
    running it; False means ftfy must decide. For one line (no newline, at most ftfy's segment
    length) with no ``&``: HTML unescaping needs an entity, mojibake detection leaves text that
    ``badness.is_bad`` passes alone (as all text without a character of ``_MOJIBAKE_CODEPOINTS``),
    the per-character fixers need a character of ``_FTFY_TOUCHED``, and NFC changes only text that is
    not NFC. So ftfy's first round changes nothing and it stops."""
    if "\n" in text or "&" in text or len(text) > _FTFY_MAX_SEGMENT or not unicodedata.is_normalized("NFC", text):
        return False
    if _FTFY_SUSPECT is not None and _FTFY_SUSPECT.search(text) is None:
        return True
    return _FTFY_TOUCHED.search(text) is None and not ftfy.badness.is_bad(text)


def clean_text(text: str) -> str:
    """The reference's ``whitespace_clean(basic_clean(text)).lower()``, with fast paths that skip
    the steps that cannot change the text (each proved equal to the reference's in the tests)."""
    if not NEEDS_FULL_CLEAN.search(text):
        return " ".join(text.split()).lower()
    if NEEDS_FTFY.search(text):
        fixed = text if _ftfy_leaves_unchanged(text) else ftfy.fix_text(text)
    else:
        fixed = _fix_ascii_text(text)
        if fixed is None:
            fixed = ftfy.fix_text(text)
    if "&" in fixed:  # html.unescape returns text without "&" as it is
        fixed = html.unescape(html.unescape(fixed))
    if not NEEDS_FTFY.search(fixed):  # printable ASCII, \t \n \r: str.split splits on exactly regex's \s
        return " ".join(fixed.split()).lower()
    return _WHITESPACE_RUN.sub(" ", fixed.strip()).strip().lower()
