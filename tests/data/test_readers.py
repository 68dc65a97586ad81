"""Every reader, the column mapping and its errors; the real data sets read completely."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from multitune.config.schema import FORMATS, SplitConfig
from multitune.data import CANONICAL_FIELDS, EXTENSIONS, READERS, infer_format, read_split
from multitune.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WHERE = "tasks.t.data.train"
CLS = (("text", "text_pair", "label"), ("text", "label"))
TOK = (("tokens", "tags"), ("tokens", "tags"))
PAIR = (("source", "target"), ("source", "target"))
TEXT = (("text",), ("text",))


def write(path: Path, text: str, newline: str = "\n") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text.replace("\n", newline))
    return path


def read(spec: SplitConfig, base: Path, fields=CLS) -> list[dict]:
    return read_split(spec, base, "train", WHERE, *fields)


def test_registry_covers_every_config_format():
    assert set(READERS) == set(FORMATS)
    assert set(EXTENSIONS.values()) <= set(READERS)


# --- csv / tsv -----------------------------------------------------------------------------------------

def test_csv_crlf_with_quoted_delimiters_quotes_and_newlines(tmp_path):
    write(tmp_path / "a.csv", 'text,label\n"hello, world",pos\n"multi\nline ""quoted""",neg\n\nplain,pos\n',
          newline="\r\n")
    rows = read(SplitConfig(path="a.csv"), tmp_path)
    assert [r["text"] for r in rows] == ["hello, world", 'multi\r\nline "quoted"', "plain"]
    assert [r["label"] for r in rows] == ["pos", "neg", "pos"]
    assert [r["_line"] for r in rows] == [2, 3, 6]  # the quoted row spans lines 3-4; line 5 is blank
    assert rows[0]["_file"] == "a.csv" and "text_pair" not in rows[0]  # optional column absent: skipped


def test_headerless_csv_takes_names_from_columns(tmp_path):
    write(tmp_path / "a.csv", 'a,"b, c",1.5\nd,e,2\n')
    rows = read(SplitConfig(path="a.csv", header=False, columns=["text", "text_pair", "label"]), tmp_path)
    assert rows == [{"text": "a", "text_pair": "b, c", "label": "1.5", "_file": "a.csv", "_line": 1},
                    {"text": "d", "text_pair": "e", "label": "2", "_file": "a.csv", "_line": 2}]
    with pytest.raises(ConfigError, match=rf"^{WHERE}.columns: required when header: false"):
        read(SplitConfig(path="a.csv", header=False), tmp_path)


def test_header_with_columns_renames_the_header(tmp_path):
    write(tmp_path / "a.csv", "sent,score\nx,1\n")
    rows = read(SplitConfig(path="a.csv", columns=["text", "label"]), tmp_path)
    assert rows == [{"text": "x", "label": "1", "_file": "a.csv", "_line": 2}]


def test_csv_row_with_wrong_field_count_names_its_line(tmp_path):
    write(tmp_path / "a.csv", "text,label\nx,1\ny,2,3\n")
    with pytest.raises(DataError, match=r"^a.csv:3: expected 2 fields, found 3"):
        read(SplitConfig(path="a.csv"), tmp_path)


def test_csv_unclosed_quote_names_the_row_start(tmp_path):
    write(tmp_path / "a.csv", 'text,label\nx,1\n"never closed,2\ny,3\n')
    with pytest.raises(DataError, match=r"^a.csv:3: malformed CSV row"):
        read(SplitConfig(path="a.csv"), tmp_path)


def test_tsv_keeps_quote_characters_as_text(tmp_path):
    write(tmp_path / "a.tsv", 'label\tsentence\n1\t"quoted" start\n0\tit \'s "odd\n', newline="\r\n")
    rows = read(SplitConfig(path="a.tsv", text="sentence"), tmp_path)
    assert [r["text"] for r in rows] == ['"quoted" start', 'it \'s "odd']
    assert [r["label"] for r in rows] == ["1", "0"]


def test_delimiter_override(tmp_path):
    write(tmp_path / "a.csv", "text;label\na, b;1\n")
    assert read(SplitConfig(path="a.csv", delimiter=";"), tmp_path)[0]["text"] == "a, b"


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    (tmp_path / "a.csv").write_bytes("\ufefftext,label\nx,1\n".encode())
    assert read(SplitConfig(path="a.csv"), tmp_path)[0]["text"] == "x"


def test_bad_encoding_names_the_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ok\nstill ok\n\xff\xfe bad\n")
    with pytest.raises(DataError, match=r"^a.txt:3: not valid utf-8 text"):
        read(SplitConfig(path="a.txt"), tmp_path, TEXT)
    (tmp_path / "l.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert read(SplitConfig(path="l.txt", encoding="latin-1"), tmp_path, TEXT)[0]["text"] == "caf\xe9"


# --- column mapping ------------------------------------------------------------------------------------

def test_explicit_mapping_to_a_missing_column(tmp_path):
    write(tmp_path / "a.tsv", "label\tsentence\n1\tx\n")
    with pytest.raises(DataError, match=r"^a.tsv:2: no column 'review' \(set by text: review\); "
                                        r"columns found: label, sentence$"):
        read(SplitConfig(path="a.tsv", text="review"), tmp_path)
    # an explicitly mapped optional field must exist too
    with pytest.raises(DataError, match=r"no column 'second' \(set by text_pair: second\)"):
        read(SplitConfig(path="a.tsv", text="sentence", text_pair="second"), tmp_path)


def test_missing_required_column_lists_the_columns_found(tmp_path):
    write(tmp_path / "a.tsv", "label\tsentence\n1\tx\n")
    with pytest.raises(DataError, match=r"^a.tsv:2: missing column 'text'.*columns found: label, sentence$"):
        read(SplitConfig(path="a.tsv"), tmp_path)


def test_missing_required_key_in_a_later_jsonl_record(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"^a.jsonl:2: missing column 'label'.*columns found: text$"):
        read(SplitConfig(path="a.jsonl"), tmp_path)


def test_only_requested_fields_are_kept(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "a", "label": 1, "source": "s", "extra": 2}\n')
    rows = read(SplitConfig(path="a.jsonl"), tmp_path, TEXT)
    assert rows == [{"text": "a", "_file": "a.jsonl", "_line": 1}]
    assert set(rows[0]) - {"_file", "_line"} <= set(CANONICAL_FIELDS)


# --- jsonl / parquet -----------------------------------------------------------------------------------

def test_jsonl_keeps_json_types_and_skips_blank_lines(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "a", "label": ["x", "y"]}\n\n{"text": "b", "label": 1}\n')
    rows = read(SplitConfig(path="a.jsonl"), tmp_path)
    assert [r["label"] for r in rows] == [["x", "y"], 1]
    assert [r["_line"] for r in rows] == [1, 3]
    write(tmp_path / "t.jsonl", '{"tokens": ["a", "b"], "tags": ["B-X", "O"]}\n')
    assert read(SplitConfig(path="t.jsonl"), tmp_path, TOK)[0]["tokens"] == ["a", "b"]


def test_jsonl_malformed_line_is_named(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n{"text": "c"\n')
    with pytest.raises(DataError, match=r"^a.jsonl:3: invalid JSON: "):
        read(SplitConfig(path="a.jsonl"), tmp_path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    write(tmp_path / "a.json", '{"text": "a", "label": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"^a.json:2: expected a JSON object per line, found list"):
        read(SplitConfig(path="a.json"), tmp_path)


def test_parquet_rows_are_numbered_from_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"words": [["a", "b"], ["c"]], "tags": [["B-X", "O"], ["O"]]}),
                   tmp_path / "a.parquet")
    rows = read(SplitConfig(path="a.parquet", tokens="words"), tmp_path, TOK)
    assert rows == [{"tokens": ["a", "b"], "tags": ["B-X", "O"], "_file": "a.parquet", "_line": 1},
                    {"tokens": ["c"], "tags": ["O"], "_file": "a.parquet", "_line": 2}]


def test_unreadable_parquet_is_a_data_error(tmp_path):
    write(tmp_path / "a.parquet", "not parquet\n")
    with pytest.raises(DataError, match=r"^a.parquet: cannot read as parquet"):
        read(SplitConfig(path="a.parquet"), tmp_path)


# --- conll / text / parallel ---------------------------------------------------------------------------

def test_conll_sentences_docstart_and_first_token_lines(tmp_path):
    write(tmp_path / "a.conll", "-DOCSTART- -X- O\n\nJohn\tB-PER\nran\tO\n\n\nOslo  B-LOC\nNew York\tB-LOC\n",
          newline="\r\n")
    rows = read(SplitConfig(path="a.conll"), tmp_path, TOK)
    assert [r["tokens"] for r in rows] == [["John", "ran"], ["Oslo", "New York"]]
    assert [r["tags"] for r in rows] == [["B-PER", "O"], ["B-LOC", "B-LOC"]]
    assert [r["_line"] for r in rows] == [3, 7]


def test_conll_column_choice(tmp_path):
    write(tmp_path / "a.conll", "1 John NNP B-PER\n2 ran VBD O\n")
    rows = read(SplitConfig(path="a.conll", token_column=1), tmp_path, TOK)
    assert rows[0]["tokens"] == ["John", "ran"] and rows[0]["tags"] == ["B-PER", "O"]
    rows = read(SplitConfig(path="a.conll", token_column=1, tag_column=2), tmp_path, TOK)
    assert rows[0]["tags"] == ["NNP", "VBD"]


def test_conll_line_without_a_tag(tmp_path):
    write(tmp_path / "a.conll", "John\tB-PER\nran\n")
    with pytest.raises(DataError, match=r"^a.conll:2: expected a token and a tag"):
        read(SplitConfig(path="a.conll"), tmp_path, TOK)


def test_text_one_example_per_non_blank_line(tmp_path):
    write(tmp_path / "a.txt", "one\n\n  \ntwo\n", newline="\r\n")
    rows = read(SplitConfig(path="a.txt"), tmp_path, TEXT)
    assert [(r["text"], r["_line"]) for r in rows] == [("one", 1), ("two", 4)]


def test_parallel_pairs_lines_and_keeps_blank_lines_aligned(tmp_path):
    write(tmp_path / "s.de", "ein\n\ndrei\n")
    write(tmp_path / "t.en", "one\ntwo\nthree\n\n")  # a trailing blank line does not count
    rows = read(SplitConfig(format="parallel", source_path="s.de", target_path="t.en"), tmp_path, PAIR)
    assert [(r["source"], r["target"], r["_line"]) for r in rows] == [
        ("ein", "one", 1), ("", "two", 2), ("drei", "three", 3)]
    assert rows[0]["_file"] == "s.de"


def test_parallel_length_mismatch_names_both_files_and_counts(tmp_path):
    write(tmp_path / "s.de", "ein\nzwei\n")
    write(tmp_path / "t.en", "one\ntwo\nthree\n")
    with pytest.raises(DataError, match=r"^s.de: has 2 lines but the target file t.en has 3"):
        read(SplitConfig(format="parallel", source_path="s.de", target_path="t.en"), tmp_path, PAIR)


def test_parallel_missing_file_names_its_field(tmp_path):
    write(tmp_path / "s.de", "ein\n")
    with pytest.raises(ConfigError, match=rf"^{WHERE}.target_path: file not found: .*t.en$"):
        read(SplitConfig(format="parallel", source_path="s.de", target_path="t.en"), tmp_path, PAIR)


# --- target_map ----------------------------------------------------------------------------------------

def test_target_map_maps_target_values(tmp_path):
    write(tmp_path / "a.tsv", "label\tsentence\n0\tbad\n1\tgood\n")
    mapping = {"0": "negative", "1": "positive"}
    rows = read(SplitConfig(path="a.tsv", source="sentence", target="label", target_map=mapping), tmp_path, PAIR)
    assert [(r["source"], r["target"]) for r in rows] == [("bad", "negative"), ("good", "positive")]
    with pytest.raises(DataError, match=r"^a.tsv:3: target value '1' is not in target_map \(keys: '0'\)"):
        read(SplitConfig(path="a.tsv", source="sentence", target="label", target_map={"0": "negative"}),
             tmp_path, PAIR)


def test_target_map_maps_labels_when_there_is_no_target(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.0}\n')
    rows = read(SplitConfig(path="a.jsonl", target_map={"0": "neg", "1": "pos"}), tmp_path)
    assert [r["label"] for r in rows] == ["pos", "neg"]


# --- paths and formats ---------------------------------------------------------------------------------

def test_format_inference_and_its_error(tmp_path):
    assert [infer_format(SplitConfig(path=f"x{ext}"), WHERE) for ext in (".csv", ".TSV", ".json", ".bio")] == [
        "csv", "tsv", "jsonl", "conll"]
    assert infer_format(SplitConfig(path="x.data", format="text"), WHERE) == "text"
    write(tmp_path / "a.data", "x\n")
    with pytest.raises(ConfigError, match=rf"^{WHERE}.format: cannot infer the format of 'a.data'.*set format:"):
        read(SplitConfig(path="a.data"), tmp_path)
    assert read(SplitConfig(path="a.data", format="text"), tmp_path, TEXT)[0]["text"] == "x"


def test_missing_file_names_the_field_path_and_resolved_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{WHERE}.path: file not found: {re.escape(str(tmp_path / 'nope.csv'))}$"):
        read(SplitConfig(path="nope.csv"), tmp_path)


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(ConfigError, match=rf"^{WHERE}.path: not a file"):
        read(SplitConfig(path="d.csv"), tmp_path)


def test_absolute_paths_ignore_base_dir(tmp_path):
    f = write(tmp_path / "a.txt", "x\n")
    rows = read(SplitConfig(path=str(f)), Path("/nonexistent"), TEXT)
    assert rows[0]["_file"] == str(f)


# --- the real data sets --------------------------------------------------------------------------------

@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the real data sets are not at {SHARED_DATA}")
def test_real_data_sets_read_completely():
    def n(spec: SplitConfig, fields) -> list[dict]:
        return read_split(spec, SHARED_DATA, "train", "tasks.real.data.train", *fields)

    sst = n(SplitConfig(path="sst2/train.tsv", text="sentence"), CLS)
    assert len(sst) == 67349 and {r["label"] for r in sst} == {"0", "1"}
    assert sst[0] == {"text": "hide new secretions from the parental units", "label": "0",
                      "_file": "sst2/train.tsv", "_line": 2}
    dev = n(SplitConfig(path="sst2/dev.tsv", text="content"), CLS)  # dev names the column "content"
    assert len(dev) == 872 and {r["label"] for r in dev} == {"0", "1"}

    assert len(n(SplitConfig(path="wnut17/train.conll"), TOK)) == 3394
    wnut_dev = n(SplitConfig(path="wnut17/dev.conll"), TOK)
    assert len(wnut_dev) == 1009 and all(len(r["tokens"]) == len(r["tags"]) > 0 for r in wnut_dev)

    sts_columns = ["text", "text_pair", "label"]
    for file, count in (("stsb/train.csv", 5749), ("stsb/dev.csv", 1500)):
        sts = n(SplitConfig(path=file, header=False, columns=sts_columns), CLS)
        assert len(sts) == count and all(0.0 <= float(r["label"]) <= 5.0 for r in sts)

    for split, count in (("train", 29000), ("val", 1014)):
        pairs = n(SplitConfig(format="parallel", source_path=f"multi30k/{split}.de",
                              target_path=f"multi30k/{split}.en"), PAIR)
        assert len(pairs) == count and all(r["source"] and r["target"] for r in pairs)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="file permissions do not apply to root (or on this platform)")
def test_unreadable_file_names_the_field_path(tmp_path):
    f = write(tmp_path / "a.txt", "x\n")
    f.chmod(0)
    try:
        with pytest.raises(ConfigError, match=rf"^{WHERE}.path: file is not readable"):
            read(SplitConfig(path="a.txt"), tmp_path, TEXT)
    finally:
        f.chmod(0o644)
