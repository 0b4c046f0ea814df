"""Rebuild data/demo/corpus.jsonl from two public-domain source texts.

The demo corpus is real prose, about half Japanese and half English by bytes:

* Japanese: Natsume Soseki, 吾輩は猫である (I Am a Cat), the first chapters of
  the Aozora Bunko transcription. Aozora ruby (《…》, ｜), editor notes
  (［＃…］), the notation legend and the colophon are removed; JIS X 0213
  characters that Aozora writes as ※［＃…、第3水準1-87-64］ are restored.
* English: the same author's Botchan (Master Darling), translated by Yasotaro
  Morri (1918, revised 1919), from a Project Gutenberg transcription. Every
  line that mentions Project Gutenberg (header, footer, license) is removed,
  as the Project Gutenberg license asks of anyone redistributing the stripped
  public-domain text, and so are the transcriber's errata markers.

Both files ship inside the Debian source package sentencepiece 0.1.97-3
(``data/wagahaiwa_nekodearu.txt`` and ``data/botchan.txt``); SOURCES.md says
how to fetch it. The script needs no network: pass the two paths.

    python data/demo/build_corpus.py \\
        --wagahai sentencepiece-0.1.97/data/wagahaiwa_nekodearu.txt \\
        --botchan sentencepiece-0.1.97/data/botchan.txt

Each output line is ``{"text": ..., "source": ..., "lang": "ja"|"en"}``; a
document is a run of whole paragraphs from one chapter, cut near
``--doc-bytes`` UTF-8 bytes (one paragraph longer than that is a document on
its own). The output is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# The exact bytes SOURCES.md describes; a different file would silently change
# the corpus, so it is refused.
WAGAHAI_SHA256 = "c2f778906046fd19ee7be2525fc32d1e1bff806d013ee80798894054f3be2c26"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "corpus.jsonl"
DEFAULT_JA_CHAPTERS = 3
DEFAULT_DOC_BYTES = 5000

# Gutenberg plain text is hard-wrapped near this width; _ends_paragraph uses it
# to tell a paragraph's last line from a wrapped one.
GUTENBERG_WRAP_WIDTH = 72
PARAGRAPH_FINAL_CHARS = (".", "!", "?", '"', "'", ")", ":", ";", "-")

AOZORA_RULER = re.compile(r"^-{20,}$")
AOZORA_CHAPTER_HEADING = re.compile(r"^［＃[^］]*字下げ］(.+?)［＃「\1」は中見出し］$")
AOZORA_GAIJI = re.compile(r"※［＃[^］]*?([12])-(\d{1,2})-(\d{1,2})］")
AOZORA_NOTE = re.compile(r"［＃[^］]*］")
AOZORA_RUBY = re.compile(r"《[^》]*》")
AOZORA_NOTATION_CHARS = re.compile(r"[｜〔〕※]")
AOZORA_COLOPHON_PREFIXES = ("底本：", "底本:")

GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK")
GUTENBERG_END = re.compile(r"^(End of (the )?Project Gutenberg|\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG EBOOK)")
GUTENBERG_CHAPTER = re.compile(r"^CHAPTER [IVXLC]+\.?$")
ERRATA_MARKER_IN_PARENS = re.compile(r" ?\(\[[A-Z]\]\)")
ERRATA_MARKER = re.compile(r"\[[A-Z]\]")
BOOK_END = "--(THE END)--"


class CorpusBuildError(Exception):
    """A source file is missing, not the expected one, or not shaped as expected."""


@dataclass
class Chapter:
    heading: str
    paragraphs: list[str]


@dataclass
class Work:
    source: str  # goes into each document's "source" field
    lang: str
    chapters: list[Chapter]


def read_source(path: Path, expected_sha256: str, flag: str) -> str:
    """Return the file's text after checking it is the byte-exact file SOURCES.md names."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CorpusBuildError(f"{flag} {path}: cannot read: {error.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise CorpusBuildError(
            f"{flag} {path}: sha256 is {digest}, expected {expected_sha256} "
            "(see data/demo/SOURCES.md for the exact file)"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CorpusBuildError(f"{flag} {path}: not UTF-8 at byte {error.start}") from None
    return text.replace("\r\n", "\n")


def _jis_x_0213_char(plane: int, row: int, cell: int) -> str | None:
    """Decode a JIS X 0213 plane-row-cell code through its EUC-JIS-2004 encoding."""
    if not (1 <= row <= 94 and 1 <= cell <= 94):
        return None
    euc = bytes([0xA0 + row, 0xA0 + cell])
    if plane == 2:
        euc = b"\x8f" + euc
    try:
        return codecs.decode(euc, "euc_jis_2004")
    except UnicodeDecodeError:
        return None


def _clean_aozora_line(line: str) -> str:
    def restore_gaiji(match: re.Match[str]) -> str:
        char = _jis_x_0213_char(int(match.group(1)), int(match.group(2)), int(match.group(3)))
        return char if char is not None else ""

    line = AOZORA_GAIJI.sub(restore_gaiji, line)
    line = AOZORA_NOTE.sub("", line)
    line = AOZORA_RUBY.sub("", line)
    # ｜ opens a ruby base, 〔…〕 wraps accent-decomposed Latin, a leftover ※
    # marks a gaiji that has no JIS X 0213 code: all three are notation only.
    line = AOZORA_NOTATION_CHARS.sub("", line)
    return line.rstrip()


def parse_aozora(text: str, path: Path) -> list[Chapter]:
    """Split an Aozora Bunko text file into chapters of plain paragraphs (one per line)."""
    lines = text.split("\n")
    rulers = [index for index, line in enumerate(lines) if AOZORA_RULER.match(line)]
    if len(rulers) < 2:
        raise CorpusBuildError(f"--wagahai {path}: no notation legend between two '-----' lines")
    body_start = rulers[1] + 1
    body_end = next(
        (index for index, line in enumerate(lines) if line.startswith(AOZORA_COLOPHON_PREFIXES)),
        None,
    )
    if body_end is None:
        raise CorpusBuildError(f"--wagahai {path}: no colophon line starting with 底本：")

    chapters: list[Chapter] = []
    for line_number, line in enumerate(lines[body_start:body_end], start=body_start + 1):
        heading = AOZORA_CHAPTER_HEADING.match(line)
        if heading:
            chapters.append(Chapter(heading=heading.group(1), paragraphs=[]))
            continue
        paragraph = _clean_aozora_line(line)
        if not paragraph.strip():
            continue
        if not chapters:
            raise CorpusBuildError(f"--wagahai {path}:{line_number}: text before the first chapter heading")
        chapters[-1].paragraphs.append(paragraph)
    return chapters


def _ends_paragraph(line: str, next_line: str, paragraph_start: str) -> bool:
    """Guess whether a hard-wrapped line is the last of its paragraph (the file has no blank lines)."""
    if not next_line or next_line.startswith((" ", "[Footnote")):
        return True
    if paragraph_start.startswith("[Footnote"):
        return line.endswith("]")
    next_word = next_line.split(" ", 1)[0]
    word_would_fit = len(line) + 1 + len(next_word) <= GUTENBERG_WRAP_WIDTH
    # The wrap width drifts by a few columns, so "fits" alone splits paragraphs
    # mid-sentence; a paragraph also ends on punctuation, or is a short heading.
    return word_would_fit and (line.endswith(PARAGRAPH_FINAL_CHARS) or len(line) < GUTENBERG_WRAP_WIDTH // 2)


def _unwrap_gutenberg(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines back into one string per paragraph."""
    paragraphs: list[str] = []
    current: list[str] = []
    for index, line in enumerate(lines):
        current.append(line.strip())
        next_line = lines[index + 1] if index + 1 < len(lines) else ""
        if _ends_paragraph(line.rstrip(), next_line, current[0]):
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def parse_gutenberg(text: str, path: Path) -> list[Chapter]:
    """Split a Project Gutenberg plain-text book into chapters, dropping all Gutenberg text."""
    lines = text.split("\n")
    start = next((index for index, line in enumerate(lines) if GUTENBERG_START.match(line)), None)
    end = next((index for index, line in enumerate(lines) if GUTENBERG_END.match(line)), None)
    if start is None or end is None or end <= start:
        raise CorpusBuildError(f"--botchan {path}: no '*** START OF ... PROJECT GUTENBERG' / 'End of' markers")
    body = [line for line in lines[start + 1 : end] if not line.startswith("Produced by ")]
    if BOOK_END in body:
        # After the end mark come only the transcriber's errata entries.
        body = body[: body.index(BOOK_END)]
    if any("gutenberg" in line.lower() for line in body):
        raise CorpusBuildError(f"--botchan {path}: 'Gutenberg' still appears inside the book text")

    chapters = [Chapter(heading="front matter", paragraphs=[])]
    section: list[str] = []

    def close_section() -> None:
        # Errata markers go only after unwrapping: they were added after the
        # text was wrapped, so they distort the line widths it relies on.
        for paragraph in _unwrap_gutenberg(section):
            chapters[-1].paragraphs.append(ERRATA_MARKER.sub("", ERRATA_MARKER_IN_PARENS.sub("", paragraph)))
        section.clear()

    for line in body:
        if not line.strip():
            continue
        if GUTENBERG_CHAPTER.match(line.rstrip()):
            close_section()
            chapters.append(Chapter(heading=line.rstrip().rstrip("."), paragraphs=[]))
            continue
        section.append(line.rstrip())
    close_section()
    return [chapter for chapter in chapters if chapter.paragraphs]


def chunk_paragraphs(paragraphs: list[str], target_bytes: int) -> list[str]:
    """Group consecutive paragraphs into documents of about target_bytes UTF-8 bytes."""
    documents: list[str] = []
    current: list[str] = []
    current_bytes = 0
    for paragraph in paragraphs:
        size = len(paragraph.encode("utf-8")) + 1
        if current and current_bytes + size > target_bytes:
            documents.append("\n".join(current))
            current, current_bytes = [], 0
        current.append(paragraph)
        current_bytes += size
    if current:
        documents.append("\n".join(current))
    return documents


def build_documents(works: list[Work], target_bytes: int) -> list[dict[str, str]]:
    documents = []
    for work in works:
        for chapter in work.chapters:
            for text in chunk_paragraphs(chapter.paragraphs, target_bytes):
                documents.append({"text": text, "source": f"{work.source}, {chapter.heading}", "lang": work.lang})
    return documents


def write_jsonl_atomically(documents: list[dict[str, str]], output: Path) -> None:
    """Write one JSON object per line under a temporary name, then rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temp_path = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    try:
        with temp_path.open("x", encoding="utf-8", newline="\n") as stream:
            for document in documents:
                stream.write(json.dumps(document, ensure_ascii=False) + "\n")
        os.replace(temp_path, output)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def build_corpus(wagahai: Path, botchan: Path, output: Path, ja_chapters: int, doc_bytes: int) -> list[dict[str, str]]:
    """Read both sources, clean them, and write the JSONL corpus; returns the documents."""
    if doc_bytes < 200:
        raise CorpusBuildError(f"--doc-bytes {doc_bytes}: must be at least 200")
    japanese = parse_aozora(read_source(wagahai, WAGAHAI_SHA256, "--wagahai"), wagahai)
    if not 1 <= ja_chapters <= len(japanese):
        raise CorpusBuildError(f"--ja-chapters {ja_chapters}: the Japanese text has chapters 1..{len(japanese)}")
    english = parse_gutenberg(read_source(botchan, BOTCHAN_SHA256, "--botchan"), botchan)
    works = [
        Work(source="夏目漱石『吾輩は猫である』", lang="ja", chapters=japanese[:ja_chapters]),
        Work(source="Natsume Soseki, Botchan (Master Darling), tr. Yasotaro Morri", lang="en", chapters=english),
    ]
    documents = build_documents(works, doc_bytes)
    write_jsonl_atomically(documents, output)
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wagahai", type=Path, required=True, help="data/wagahaiwa_nekodearu.txt from sentencepiece 0.1.97")
    parser.add_argument("--botchan", type=Path, required=True, help="data/botchan.txt from sentencepiece 0.1.97")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--ja-chapters", type=int, default=DEFAULT_JA_CHAPTERS, help="leading chapters of the Japanese text to keep")
    parser.add_argument("--doc-bytes", type=int, default=DEFAULT_DOC_BYTES, help="target UTF-8 size of one document")
    args = parser.parse_args(argv)
    try:
        documents = build_corpus(args.wagahai, args.botchan, args.output, args.ja_chapters, args.doc_bytes)
    except CorpusBuildError as error:
        print(f"build_corpus: {error}", file=sys.stderr)
        return 2
    for lang in ("ja", "en"):
        chosen = [document for document in documents if document["lang"] == lang]
        size = sum(len(document["text"].encode("utf-8")) for document in chosen)
        print(f"{lang}: {len(chosen)} documents, {size} bytes of text")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
