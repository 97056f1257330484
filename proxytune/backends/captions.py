"""LlamaGen's caption cleaning, and whether a subject identifier survives it.

LlamaGen's T5 features were extracted from cleaned captions, in training and in sampling (its
`language/t5.py`, inherited from PixArt / DeepFloyd IF): the caption is lower-cased, URLs, HTML,
@handles, CJK ideographs, file names, long numbers, product codes and a set of punctuation
characters are removed or replaced, and whitespace is collapsed; the whole pass runs twice. A
llamagen student sees its prompts the same way (`clean_caption`), so "a S* dog" reaches it as
"a s dog".

Pure Python (re, html, urllib, unicodedata), so `proxytune validate` can check identifiers without
torch. The original calls ftfy.fix_text and BeautifulSoup(..., "html.parser").text; proxytune
carries neither dependency and uses stdlib equivalents: `html.parser` keeps the text between tags
(comments, declarations and <script>/<style> bodies dropped, as BeautifulSoup's .text does), and
`_fix_text` does the parts of ftfy.fix_text that touch ordinary prompts (HTML entities, curly
quotes, ligatures, full-width forms, line breaks, control characters, NFC). What it does not do is
repair mojibake ("cafÃ©" stays as it is; ftfy would make it "café").
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse
from html.parser import HTMLParser

# -----------------------------------------------------------------------------
# the rules, in the order the original applies them

_URL_PATTERNS = (  # "http(s):..." and "www:..." / bare domains with one of these endings
    r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
    r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
)
# CJK strokes, katakana extensions, enclosed letters, compatibility, ideographs (ext. A, hexagrams, unified)
_CJK_RANGES = ("\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf",
               "\u4dc0-\u4dff", "\u4e00-\u9fff")
_DASHES = ("\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
           "\ufe31\ufe32\ufe58\ufe63\uff0d")
# characters replaced by a space wherever a run of them appears; note '*': "S*" loses its star
_BAD_PUNCT = re.compile("[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]{1,}")

# (pattern, replacement) before the basic clean-up (ftfy + HTML entities) ...
_BEFORE_BASIC: tuple[tuple[str, str], ...] = (
    (r"@[\w\d]+\b", ""),  # @nickname
    *((f"[{r}]+", "") for r in _CJK_RANGES),
    (f"[{_DASHES}]+", "-"),  # every kind of dash
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"[\.]{2,}", " "),
)
# ... and after it
_AFTER_BASIC: tuple[tuple[str, str], ...] = (
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (Latin x, Cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),  # a space after punctuation glued to the next word
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # one pair of surrounding quotes
    (r"^['\_,\-\:;]", ""),
    (r"['\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)
_BEFORE = tuple((re.compile(p), r) for p, r in _BEFORE_BASIC)
_AFTER = tuple((re.compile(p), r) for p, r in _AFTER_BASIC)
_SEPARATORS = re.compile(r"(?:\-|\_)")


class _TextOnly(HTMLParser):
    """The text between tags, character references decoded; comments, declarations and the bodies
    of script/style/template elements are left out."""

    _HIDDEN = {"script", "style", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in self._HIDDEN

    def handle_endtag(self, tag):
        if tag in self._HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def _html_text(text: str) -> str:
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


_LIGATURES = {"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st", "Ĳ": "IJ", "ĳ": "ij",
              "Ŀ": "L·", "ŀ": "l·", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
              "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj"}
_TERMINAL_ESCAPES = re.compile(r"\033\[((?:\d|;)*)([a-zA-Z])")
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\ufeff\ufff9-\ufffc\U000e0000-\U000e007f]")


def _fix_text(text: str) -> str:
    """ftfy.fix_text's clean-ups that apply to ordinary text (no mojibake repair)."""
    if "<" not in text:  # ftfy unescapes entities only in text that does not look like HTML
        text = html.unescape(text)
    text = _TERMINAL_ESCAPES.sub("", text)
    text = "".join(_LIGATURES.get(ch, ch) for ch in text)
    # full-width ASCII and the ideographic space -> their ordinary forms (half-width katakana left alone)
    text = "".join(unicodedata.normalize("NFKC", ch) if "\uff01" <= ch <= "\uff5e" or ch == "\u3000" else ch
                   for ch in text)
    text = re.sub("[\u2018\u2019\u201a\u201b\u2032]", "'", re.sub("[\u201c-\u201f\u2033]", '"', text))  # uncurl
    text = re.sub("\r\n|\r|\u2028|\u2029|\u0085", "\n", text)
    text = re.sub("[\ud800-\udfff]", "\ufffd", text)
    text = _CONTROL.sub("", text)
    return unicodedata.normalize("NFC", text)


def _clean_once(caption: str) -> str:
    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = caption.replace("<person>", "person")
    for pattern in _URL_PATTERNS:
        caption = re.sub(pattern, "", caption)
    caption = _html_text(caption)
    for pattern, replacement in _BEFORE:
        caption = pattern.sub(replacement, caption)
    caption = _BAD_PUNCT.sub(" ", caption)
    caption = re.sub(r"\s+\.\s+", " ", caption)
    if len(_SEPARATORS.findall(caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = _SEPARATORS.sub(" ", caption)
    caption = html.unescape(html.unescape(_fix_text(caption))).strip()  # the "basic clean"
    for pattern, replacement in _AFTER:
        caption = pattern.sub(replacement, caption)
    return caption.strip()


def clean_caption(caption: str) -> str:
    """A prompt as LlamaGen's T5 saw its captions: the clean-up above, applied twice as the original does."""
    return _clean_once(_clean_once(caption))


# -----------------------------------------------------------------------------
# identifiers

SURVIVING_EXAMPLE = "sks"  # lower-case letters: unchanged by the cleaning (and the spec's default token)


def identifier_problem(token: str, class_noun: str) -> tuple[str, str] | None:
    """How LlamaGen's cleaning treats a subject identifier in "a {token} {class}".

    Returns:
        None when the identifier reaches the model as written (up to lower case);
        ("error", why) when the cleaned prompt no longer differs from "a {class}" (the identifier is gone);
        ("warning", why) when it survives changed ("S*" -> "s").
    """
    prompt = f"a {token} {class_noun}"
    seen, plain = clean_caption(prompt), clean_caption(f"a {class_noun}")
    if seen == plain:
        return "error", (
            f"{token!r} does not survive LlamaGen's caption cleaning ({prompt!r} reaches the llamagen student as "
            f"{seen!r}); use a lower-case word of letters such as {SURVIVING_EXAMPLE!r}"
        )
    if clean_caption(token) != token.lower() or seen != prompt.lower():
        return "warning", (
            f"{token!r} reaches the llamagen student changed ({prompt!r} -> {seen!r}) by LlamaGen's caption "
            f"cleaning; a lower-case word of letters such as {SURVIVING_EXAMPLE!r} passes unchanged"
        )
    return None
