"""A small real cross-lingual classification task from text that ships inside a PyPI package: Django's interface
messages and their human translations, labelled by the component each belongs to.

    pip download --no-deps -d wheels django==5.2.19
    python tools/build_django_messages.py wheels/django-5.2.19-py3-none-any.whl data/django-messages

Each message of four Django catalogs is one example, its label the catalog: ``admin`` (the admin site),
``auth`` (users, groups, passwords), ``admindocs`` (the admin's documentation pages) and ``core`` (forms,
validators, dates and the rest of ``django/conf/locale``). English (the msgids) is split 60/20/20 into train,
validation and test by a hash of the message, so a message and its translations always fall in the same split;
every other language gets the translations of the validation and test messages that its catalog translates: the
test sets are parallel across languages, as XNLI's are. Languages: XNLI's 14 besides English, where Django has
them (``zh`` is Django's ``zh_Hans``). Plural forms and empty translations are left out; text is kept as
written (placeholders such as ``%(name)s`` included).

Output: ``OUT/<language>/{train,validation,test}.jsonl``, one ``{"text", "label"}`` a line, for
``task.name=nli task.text_keys=[text] task.labels=[admin,auth,admindocs,core] task.data_dir=OUT``. Django and
its translations are BSD-3-Clause licensed (the licence travels in the wheel).
"""

from __future__ import annotations

import argparse
import gettext
import hashlib
import io
import json
import zipfile
from pathlib import Path

CATALOGS = {"admin": "contrib/admin", "auth": "contrib/auth", "admindocs": "contrib/admindocs", "core": "conf"}
LANGUAGES = {"ar": "ar", "bg": "bg", "de": "de", "el": "el", "es": "es", "fr": "fr", "hi": "hi", "ru": "ru",
             "sw": "sw", "th": "th", "tr": "tr", "ur": "ur", "vi": "vi", "zh": "zh_Hans"}  # fmt: skip


def split_of(message: str) -> str:
    bucket = int(hashlib.sha256(message.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 6 else "validation" if bucket < 8 else "test"


def catalog(archive: zipfile.ZipFile, path: str, language: str) -> dict[str, str]:
    """msgid → msgstr of one compiled catalog (singular messages with a translation only)."""
    name = f"django/{path}/locale/{language}/LC_MESSAGES/django.mo"
    if name not in archive.namelist():
        return {}
    translations = gettext.GNUTranslations(io.BytesIO(archive.read(name)))
    return {k: v for k, v in translations._catalog.items() if isinstance(k, str) and k and v}


def build(wheel: Path, out: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    with zipfile.ZipFile(wheel) as archive:
        english: dict[str, str] = {}  # message → label (a message in two catalogs keeps the first)
        for label, path in CATALOGS.items():
            for message in catalog(archive, path, "fr"):  # the msgids; French translates every catalog fully
                english.setdefault(message, label)
        rows = {"en": {s: [] for s in ("train", "validation", "test")}}
        for message, label in sorted(english.items()):
            rows["en"][split_of(message)].append({"text": message, "label": label})
        for code, django_code in LANGUAGES.items():
            rows[code] = {"validation": [], "test": []}
            for label, path in CATALOGS.items():
                for message, translated in sorted(catalog(archive, path, django_code).items()):
                    split = split_of(message)
                    if english.get(message) == label and split != "train":
                        rows[code][split].append({"text": translated, "label": label})
    for language, splits in rows.items():
        if not any(splits.values()):  # no catalog of this language in the wheel
            continue
        (out / language).mkdir(parents=True, exist_ok=True)
        counts[language] = {}
        for split, examples in splits.items():
            text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
            (out / language / f"{split}.jsonl").write_text(text, encoding="utf-8")
            counts[language][split] = len(examples)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="a Django wheel (pip download --no-deps django)")
    parser.add_argument("out", type=Path, help="output folder: OUT/<language>/{train,validation,test}.jsonl")
    args = parser.parse_args()
    for language, splits in build(args.wheel, args.out).items():
        print(language, " ".join(f"{split}={n}" for split, n in splits.items()))


if __name__ == "__main__":
    main()
