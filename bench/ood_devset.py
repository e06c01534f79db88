"""Build an out-of-domain (OOD) dev set: game artwork with human-written names and descriptions.

Flickr8k is photos of people, dogs and streets; this collection is painted and pixel-art pictures
of fantasy creatures, soldiers, ships, vehicles, buildings and monuments, each with its name made
into a phrase ("a picture of a battleship") and, where the game has one, the first sentence of
its human-written description as a second caption. Sources (Debian packages, read where they
install their files; this script installs nothing):

- ``wesnoth``: Battle for Wesnoth 1.16 unit types (``apt-get install -y wesnoth-1.16-data``):
  /usr/share/games/wesnoth/1.16/data/core/units/**/*.cfg give each unit's name, picture (its
  painted portrait when it has one, else its sprite) and description; images/items/*.png give
  object pictures (potions, weapons, chests...) named by their file names ("potion-blue" ->
  "a picture of a blue potion"), one per item (numbered variants dropped).
- ``freeciv``: Freeciv 3.0 (``apt-get install -y freeciv-data``): unit sprites of the amplio2
  tileset, building and wonder pictures (misc/buildings-large.spec, misc/wonders-large.spec),
  named by the rulesets (civ2civ3 first, then the others for units it lacks).

Run (about a minute):

    PYTHONPATH=$PWD .venv/bin/python bench/ood_devset.py --out /work/ood-data [--benchmarks]

It writes OUT/images/*.jpg (RGB, transparency on white, small sprites cropped to their content
and upscaled smoothly to >= 224 px, large ones capped at 512 px) and OUT/pairs.jsonl in the
format that encoder.data.pair_records reads:
``{"image": "images/<file>", "captions": [...], "split": ..., "source": ..., "kind": ...}``.
The split is a hash of the image's file name: about 50% train, 20% val, 30% test.
``--benchmarks`` also writes the "Out-of-domain dev set" section of BENCHMARKS.md.
Missing package: exit 2 with a one-line reason.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

WESNOTH = Path("/usr/share/games/wesnoth/1.16/data/core")
FREECIV = Path("/usr/share/games/freeciv")
# civ2civ3 names first; the others only add units/buildings it lacks.
FREECIV_RULESETS = ("civ2civ3", "civ2", "sandbox", "multiplayer", "classic", "experimental", "civ1")

MIN_SIDE = 224
MAX_SIDE = 512
MAX_DESCRIPTION_WORDS = 30


class SourceMissing(Exception):
    pass


# ---------------------------------------------------------------- pure helpers (tested)

def split_for(name: str) -> str:
    """Deterministic split of an image by its file name: ~50% train, ~20% val, ~30% test."""
    bucket = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 50 else "val" if bucket < 70 else "test"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# Names that take no article: mass nouns (and the plurals caught by the ending rules below).
MASS_NOUNS = {"armor", "artillery", "cavalry", "coinage", "freight", "water", "infantry"}


def name_phrase(name: str, kind: str = "thing") -> str:
    """"a picture of ..." with an article that fits the name: none for plurals ("Musketeers",
    "Riflemen"), mass nouns ("Cavalry") and possessive wonders ("Magellan's Expedition"), "the"
    for other wonders, else a/an."""
    name = " ".join(name.split())
    if kind == "wonder":
        possessive = re.search(r"\w's\b|\ws'(\s|$)", name)
        return f"a picture of {name}" if possessive else f"a picture of the {name}"
    last = name.split()[-1].lower()
    if (last.endswith("s") and not last.endswith(("ss", "us", "is"))) or last.endswith("men") or last in MASS_NOUNS:
        return f"a picture of {name}"
    lower = name.lower()
    vowel = lower[:1] in "aeiou" and not lower.startswith(("uni", "use", "eu", "one"))
    return f"a picture of {'an' if vowel else 'a'} {name}"


def first_sentence(text: str, max_words: int = MAX_DESCRIPTION_WORDS) -> str | None:
    """The first sentence of a description when it is short, plain prose; else None."""
    text = " ".join(text.replace("\\n", " ").split())
    if not text:
        return None
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = m.group(1) if m else text
    if any(c in sentence for c in "%[]{}<>@") or len(sentence.split()) > max_words or len(sentence.split()) < 4:
        return None
    return sentence


def _wml_unquote(s: str) -> str:
    return s.replace('""', '"')


def parse_wesnoth_unit(text: str) -> dict | None:
    """id, name, image, profile, description of the unit type in a Wesnoth .cfg, read from the
    keys before its first child tag ([attack], [female], [variation], ...)."""
    start = text.find("[unit_type]")
    if start < 0:
        return None
    body = text[start + len("[unit_type]"):]
    child = re.search(r"^\s*\[(?!/)", body, re.M)
    head = body[: child.start()] if child else body
    out: dict = {}
    for key in ("id", "name", "image", "profile", "description"):
        m = re.search(rf'^\s*{key}\s*=\s*_?\s*"((?:[^"]|"")*)"', head, re.M)
        if m is None:
            m = re.search(rf"^\s*{key}\s*=\s*([^\s\"{{][^\n]*)$", head, re.M)
        if m is not None:
            out[key] = _wml_unquote(m.group(1)).split("^", 1)[-1].strip()  # drop "female^" contexts
    if "name" not in out or "image" not in out:
        return None
    for key in ("image", "profile"):
        if key in out:
            out[key] = out[key].split("~", 1)[0]  # drop image-path functions like ~CROP(...)
    return out


def parse_ruleset_sections(text: str) -> dict[str, dict[str, str]]:
    """Sections of a Freeciv .ruleset/.spec file with their single-string keys (first string of
    a key; translation markers _("...") and "?qualifier:" prefixes removed)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    pattern = re.compile(r'^\[(\w+)\]\s*$|^(\w+)\s*=\s*_?\(?\s*"((?:[^"\\]|\\[\s\S])*)"', re.M)
    for m in pattern.finditer(text):
        if m.group(1):
            current = sections.setdefault(m.group(1), {})
        elif current is not None and m.group(2) not in current:
            value = m.group(3).replace("\\\n", "").replace('\\"', '"')
            current[m.group(2)] = re.sub(r"^\?[\w ]+:", "", value)
    return sections


def parse_spec_grid(text: str) -> dict[str, tuple[int, int, int, int]]:
    """tag -> (x, y, w, h) crop boxes from a Freeciv tileset .spec file's [grid_*] sections."""
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for grid in re.finditer(r"^\[grid_\w+\](.*?)(?=^\[|\Z)", text, re.M | re.S):
        g = grid.group(1)

        def num(key: str, default: int = 0) -> int:
            m = re.search(rf"^{key}\s*=\s*(\d+)", g, re.M)
            return int(m.group(1)) if m else default

        x0, y0, dx, dy, border = num("x_top_left"), num("y_top_left"), num("dx"), num("dy"), num("pixel_border")
        for row, col, tag in re.findall(r'^\s*(\d+)\s*,\s*(\d+)\s*,\s*"([^"]+)"', g, re.M):
            boxes.setdefault(tag, (x0 + int(col) * (dx + border), y0 + int(row) * (dy + border), dx, dy))
    return boxes


def parse_spec_files(text: str) -> dict[str, str]:
    """tag -> file (without extension) from a Freeciv .spec file's [extra] sprites table."""
    return {tag: f for tag, f in re.findall(r'^\s*"([^"]+)"\s*,\s*"([^"]+)"', text, re.M)}


def to_rgb_picture(img: Image.Image, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> Image.Image:
    """RGB picture: transparent images cropped to their visible content (plus a margin) and
    composited on white; small ones upscaled (Lanczos) so the longer side is >= min_side (and
    the shorter >= 128 where that keeps the aspect), large ones shrunk to <= max_side."""
    img = img.convert("RGBA")
    bbox = img.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    if bbox is None:
        raise ValueError("empty picture")
    if bbox != (0, 0, *img.size):
        margin = max(2, (bbox[2] - bbox[0] + bbox[3] - bbox[1]) // 20)
        img = img.crop((max(0, bbox[0] - margin), max(0, bbox[1] - margin),
                        min(img.width, bbox[2] + margin), min(img.height, bbox[3] + margin)))
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, img).convert("RGB")
    w, h = rgb.size
    scale = 1.0
    if max(w, h) < min_side:
        scale = min_side / max(w, h)
        if min(w, h) * scale < 128:
            scale = min(128 / min(w, h), max_side / max(w, h))
    elif max(w, h) > max_side:
        scale = max_side / max(w, h)
    if scale != 1.0:
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return rgb


def make_record(file: str, captions: list[str], source: str, kind: str) -> dict:
    caps = [c for c in dict.fromkeys(c.strip() for c in captions) if c]
    if not caps:
        raise ValueError(f"{file}: no caption")
    return {"image": f"images/{file}", "captions": caps, "split": split_for(file), "source": source, "kind": kind}


# ---------------------------------------------------------------- sources

def wesnoth_items(root: Path = WESNOTH):
    """(file, picture, captions, kind) for every Wesnoth unit type with a picture."""
    if not (root / "units").is_dir():
        raise SourceMissing(f"Wesnoth data not found at {root} (apt-get install -y wesnoth-1.16-data)")
    images = root / "images"
    seen: set[str] = set()
    for cfg in sorted((root / "units").rglob("*.cfg")):
        unit = parse_wesnoth_unit(cfg.read_text(encoding="utf-8", errors="replace"))
        if unit is None or "fake" in cfg.relative_to(root).parts:
            continue
        name = unit["name"]
        if name.lower() in seen:
            continue
        candidates = [images / unit[k] for k in ("profile", "image") if k in unit]
        pic_path = next((p for p in candidates if p.is_file()), None)
        if pic_path is None:
            continue
        seen.add(name.lower())
        captions = [name_phrase(name)]
        desc = first_sentence(unit.get("description", ""))
        if desc:
            captions.append(desc)
        kind = "portrait" if pic_path == candidates[0] and "profile" in unit else "sprite"
        yield f"wesnoth_{slug(name)}.jpg", Image.open(pic_path), captions, kind


def freeciv_items(root: Path = FREECIV):
    """(file, picture, captions, kind) for Freeciv units (amplio2), buildings and wonders."""
    if not (root / "amplio2" / "units.spec").is_file():
        raise SourceMissing(f"Freeciv data not found at {root} (apt-get install -y freeciv-data)")
    unit_sheet = Image.open(root / "amplio2" / "units.png")
    unit_boxes = parse_spec_grid((root / "amplio2" / "units.spec").read_text(encoding="utf-8"))
    picture_files = {}
    for spec in ("buildings-large.spec", "wonders-large.spec"):
        picture_files.update(parse_spec_files((root / "misc" / spec).read_text(encoding="utf-8")))

    seen_tags: set[str] = set()
    seen_names: set[str] = set()
    for ruleset in FREECIV_RULESETS:
        for fname, prefix in (("units.ruleset", "unit_"), ("buildings.ruleset", "building_")):
            path = root / ruleset / fname
            if not path.is_file():
                continue
            for section, keys in parse_ruleset_sections(path.read_text(encoding="utf-8")).items():
                if not section.startswith(prefix) or "name" not in keys:
                    continue
                name = keys["name"]
                tag = next((keys[k] for k in ("graphic", "graphic_alt")
                            if keys.get(k) in unit_boxes or keys.get(k) in picture_files), None)
                if tag is None or tag in seen_tags or name.lower() in seen_names or keys.get("genus") == "Convert":
                    continue
                if prefix == "unit_":
                    x, y, w, h = unit_boxes[tag]
                    picture, kind = unit_sheet.crop((x, y, x + w, y + h)), "unit"
                else:
                    picture = Image.open(root / (picture_files[tag] + ".png"))
                    kind = "wonder" if keys.get("genus", "").endswith("Wonder") else "building"
                seen_tags.add(tag)
                seen_names.add(name.lower())
                yield f"freeciv_{kind}_{slug(name)}.jpg", picture, [name_phrase(name, kind)], kind


# Trailing words of Wesnoth item file names that read as modifiers: "potion-blue" is a blue potion.
ITEM_MODIFIERS = {
    "evil", "golden", "small", "large", "medium", "throwing", "blue", "green", "magenta", "red", "yellow",
    "grey", "brown", "gold", "silver", "white", "dark", "crystal", "elven", "bare", "open", "closed",
    "plain", "poison", "runic", "bone", "stone", "fancy", "holy", "short", "wraith", "druid", "magic",
    "ankh", "javelin", "lit", "right", "left"}
ITEM_SKIP = {"gohere", "ornate"}  # a map marker and an unnamed ornament


def item_name(stem: str) -> str:
    """Human-readable name of a Wesnoth item picture from its file name ("chest-plain-open" ->
    "open plain chest"); direction words are dropped."""
    parts = re.sub(r"-?\d+$", "", stem).split("-")
    mods: list[str] = []
    while len(parts) > 1 and parts[-1] in ITEM_MODIFIERS:
        word = parts.pop()
        if word not in ("right", "left"):
            mods.append(word)
    return " ".join(mods + parts)


def item_stems(stems: list[str]) -> list[str]:
    """One file per item: numbered variants ("book1".."book5", "sword-2") collapse to the plain
    name when there is one, else to the first variant."""
    chosen: dict[str, str] = {}
    for stem in sorted(stems):
        base = re.sub(r"-?\d+$", "", stem)
        if base in ITEM_SKIP:
            continue
        if base not in chosen or stem == base:
            chosen[base] = stem
    return [chosen[b] for b in sorted(chosen)]


def wesnoth_item_pictures(root: Path = WESNOTH):
    """(file, picture, captions, kind) for the Wesnoth item pictures (potions, weapons, chests...)."""
    folder = root / "images" / "items"
    if not folder.is_dir():
        raise SourceMissing(f"Wesnoth data not found at {root} (apt-get install -y wesnoth-1.16-data)")
    for stem in item_stems([p.stem for p in folder.glob("*.png")]):
        name = item_name(stem)
        yield f"wesnoth_item_{slug(name)}.jpg", Image.open(folder / f"{stem}.png"), [name_phrase(name)], "item"


def wesnoth_all(root: Path = WESNOTH):
    yield from wesnoth_items(root)
    yield from wesnoth_item_pictures(root)


SOURCES = {"wesnoth": wesnoth_all, "freeciv": freeciv_items}


def build(out: Path) -> list[dict]:
    generators = {name: fn() for name, fn in SOURCES.items()}
    items = {}
    for name, gen in generators.items():  # check every package before writing anything
        try:
            items[name] = [next(gen)]
        except StopIteration:
            raise SourceMissing(f"{name}: the package is installed but gave no pictures") from None
    (out / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for name, gen in generators.items():
        for file, picture, captions, kind in [*items[name], *gen]:
            to_rgb_picture(picture).save(out / "images" / file, "JPEG", quality=92)
            records.append(make_record(file, captions, name, kind))
    tmp = out / "pairs.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(out / "pairs.jsonl")
    return records


def summary(records: list[dict]) -> str:
    rows = ["| source | kind | images | captions | train | val | test |", "| --- | --- | --- | --- | --- | --- | --- |"]
    groups = Counter((r["source"], r["kind"]) for r in records)
    for source, kind in sorted(groups):
        sel = [r for r in records if (r["source"], r["kind"]) == (source, kind)]
        splits = Counter(r["split"] for r in sel)
        rows.append(f"| {source} | {kind} | {len(sel)} | {sum(len(r['captions']) for r in sel)} | "
                    f"{splits['train']} | {splits['val']} | {splits['test']} |")
    splits = Counter(r["split"] for r in records)
    caps = Counter()
    for r in records:
        caps[r["split"]] += len(r["captions"])
    rows.append(f"| **all** | | {len(records)} | {sum(caps.values())} | {splits['train']} ({caps['train']} captions) | "
                f"{splits['val']} ({caps['val']}) | {splits['test']} ({caps['test']}) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder to write images/ and pairs.jsonl into")
    ap.add_argument("--benchmarks", action="store_true", help="write the BENCHMARKS.md section too")
    args = ap.parse_args(argv)
    try:
        records = build(args.out)
    except SourceMissing as e:
        print(f"ood_devset: {e}", file=sys.stderr)
        return 2
    table = summary(records)
    print(table)
    (args.out / "READY").touch()
    if args.benchmarks:
        from bench.common import machine, write_section

        write_section("Out-of-domain dev set", (
            "Game artwork with human-written names and descriptions, nothing like Flickr8k's photos: "
            "Battle for Wesnoth 1.16 unit portraits/sprites with the unit's name as a phrase and, when short, "
            "the first sentence of its description, and its item pictures (potions, weapons, chests...) named by "
            "their file names (Debian `wesnoth-1.16-data`); Freeciv 3.0 amplio2 unit "
            "sprites, building and wonder pictures named by the rulesets (Debian `freeciv-data`). "
            "Split by a hash of the image file name (~50/20/30).\n\n"
            f"Machine: {machine()}.\n\n{table}\n\n"
            "Command (needs `apt-get install -y wesnoth-1.16-data freeciv-data`):\n\n"
            "```bash\nPYTHONPATH=$PWD .venv/bin/python bench/ood_devset.py --out /work/ood-data --benchmarks\n```"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
