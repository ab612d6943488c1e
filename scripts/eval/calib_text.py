#!/usr/bin/env python3
"""Builds a real-text calibration file (issue 3, `spear quantize --calib text:FILE`)
from Debian packages, away from both scored texts' domains (WikiText-2's
encyclopedic articles, the Debian Administrator's Handbook's system
administration): the English fortune cookies of `fortunes-min` and `fortunes`
(quotes, jokes, verse, aphorisms from many sources), every cookie of
/usr/share/games/fortunes/ (the %-separated files, not the .dat indexes),
deduplicated, shuffled with a fixed seed (1) so that any prefix of the file
samples every category, separated by blank lines.

Usage: calib_text.py [OUT]   (default ~/.cache/spear/texts/fortunes.txt)
Prints the output path and its size. Needs apt-get and dpkg-deb (no root:
`apt-get download` writes into a temporary folder).
"""
import os
import random
import subprocess
import sys
import tempfile

PACKAGES = ["fortunes-min", "fortunes"]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
        "~/.cache/spear/texts/fortunes.txt")
    cookies, debs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download"] + PACKAGES, cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        root = os.path.join(tmp, "x")
        for deb in sorted(f for f in os.listdir(tmp) if f.endswith(".deb")):
            debs.append(deb)
            subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, deb), root], check=True)
        d = os.path.join(root, "usr/share/games/fortunes")
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
                continue
            text = open(path, encoding="utf-8", errors="replace").read()
            for c in text.split("\n%\n"):
                c = c.strip("%\n ").rstrip()
                if len(c) > 1:
                    cookies.append(c)
    cookies = sorted(set(cookies))
    random.Random(1).shuffle(cookies)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n\n".join(cookies) + "\n")
    print(out, os.path.getsize(out), "bytes,", len(cookies), "cookies from", ", ".join(debs))


if __name__ == "__main__":
    main()
