"""Assemble a ~100 MB mixed English corpus offline from Debian packages, and pre-tokenize it.

    python scripts/build_corpus.py --out data/mixed            # downloads 3 .deb packages with apt-get
    flash-depth train --config configs/small-48-moda-post.yaml data.source=data/mixed/shards

Sources (all redistributable): the GNU Collaborative International Dictionary of English
(dict-gcide, GPL), the Python 3.11 documentation (python3.11-doc, PSF licence), the Linux
kernel documentation (linux-doc-*, GPL), and the Shakespeare plays of the embedded corpus.
Writes OUT/corpus.jsonl (one document per line, {"text", "source"}) and OUT/shards/ (.bin + meta.json
+ tokenizer.json). Packages are fetched with `apt-get download` (no root needed), unpacked with
`dpkg-deb -x` into OUT/packages; `--packages-dir` reuses an unpacked tree.
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

PACKAGES = ["dict-gcide", "python3.11-doc", "linux-doc-6.1"]


_CHROME_CLASSES = {"related", "sphinxsidebar", "footer", "headerlink"}


class _TextExtractor(HTMLParser):
    """Visible text of a Sphinx HTML page, without navigation bars, sidebars and footers."""

    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def _is_chrome(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        return tag in ("script", "style", "nav") or attrs.get("role") == "navigation" or classes & _CHROME_CLASSES

    def handle_starttag(self, tag, attrs):
        if self._skip:
            self._skip += tag in ("div", "script", "style", "nav", "a")
        elif self._is_chrome(tag, attrs):
            self._skip = 1
        elif tag in ("p", "div", "br", "li", "h1", "h2", "h3", "pre", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self._skip and tag in ("div", "script", "style", "nav", "a"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    text = html.unescape("".join(parser.parts))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def _read_maybe_gz(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix in (".gz", ".dz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def gcide_documents(root: Path) -> list[str]:
    """Dictionary entries in chunks of ~200 lines (the .dict.dz is gzip-compatible dictzip)."""
    docs = []
    for f in sorted(root.rglob("gcide.dict*")):
        lines = _read_maybe_gz(f).splitlines()
        docs += ["\n".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]
    return docs


def python_doc_documents(root: Path) -> list[str]:
    pages = [f for f in sorted(root.rglob("*.html")) if "python3" in str(f) and not f.name.startswith("genindex")]
    return [html_to_text(_read_maybe_gz(f)) for f in pages]


def kernel_doc_documents(root: Path) -> list[str]:
    files = [f for f in sorted(root.rglob("*")) if f.is_file() and "Documentation" in str(f)
             and "translations" not in f.parts  # English only
             and (f.suffix in (".rst", ".txt") or f.name.endswith((".rst.gz", ".txt.gz")))]
    return [_read_maybe_gz(f) for f in files]


def fetch_packages(work: Path, names: list[str]) -> Path:
    debs, tree = work / "debs", work / "packages"
    debs.mkdir(parents=True, exist_ok=True)
    tree.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *names], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    return tree


def assemble(tree: Path, max_bytes: int) -> list[dict]:
    from flash_depth.data.sources import shakespeare_plays

    groups = [("gcide", gcide_documents(tree)), ("python-doc", python_doc_documents(tree)),
              ("linux-doc", kernel_doc_documents(tree)), ("shakespeare", [t for _, t in shakespeare_plays()])]
    budget = max_bytes // len(groups)  # an even mix, as far as each source reaches
    records, spare = [], 0
    for name, docs in sorted(groups, key=lambda g: sum(len(d) for d in g[1])):
        take, used = [], 0
        for doc in docs:
            if doc.strip() and used < budget + spare:
                take.append({"text": doc, "source": name})
                used += len(doc.encode("utf-8"))
        spare = max(0, budget + spare - used)
        records += take
        print(f"{name}: {len(take)} documents, {used / 1e6:.1f} MB", file=sys.stderr)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--packages-dir", help="an already unpacked tree (skips apt-get)")
    parser.add_argument("--max-mb", type=float, default=100.0)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--no-tokenize", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tree = Path(args.packages_dir) if args.packages_dir else fetch_packages(out, PACKAGES)
    records = assemble(tree, int(args.max_mb * 1e6))
    import random

    random.Random(0).shuffle(records)  # the validation tail then samples every source
    corpus = out / "corpus.jsonl"
    with corpus.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    print(f"wrote {corpus} ({corpus.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    if not args.no_tokenize:
        from flash_depth.cli import main as cli

        return cli(["tokenize", "--data", str(corpus), "--out", str(out / "shards"),
                    "--vocab-size", str(args.vocab_size)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
