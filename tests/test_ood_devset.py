"""The OOD dev-set builder's pure parts on small made-up inputs (no game package needed)."""
from __future__ import annotations

import json
from collections import Counter

from PIL import Image

from bench import ood_devset as od
from encoder.data import pair_records


def test_split_is_deterministic_and_near_50_20_30():
    names = [f"img_{i}.jpg" for i in range(4000)]
    first = [od.split_for(n) for n in names]
    assert first == [od.split_for(n) for n in names]
    counts = Counter(first)
    assert set(counts) == {"train", "val", "test"}
    assert abs(counts["train"] / 4000 - 0.5) < 0.03
    assert abs(counts["val"] / 4000 - 0.2) < 0.03
    assert abs(counts["test"] / 4000 - 0.3) < 0.03


def test_name_phrase_articles():
    assert od.name_phrase("Battleship") == "a picture of a Battleship"
    assert od.name_phrase("Elvish Archer") == "a picture of an Elvish Archer"
    assert od.name_phrase("Musketeers") == "a picture of Musketeers"
    assert od.name_phrase("Riflemen") == "a picture of Riflemen"
    assert od.name_phrase("Cavalry") == "a picture of Cavalry"
    assert od.name_phrase("University") == "a picture of a University"
    assert od.name_phrase("Great Wall", "wonder") == "a picture of the Great Wall"
    assert od.name_phrase("Magellan's Expedition", "wonder") == "a picture of Magellan's Expedition"


def test_first_sentence_keeps_short_prose_only():
    assert od.first_sentence("Galleons are blue-water ships built for trade. More text.") == \
        "Galleons are blue-water ships built for trade."
    assert od.first_sentence("word " * 40 + ".") is None
    assert od.first_sentence("Costs %d gold per turn in this city.") is None
    assert od.first_sentence("") is None


def test_parse_wesnoth_unit_reads_top_level_keys_only():
    cfg = '''#textdomain wesnoth-units
[unit_type]
    id=Mermaid Seer
    name= _ "female^Mermaid Seer"
    image="units/merfolk/seer.png~TC(1,magenta)"
    profile="portraits/merfolk/seer.png~CROP(0,0,10,10)"
    description= _ "Seers read the tides. They say ""hello"" a lot."
    [attack]
        name=staff
        description=_"staff"
    [/attack]
[/unit_type]
'''
    unit = od.parse_wesnoth_unit(cfg)
    assert unit["name"] == "Mermaid Seer"
    assert unit["image"] == "units/merfolk/seer.png"
    assert unit["profile"] == "portraits/merfolk/seer.png"
    assert unit["description"] == 'Seers read the tides. They say "hello" a lot.'
    assert od.parse_wesnoth_unit("[terrain_type]\nid=x\n") is None


def test_parse_freeciv_ruleset_and_spec():
    ruleset = '''[unit_settlers]
name          = _("Settlers")
graphic       = "u.settlers"
helptext      = _("\\
Settlers found cities.\\
")

[building_airport]
name = _("?building:Airport")
genus = "Improvement"
graphic = "b.airport"
'''
    sections = od.parse_ruleset_sections(ruleset)
    assert sections["unit_settlers"]["name"] == "Settlers"
    assert sections["unit_settlers"]["graphic"] == "u.settlers"
    assert sections["unit_settlers"]["helptext"] == "Settlers found cities."
    assert sections["building_airport"]["name"] == "Airport"
    spec = '''[grid_main]
x_top_left = 1
y_top_left = 1
dx = 64
dy = 48
pixel_border = 1
tiles = { "row", "column", "tag"
  0,  0, "u.armor"
  1,  2, "u.caravel" ; comment
}
[extra]
sprites = { "tag", "file"
  "b.airport", "buildings/airport"
}
'''
    assert od.parse_spec_grid(spec) == {"u.armor": (1, 1, 64, 48), "u.caravel": (131, 50, 64, 48)}
    assert od.parse_spec_files(spec) == {"b.airport": "buildings/airport"}


def test_item_names_and_variants():
    stems = ["book1", "book2", "sword-2", "sword", "potion-blue", "gohere", "chest-plain-open", "archery-target-right"]
    chosen = od.item_stems(stems)
    assert chosen == ["archery-target-right", "book1", "chest-plain-open", "potion-blue", "sword"]
    assert [od.item_name(s) for s in chosen] == ["archery target", "book", "open plain chest", "blue potion", "sword"]


def test_picture_conversion_crops_composites_and_upscales():
    sprite = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    sprite.paste((200, 10, 10, 255), (20, 10, 40, 30))
    out = od.to_rgb_picture(sprite)
    assert out.mode == "RGB" and min(out.size) >= 128 and max(out.size) >= od.MIN_SIDE
    assert min(out.getpixel((0, 0))) >= 250  # the margin is white, not black
    big = od.to_rgb_picture(Image.new("RGB", (1000, 800), (0, 128, 0)))
    assert max(big.size) == od.MAX_SIDE


def test_records_written_in_the_collection_format(tmp_path):
    pics = {"a.jpg": Image.new("RGBA", (30, 20), (0, 0, 255, 255)), "b.jpg": Image.new("RGB", (300, 200), "red")}
    (tmp_path / "images").mkdir()
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for name, pic in pics.items():
            od.to_rgb_picture(pic).save(tmp_path / "images" / name, "JPEG")
            f.write(json.dumps(od.make_record(name, [od.name_phrase("Anvil"), " ", "A heavy block."], "test", "item")) + "\n")
    rows = list(pair_records(tmp_path / "pairs.jsonl"))
    assert [r[0] for r in rows] == ["images/a.jpg", "images/b.jpg"]
    assert rows[0][1] == ["a picture of an Anvil", "A heavy block."]
    assert rows[0][2]["split"] == od.split_for("a.jpg") and rows[0][2]["source"] == "test"
    for image, _, _ in rows:
        assert Image.open(tmp_path / image).mode == "RGB"


def test_missing_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(od, "SOURCES", {"wesnoth": lambda: od.wesnoth_all(tmp_path / "nowhere")})
    assert od.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wesnoth-1.16-data" in err
    assert not (tmp_path / "out" / "pairs.jsonl").exists()
