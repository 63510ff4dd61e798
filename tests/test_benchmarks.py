"""The benchmark runner on a tiny generated corpus (not timed)."""

from __future__ import annotations

import hashlib
import json

import pytest

from benchmarks import run

FAST = ["--segment-tokens", "24", "--lanes", "2", "--context", "32", "--threads", "2"]


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


def test_results_of_other_code_are_redone(corpus, tmp_path, capsys, monkeypatch):
    """A saved result is reused only under the same lmcodec source (its digest is part of the key)."""
    out = tmp_path / "out"
    args = ["--suite", "base", "--corpus", str(corpus), "--out", str(out), *FAST]
    assert run.main(args + ["-q"]) == 0
    monkeypatch.setattr(run, "_code_digest", lambda: "other code")
    capsys.readouterr()
    assert run.main(args) == 0
    assert "already done" not in capsys.readouterr().err


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
    assert speed.main(["--file", str(corpus / "texts/a.txt"), "--device", "cpu", "--json", str(out), "--float",
                       *FAST]) == 0
    doc = json.loads(out.read_text())
    for key in ("compress_Bps", "decompress_Bps", "compress_tokps", "decompress_tokps", "forward_tokps",
                "compress_vs_forward", "decompress_vs_forward", "float_forward_tokps", "compress_vs_float"):
        assert doc[key] > 0, key
    assert doc["decode"]["tokens"] == doc["tokens"] and doc["decode"]["tokens_per_row_pass"] >= 1
    assert doc["device"] == "cpu" and doc["segment_tokens"] == 24 and doc["lanes"] == 2
    assert "decompress" in capsys.readouterr().out


def test_quantization_benchmark_compares_the_engine_with_the_float_model(corpus, tmp_path):
    from benchmarks import quantization

    out = tmp_path / "quant.json"
    assert quantization.main(["--file", str(corpus / "texts/a.txt"), "--window", "16", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["tokens"] > 0
    assert doc["float_bits"] > 0 and doc["engine_bits"] > 0
    # The integer engine is the float model quantized: within a few percent on any text.
    assert abs(doc["engine_bits"] / doc["float_bits"] - 1) < 0.1


def test_ablation_codes_every_variant_and_verifies_the_chosen_ones(corpus, tmp_path):
    import json

    from benchmarks import ablation

    out, md = tmp_path / "ablation.json", tmp_path / "ablation.md"
    assert ablation.main(["--corpus", str(corpus), "--files", "texts/a.txt", "--bytes", "30", "--level", "4",
                          "--threads", "2", "--json", str(out), "--md", str(md)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ablation.VARIANTS
    assert {r["variant"] for r in rows if r["verified"]} == {"none", "all"}
    assert all(r["archive_bytes"] > 0 and r["bytes"] == 30 for r in rows)
    assert rows[0]["gain"] == 0 and "| all |" in md.read_text()


def test_step_benchmark_reports_the_step_and_the_weight_read(tiny_model_dir, tmp_path):
    from benchmarks import step

    out = tmp_path / "step.json"
    assert step.main(["--model", str(tiny_model_dir), "--steps", "2", "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["step_ms"] > 0 and doc["read_ms"] > 0 and doc["weight_bytes"] > 0
    assert abs(doc["ratio"] - doc["step_ms"] / doc["read_ms"]) < 1e-9


def test_decode_time_benchmark_marks_the_payload_check_threshold(tmp_path):
    """Prefixes on both sides of PAYLOAD_CHECK_TOKENS: decoded, verified, timed, the check where it belongs."""
    from benchmarks import decode_time
    from lmcodec.format.container import PAYLOAD_CHECK_TOKENS

    text = tmp_path / "prose.txt"
    text.write_bytes(b"Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
                     b"nothing to do: once or twice she had peeped into the book her sister was reading, but it "
                     b"had no pictures or conversations in it, 'and what is the use of a book,' thought Alice "
                     b"'without pictures or conversations?'\nSo she was considering in her own mind (as well as "
                     b"she could, for the hot day made her feel very sleepy and stupid), whether the pleasure of "
                     b"making a daisy-chain would be worth the trouble of getting up and picking the daisies.\n")
    out = tmp_path / "decode.json"
    assert decode_time.main(["--file", str(text), "--skip", "0", "--sizes", "40", "500", "--level", "1",
                             "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["bytes"] for r in rows] == [40, 500] and rows[0]["tokens"] < PAYLOAD_CHECK_TOKENS <= rows[1]["tokens"]
    for r in rows:
        assert r["decode_s"] > 0 and r["payload_check"] == (r["tokens"] >= PAYLOAD_CHECK_TOKENS)


def test_against_unpacks_a_revision_and_times_a_verified_decode(tmp_path):
    """benchmarks.against's two halves: a revision unpacked with git archive, and a child
    process that compresses, decodes and verifies with the tree it is given."""
    from benchmarks import against

    rev = tmp_path / "rev"
    rev.mkdir()
    commit = against.unpack("HEAD", rev)
    assert len(commit) == 40 and (rev / "lmcodec" / "__init__.py").is_file()
    src = tmp_path / "in.txt"
    src.write_bytes(b"Alice was beginning to get very tired of sitting by her sister on the bank.\n")
    job = {"input": str(src), "archive": str(tmp_path / "in.lmc"), "settings": {"segment_tokens": 24, "lanes": 2,
                                                                                "context": 32}, "threads": 1,
           "dict": None, "compress": True}
    doc = against.child(against.ROOT, job)
    assert doc["ok"] and doc["seconds"] > 0 and doc["tokens"] > 0 and doc["archive"] == (tmp_path / "in.lmc").stat().st_size
