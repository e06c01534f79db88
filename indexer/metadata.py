"""SQLite metadata: ids, kinds, paths, captions, user fields, tombstones, build progress.

An image's `path` is relative to the index's images folder (the manifest's `images_root`);
`user_id` is the captions file's own id of the image (no SQLite type: an int stays an int, a
string a string). Indexes written before `user_id` existed gain the column when opened for
writing (`indexer add/remove/compact`); read-only they answer without it.

SQLite because it is transactional: a build commits each batch's item rows together with its
progress record, so a killed build resumes exactly after the last committed batch.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
  id INTEGER PRIMARY KEY, kind TEXT NOT NULL, path TEXT, caption TEXT, image_id INTEGER,
  meta TEXT NOT NULL DEFAULT '{}', sha256 TEXT, segment INTEGER NOT NULL, pos INTEGER NOT NULL,
  deleted INTEGER NOT NULL DEFAULT 0, user_id);
CREATE INDEX IF NOT EXISTS items_kind ON items(kind, deleted);
CREATE INDEX IF NOT EXISTS items_image ON items(image_id);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE INDEX IF NOT EXISTS items_sha ON items(sha256);
CREATE TABLE IF NOT EXISTS report(seq INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT, problem TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS fields(name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS progress(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
USER_ID_INDEX = "CREATE INDEX IF NOT EXISTS items_user ON items(user_id)"

FILTER_SCALARS = (str, int, float, bool)


class FilterError(ValueError):
    """A filter naming an unknown field or holding a value that cannot be compared."""


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        con = sqlite3.connect(str(path), check_same_thread=False)
        con.executescript(SCHEMA)
        if not has_user_id(con):  # an index from before user ids: add the (empty) column
            con.execute("ALTER TABLE items ADD COLUMN user_id")
        con.execute(USER_ID_INDEX)
        con.commit()
    con.row_factory = sqlite3.Row
    return con


def has_user_id(con: sqlite3.Connection) -> bool:
    return any(r[1] == "user_id" for r in con.execute("PRAGMA table_info(items)"))


def get_progress(con: sqlite3.Connection) -> dict[str, Any]:
    return {r["key"]: json.loads(r["value"]) for r in con.execute("SELECT key, value FROM progress")}


def set_progress(con: sqlite3.Connection, values: dict[str, Any]) -> None:
    con.executemany("INSERT OR REPLACE INTO progress(key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in values.items()])


def insert_items(con: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """rows: (id, kind, path, caption, image_id, meta dict, sha256, segment, pos[, user_id])."""
    con.executemany(
        "INSERT INTO items(id, kind, path, caption, image_id, meta, sha256, segment, pos, user_id) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)",
        [(*r[:5], json.dumps(r[5] or {}), *r[6:9], r[9] if len(r) > 9 else None) for r in rows])


def add_fields(con: sqlite3.Connection, meta: dict) -> None:
    con.executemany("INSERT OR IGNORE INTO fields(name) VALUES (?)", [(k,) for k in meta])


def field_names(con: sqlite3.Connection) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM fields")}


def report(con: sqlite3.Connection, path: str, problem: str, reason: str) -> None:
    con.execute("INSERT INTO report(path, problem, reason) VALUES (?,?,?)", (path, problem, reason))


def read_report(con: sqlite3.Connection) -> list[dict]:
    return [dict(r) for r in con.execute("SELECT path, problem, reason FROM report ORDER BY seq")]


def filter_sql(filters: dict | None, fields: set[str], alias: str = "i") -> tuple[str, list]:
    """`AND ...` clauses matching image metadata; a list value means any of its values."""
    if not filters:
        return "", []
    clauses, args = [], []
    for name, value in filters.items():
        if name not in fields:
            raise FilterError(f"unknown filter field {name!r}; known: {sorted(fields)}")
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, FILTER_SCALARS) for v in values):
            raise FilterError(f"filter {name!r} needs a string, number or boolean (or a list of them)")
        key = "$." + json.dumps(name)
        clauses.append(f"json_extract({alias}.meta, ?) IN ({','.join('?' * len(values))})")
        args.extend([key, *[int(v) if isinstance(v, bool) else v for v in values]])
    return " AND " + " AND ".join(clauses), args


def matching_ids(con: sqlite3.Connection, kind: str, filters: dict | None, fields: set[str]) -> list[int]:
    """Live ids of `kind` whose image metadata matches (captions match through their image)."""
    where, args = filter_sql(filters, fields)
    if kind == "image":
        sql = f"SELECT i.id FROM items i WHERE i.kind='image' AND i.deleted=0{where} ORDER BY i.id"
    else:
        sql = (f"SELECT c.id FROM items c JOIN items i ON c.image_id = i.id "
               f"WHERE c.kind='caption' AND c.deleted=0{where} ORDER BY c.id")
    return [r[0] for r in con.execute(sql, args)]


def item_dict(row: sqlite3.Row) -> dict:
    d = {"id": row["id"], "kind": row["kind"], "metadata": json.loads(row["meta"] or "{}")}
    if row["kind"] == "image":
        d["path"] = row["path"]
        d["user_id"] = row["user_id"] if "user_id" in row.keys() else None
    else:
        d["caption"] = row["caption"]
        d["image_id"] = row["image_id"]
    return d
