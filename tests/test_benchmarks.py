"""The benchmark runner on a tiny generated corpus (not timed)."""

from __future__ import annotations

import hashlib
import json

import pytest

from benchmarks import run

FAST = ["--segment-tokens", "24", "--batch-size", "3", "--context", "32", "--threads", "2"]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "texts").mkdir(parents=True)
    files = {"texts/a.txt": b"Alice was beginning to get very tired.\n",
             "texts/b.c": b"int main(void) { return 0; }\n"}
    lines = []
    for rel, data in files.items():
        (root / rel).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  ./{rel}")
    (root / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")
    (root / "SUITES.txt").write_text("# test\ntiny: texts/a.txt texts/b.c\nbase: texts/a.txt\n")
    return root


def test_runs_verifies_and_writes_table_json_and_plots(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(["--suite", "tiny", "--corpus", str(corpus), "--out", str(out), "-q", *FAST]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [f["file"] for f in doc["files"]] == ["texts/a.txt", "texts/b.c"]
    row = doc["files"][0]
    assert set(row["baselines"]) == {"gzip -9", "zstd -19", "zstd --ultra -22", "xz -9e", "bzip2 -9", "brotli -q 11"}
    assert row["lmcodec"]["bytes"] > 0 and row["lmcodec"]["model_bpb"] > 0
    assert doc["totals"]["lmcodec"]["bpb"] > 0
    table = (out / "results.md").read_text()
    assert "| **total** |" in table and "lmcodec" in table
    for png in ("bpb.png", "speed_ratio.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")


def test_resumes_without_redoing_finished_files(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--suite", "tiny", "--corpus", str(corpus), "--out", str(out), *FAST]
    assert run.main(args + ["--files", "texts/a.txt", "-q"]) == 0
    capsys.readouterr()
    assert run.main(args) == 0
    err = capsys.readouterr().err
    assert "texts/a.txt: already done" in err and "texts/b.c: already done" not in err
    assert len(json.loads((out / "results.json").read_text())["files"]) == 2


def test_prompt_comparison(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(run.FITTING_PROMPTS, "texts/a.txt", "Alice in Wonderland.")
    out = tmp_path / "out"
    assert run.main(["--suite", "base", "--corpus", str(corpus), "--out", str(out), "-q",
                     "--with-prompts", *FAST]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["files"][0]["prompted"]["prompt"] == "Alice in Wonderland."
    assert "What a decoding key is worth" in (out / "results.md").read_text()


def test_clear_errors_for_missing_corpus_and_bad_manifest(corpus, tmp_path, capsys):
    assert run.main(["--corpus", str(tmp_path / "nowhere"), "--no-lmcodec"]) == 2
    assert "no corpus at" in capsys.readouterr().err
    (corpus / "texts" / "a.txt").write_bytes(b"changed")
    assert run.main(["--suite", "tiny", "--corpus", str(corpus), "--no-lmcodec"]) == 2
    assert "does not match MANIFEST" in capsys.readouterr().err
    assert run.main(["--suite", "nope", "--corpus", str(corpus)]) == 2


def test_speed_benchmark_round_trips_and_reports_both_directions(corpus, tmp_path, capsys):
    from benchmarks import speed

    out = tmp_path / "speed.json"
    assert speed.main(["--file", str(corpus / "texts/a.txt"), "--device", "cpu", "--json", str(out),
                       *FAST]) == 0
    doc = json.loads(out.read_text())
    for key in ("compress_Bps", "decompress_Bps", "compress_tokps", "decompress_tokps", "forward_tokps",
                "compress_vs_forward", "decompress_vs_forward"):
        assert doc[key] > 0, key
    assert doc["device"] == "cpu" and doc["segment_tokens"] == 24 and doc["batch_size"] == 3
    assert "decompress" in capsys.readouterr().out


def test_alphabet_benchmark_compares_full_rows_with_two_stages(corpus, tmp_path):
    from benchmarks import alphabet

    out = tmp_path / "alphabet.json"
    assert alphabet.main(["--file", str(corpus / "texts/a.txt"), "--top-k", "4,64",
                          "--segment-tokens", "16", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    full = doc["full"]["bytes"]
    for k in ("4", "64"):
        two = doc["two_stage"][k]
        assert 0 <= two["stage2_share"] <= 1
        # The stages multiply out to the full row: sizes agree up to the coder's last words.
        assert abs(two["bytes"] - full) <= 8 + 0.01 * full
    assert doc["two_stage"]["4"]["stage2_share"] >= doc["two_stage"]["64"]["stage2_share"]
