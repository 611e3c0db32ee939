"""The documentation in the repository: every relative link resolves, and nothing points outside the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '#' lines in code blocks are not headings
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"design.md", "job-file.md", "models.md", "tokenization.md", "contributing.md",
            "troubleshooting.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_readme_links_every_docs_page():
    links = {t.partition("#")[0] for t in relative_links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in links]
    assert not missing, f"README.md does not link {missing}"


def test_no_file_points_outside_the_repository():
    """No file of the repository points at the notes folder beside the checkout (a clone lacks it)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    needle = "../" + "shared"
    hits = []
    for name in files:
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        if needle in text:
            hits.append(name)
    assert not hits, f"files mentioning {needle}: {hits}"


def _byte_level_bpe():
    """A small byte-level BPE (the kind GPT-2 uses) trained here, as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["The library that detects encodings is Chardet. Chardet is old."] * 50 + ["the cat sat on the mat"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokenization_doc_leading_space(tmp_path):
    """docs/tokenization.md: queries tokenize prompt and completion apart, so the space must lead the completion;
    the page's check catches both wrong forms."""
    import json

    from pipelines.stages.build_queries import tokenize_queries

    tok = _byte_level_bpe()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sentence = "The library that detects encodings is Chardet."
    prompt = "The library that detects encodings is"
    rows = [{"query_id": "space", "prompt": prompt, "completion": " Chardet."},
            {"query_id": "nospace", "prompt": prompt, "completion": "Chardet."},
            {"query_id": "trailing", "prompt": prompt + " ", "completion": "Chardet."}]
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = tokenize_queries(str(queries), tok, vocab_size=len(tok), context=None)
    sequences = [p + c for p, c in zip(got.prompt_ids, got.completion_ids)]
    assert sequences[0] == ids(sentence)  # the right form: exactly the sentence's tokens
    assert sequences[1] != ids(sentence) and sequences[2] != ids(sentence)  # the wrong forms: silently different
    assert tok.convert_ids_to_tokens(got.completion_ids[0]) == ["ĠChardet", "."]
    assert tok.convert_ids_to_tokens(got.completion_ids[1]) == ["Ch", "ardet", "."]
    assert tok.convert_ids_to_tokens(got.prompt_ids[2])[-1] == "Ġ"

    def passes(p: str, c: str) -> bool:  # the check of docs/tokenization.md
        return p + c == sentence and ids(p) + ids(c) == ids(sentence)

    assert [passes(r["prompt"], r["completion"]) for r in rows] == [True, False, False]
