#!/usr/bin/env python3
"""Builds the second English evaluation text (issue 3) from a Debian package.

Text: "The Debian Administrator's Handbook" (Debian package `debian-handbook`,
version as `apt-get download` finds it; bookworm: 11.20220922), the en-US HTML
chapters in reading order (the order of index.html's table of contents),
paragraph text only (<p>, <div class="para">, <li> and headings; code listings, tables, navigation
and footers dropped), one paragraph per line. Modern English technical prose,
unlike WikiText-2's encyclopedic style, and not used for any tuning.

Usage: second_text.py [OUT]   (default ~/.cache/spear/texts/debian-handbook.txt)
Prints the output path and its size. Needs apt-get and dpkg-deb (no root:
`apt-get download` writes into a temporary folder).
"""
import html.parser
import os
import re
import subprocess
import sys
import tempfile


class ParagraphText(html.parser.HTMLParser):
    """Collects the text of paragraph-like elements outside skipped subtrees."""
    KEEP = {"p", "li", "h1", "h2", "h3", "h4", "dd", "dt"}
    SKIP = {"pre", "table", "script", "style", "head"}
    SKIP_CLASSES = ("navheader", "navfooter", "toc", "footnotes", "screen", "programlisting")
    VOID = {"br", "img", "meta", "link", "hr", "input", "col", "area", "base", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.buf, self.stack = [], [], []  # stack: (tag, skip, keep)

    def skipping(self):
        return any(s for _, s, _ in self.stack)

    def keeping(self):
        return any(k for _, _, k in self.stack)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag == "br":
                self.buf.append(" ")
            return
        cls = dict(attrs).get("class", "") or ""
        skip = tag in self.SKIP or any(c in cls.split() for c in self.SKIP_CLASSES)
        # Publican HTML puts paragraphs in <div class="para">.
        keep = (tag in self.KEEP or (tag == "div" and "para" in cls.split())) and not self.keeping()
        self.stack.append((tag, skip, keep))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self.stack:  # tolerate unclosed children
            t, _, keep = self.stack.pop()
            if keep:
                text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
                if len(text) > 1:
                    self.out.append(text)
                self.buf = []
            if t == tag:
                break

    def handle_data(self, data):
        if self.keeping() and not self.skipping():
            self.buf.append(data)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
        "~/.cache/spear/texts/debian-handbook.txt")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "debian-handbook"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        deb = next(f for f in os.listdir(tmp) if f.endswith(".deb"))
        root = os.path.join(tmp, "x")
        subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, deb), root], check=True)
        html_dir = os.path.join(root, "usr/share/doc/debian-handbook/html/en-US")
        index = open(os.path.join(html_dir, "index.html"), encoding="utf-8").read()
        order = []
        for href in re.findall(r'href="([^"#]+\.html)', index):
            if href not in order and os.path.exists(os.path.join(html_dir, href)):
                order.append(href)
        paras = []
        for name in order:
            p = ParagraphText()
            p.feed(open(os.path.join(html_dir, name), encoding="utf-8").read())
            paras.extend(p.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(f"The Debian Administrator's Handbook ({deb})\n")
        f.write("\n".join(paras) + "\n")
    print(out, os.path.getsize(out), "bytes,", len(paras), "paragraphs,", len(order), "pages")


if __name__ == "__main__":
    main()
