"""Text and question-answer sources behind one interface (docs/protocol.md section 1).

`load_documents(dataset, split)` yields documents (strings) and `load_qa_items(dataset, split)` yields
GSM8K-format items (`{"question", "answer"}`) from:
- a Hugging Face data set name (`wikitext-2-raw-v1`, `wikitext-103-raw-v1`, `pg19`, `gsm8k`), from the
  local cache or the hub; offline and uncached is one readable error naming the offline alternative;
- a directory written by `datasets` `save_to_disk` (a DatasetDict with the splits);
- local files: a directory with `train.*`, `validation.*` (or `valid.*`, `val.*`) and `test.*` files
  (`.txt`, `.jsonl`), or subdirectories `train/`, `validation/`, `test/` of `.txt` files; or one file /
  glob, split deterministically by document index (80% train, 10% validation, 10% test).
`.txt` files hold one document each (`txt_documents="file"`) or one per blank-line block
(`"blank_line"`); `.jsonl` lines are objects with a `text` field (documents) or `question`/`answer`
fields (items).
"""

from __future__ import annotations

import contextlib
import glob
import json
import re
from pathlib import Path

from lmlab.errors import DataError
from lmlab.hub import hub_reachable

SPLITS = ("train", "validation", "test")
_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}

# name -> (hub repository, config, field layout)
HF_DATASETS = {
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1", "wikitext"),
    "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1", "wikitext"),
    "pg19": ("deepmind/pg19", None, "text"),
    "gsm8k": ("openai/gsm8k", "main", "qa"),
}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------------
# Reading local files


def read_text_file(path: Path) -> str:
    """UTF-8 text of a file, or a DataError saying what is wrong with it."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    return text


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSONL file."""
    text = read_text_file(path)
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    if not rows:
        raise DataError(f"data file {path} has no JSON lines")
    return rows


def _documents_from_file(path: Path, txt_documents: str) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, row in read_jsonl(path):
            if "text" in row:
                docs.append(str(row["text"]))
            elif "question" in row and "answer" in row:
                docs.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
            else:
                raise DataError(f"{path} line {i}: no 'text' field (or 'question' and 'answer')")
        return docs
    text = read_text_file(path)
    if txt_documents == "blank_line":
        return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]
    return [text]


def _items_from_file(path: Path) -> list[dict]:
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: question-answer data must be JSONL with 'question' and 'answer' fields")
    items = []
    for i, row in read_jsonl(path):
        if "question" not in row or "answer" not in row:
            raise DataError(f"{path} line {i}: needs 'question' and 'answer' fields (GSM8K format)")
        items.append({"question": str(row["question"]), "answer": str(row["answer"])})
    return items


def _split_files(directory: Path, split: str) -> list[Path]:
    """Files of one split inside a local data directory (see module docstring)."""
    for name in _SPLIT_NAMES[split]:
        sub = directory / name
        if sub.is_dir():
            return sorted(p for p in sub.iterdir() if p.suffix in (".txt", ".jsonl"))
        matches = sorted(p for p in directory.glob(f"{name}.*") if p.suffix in (".txt", ".jsonl"))
        if matches:
            return matches
    return []


def _local_split(dataset: str, split: str, reader) -> list:
    path = Path(dataset)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return None  # a `save_to_disk` directory: read with datasets
        files = _split_files(path, split)
        if files:
            return [x for f in files for x in reader(f)]
        named = [s for s in SPLITS if _split_files(path, s)]
        if named:  # split files exist, just not this one: never re-split (that would leak train into test)
            raise DataError(f"data directory {path} has {', '.join(named)} files but no '{split}' file; "
                            f"add {split}.txt / {split}.jsonl (or a {split}/ directory)")
        every = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not every:
            raise DataError(f"data directory {path} holds no .txt or .jsonl files")
        records = [x for f in every for x in reader(f)]
    else:
        paths = sorted(Path(p) for p in glob.glob(dataset)) if any(c in dataset for c in "*?[") else [path]
        if not paths:
            raise DataError(f"no data files match {dataset}")
        records = [x for p in paths for x in reader(p)]
    return index_split(records, split, source=dataset)


def index_split(records: list, split: str, source: str) -> list:
    """Deterministic 80/10/10 split by index: record i is validation when i % 10 == 8, test when 9."""
    if len(records) < 3:
        raise DataError(f"{source}: {len(records)} document(s) cannot be split into train/validation/test; "
                        f"give a directory with train/validation/test files or more documents")
    if len(records) < 10:  # too few for the modulo rule: the last two serve validation and test
        return {"train": records[:-2], "validation": records[-2:-1], "test": records[-1:]}[split]
    wanted = {"train": range(0, 8), "validation": (8,), "test": (9,)}[split]
    return [r for i, r in enumerate(records) if i % 10 in wanted]


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets


@contextlib.contextmanager
def _hub_offline():
    """Make `datasets` read its local cache only (instead of retrying an unreachable hub for a minute)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _hf_split(name: str, split: str):
    import datasets

    repo, config, _ = HF_DATASETS[name]
    hf_split = split
    if name == "gsm8k" and split == "validation":
        raise DataError("gsm8k has no validation split; LatentWire validates on a held-out part of train")
    online = hub_reachable()
    try:
        if online:
            return datasets.load_dataset(repo, config, split=hf_split)
        with _hub_offline():
            return datasets.load_dataset(repo, config, split=hf_split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for "not there"; all mean the same to the user
        if not online:
            raise DataError(
                f"data set '{name}' is not in the local Hugging Face cache and the hub is unreachable (offline); "
                f"use dataset=builtin, or local files: dataset=path/to/dir with train/validation/test .txt/.jsonl"
            ) from None
        raise DataError(f"cannot load data set '{name}' ({repo}) split '{split}': {str(exc).splitlines()[0]}") from None


def _from_disk(path: Path, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot read the saved data set ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        for name in _SPLIT_NAMES[split]:
            if name in loaded:
                return loaded[name]
        raise DataError(f"{path}: no '{split}' split (has {', '.join(loaded)})")
    return loaded


def wikitext_articles(lines: list[str]) -> list[str]:
    """Group WikiText lines into articles: a line ' = Title = ' (one '=' on each side) starts one."""
    articles: list[list[str]] = []
    heading = re.compile(r"^ = [^=].* = $")
    for line in lines:
        if heading.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    docs = ["".join(a).strip() for a in articles]
    return [d for d in docs if d]


def _rows_to_documents(rows, layout: str) -> list[str]:
    columns = rows.column_names
    if layout == "wikitext" or (layout == "auto" and columns == ["text"] and _looks_like_wikitext(rows)):
        return wikitext_articles(list(rows["text"]))
    if "text" in columns:
        return [t for t in rows["text"] if t and t.strip()]
    if "question" in columns and "answer" in columns:
        return [f"Question: {q}\nAnswer: {a}" for q, a in zip(rows["question"], rows["answer"], strict=True)]
    raise DataError(f"data set has no 'text' column (columns: {', '.join(columns)})")


def _looks_like_wikitext(rows) -> bool:
    head = rows["text"][: min(20, len(rows))]
    return any(re.match(r"^ = [^=].* = $", t.rstrip("\n")) for t in head)


# ---------------------------------------------------------------------------------------------------
# Public interface


def load_documents(dataset: str, split: str, *, txt_documents: str = "file") -> list[str]:
    """Documents (strings) of one split of `dataset` (a known HF name, a saved data set, or local files)."""
    _check_split(split)
    if dataset in HF_DATASETS:
        return _rows_to_documents(_hf_split(dataset, split), HF_DATASETS[dataset][2])
    docs = _local_split(dataset, split, lambda p: _documents_from_file(p, txt_documents))
    if docs is None:
        docs = _rows_to_documents(_from_disk(Path(dataset), split), "auto")
    if not docs:
        raise DataError(f"{dataset}: the '{split}' split holds no documents")
    return docs


def load_qa_items(dataset: str, split: str) -> list[dict]:
    """GSM8K-format items `{"question", "answer"}` of one split (`gsm8k`, a saved data set, or JSONL)."""
    _check_split(split)
    if dataset in HF_DATASETS:
        if HF_DATASETS[dataset][2] != "qa":
            raise DataError(f"data set '{dataset}' has no question/answer items; use gsm8k or a JSONL file")
        rows = _hf_split(dataset, split)
    else:
        items = _local_split(dataset, split, _items_from_file)
        if items is not None:
            if not items:
                raise DataError(f"{dataset}: the '{split}' split holds no items")
            return items
        rows = _from_disk(Path(dataset), split)
    if "question" not in rows.column_names or "answer" not in rows.column_names:
        raise DataError(f"{dataset}: needs 'question' and 'answer' columns (GSM8K format)")
    return [{"question": q, "answer": a} for q, a in zip(rows["question"], rows["answer"], strict=True)]
