"""Tests for ch07/dataset_utils: near-duplicates (TF-IDF and MinHash LSH) on a planted set whose pairs are
known, the de-duplicated file (deterministic, input untouched, one-line errors), and the rewrites made
through the Ollama API: against a fake server that sends bad replies or dies, against chapter 7's own
server (`ch07.serve`, in a thread), resumed after an interruption; and the notebook's stored outputs."""

import itertools
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("datasketch")

from ch07.dataset_utils import create_passive_voice_entries as cpv  # noqa: E402
from ch07.dataset_utils import find_near_duplicates as fnd  # noqa: E402
from test_ch07_dpo_preference_data import DIE, DyingReplies  # noqa: E402
from test_ch07_ollama_evaluate import (  # noqa: E402,F401 (fixtures: the proxy switch-off and a closed port)
    SILENT,
    FakeOllama,
    _no_proxy_for_localhost,
    closed_port,
    interrupt_real_run,
    stderr_lines,
)

REPO = Path(__file__).resolve().parents[1]

# A planted set: three groups of near-duplicate prompts (instruction + input), the rest unrelated, and a
# pair that shares an instruction but not its input (6, 8: a different task, never a duplicate prompt).
PLANTED = [dict(instruction=a, input=b, output=c) for a, b, c in [
    ("Convert 45 kilometers to meters.", "", "45 kilometers is 45000 meters."),                      # 0
    ("Name the largest planet in our solar system.", "", "Jupiter is the largest planet."),          # 1
    ("Translate the sentence into Spanish.", "Good morning, my friend.", "Buenos días, mi amigo."),  # 2
    ("Convert 45 kilometers into meters.", "", "45 kilometers equals 45000 meters."),                # 3 ~ 0
    ("Write a haiku about autumn rain.", "", "Cold rain on the roof / leaves fall."),                # 4
    ("name the largest planet in our solar system!", "", "The largest planet is Jupiter."),          # 5 = 1
    ("Classify the sentiment of the review.", "I loved every minute of it.", "Positive."),           # 6
    ("Translate the sentence into Spanish.", "Good morning, my friend!", "Buenos días, amigo mío."),  # 7 = 2
    ("Classify the sentiment of the review.", "The plot was dull and the acting was worse.", "Negative."),  # 8
    ("Name the largest planet in our solar system", "", "Jupiter."),                                 # 9 = 1
    ("List three primary colors.", "", "Red, blue and yellow."),                                     # 10
    ('Give the past tense of "run".', "", 'The past tense of "run" is "ran".'),                       # 11
]]
PROMPT_PAIRS = {(0, 3), (1, 5), (1, 9), (5, 9), (2, 7)}
PROMPT_GROUPS = [[0, 3], [1, 5, 9], [2, 7]]
THRESHOLD = {"tfidf": 0.7, "minhash": 0.5}  # below every planted pair, above every other pair (checked below)


def prompts(data=PLANTED):
    return [fnd.field_text(item, "instruction+input") for item in data]


def brute_force(texts, method):
    """Every pair's similarity, computed directly: scikit-learn's cosine_similarity on the book's TF-IDF
    vectors, or the exact Jaccard similarity of the shingle sets."""
    n = len(texts)
    usable = [i for i in range(n) if len(fnd.preprocess_text(texts[i]).strip()) > 1]
    if method == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.metrics.pairwise import cosine_similarity

        matrix = TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit_transform(
            [fnd.preprocess_text(texts[i]) for i in usable])
        sims = cosine_similarity(matrix)
        return {(usable[a], usable[b]): sims[a, b] for a, b in itertools.combinations(range(len(usable)), 2)}
    sets = [fnd.shingles(t) for t in texts]
    return {(i, j): fnd.jaccard(sets[i], sets[j]) for i, j in itertools.combinations(usable, 2)}


# --- near-duplicates --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", fnd.METHODS)
def test_the_planted_pairs_are_found_exactly(method):
    sims = brute_force(prompts(), method)
    threshold = THRESHOLD[method]
    assert min(sims[p] for p in PROMPT_PAIRS) > threshold > max(s for p, s in sims.items() if p not in PROMPT_PAIRS)
    pairs = fnd.similar_pairs(prompts(), threshold, method)
    assert {(i, j) for i, j, _ in pairs} == PROMPT_PAIRS
    for i, j, sim in pairs:
        assert sim == pytest.approx(sims[(i, j)], abs=1e-9)
    assert fnd.group_pairs(pairs) == PROMPT_GROUPS


@pytest.mark.parametrize("method", fnd.METHODS)
def test_threshold_is_strict_and_moves_the_boundary(method):
    sims = brute_force(prompts(), method)
    near = sims[(0, 3)]  # the one planted pair that is not identical after preprocessing
    assert near < 1
    found = {(i, j) for i, j, _ in fnd.similar_pairs(prompts(), near, method)}  # "above", not "at"
    assert found == PROMPT_PAIRS - {(0, 3)}
    below = {(i, j) for i, j, _ in fnd.similar_pairs(prompts(), near - 1e-6, method)}
    assert below == PROMPT_PAIRS
    # lower thresholds find more pairs, never fewer
    counts = [len(fnd.similar_pairs(prompts(), t, method)) for t in (0.9, 0.5, 0.3, 0.1)]
    assert counts == sorted(counts) and counts[-1] > len(PROMPT_PAIRS)


def test_tfidf_blocks_give_the_full_matrix_result():
    texts = [fnd.field_text(item, "output") for item in PLANTED]
    expected = {p for p, s in brute_force(texts, "tfidf").items() if s > 0.3}
    for block_size in (1, 3, 1024):
        assert {(i, j) for i, j, _ in fnd.tfidf_pairs(texts, 0.3, block_size=block_size)} == expected


def test_minhash_only_reports_pairs_above_the_threshold_and_misses_none_here():
    texts = [fnd.field_text(item, "instruction") for item in PLANTED] * 2  # every text twice: many exact pairs
    exact = {p for p, s in brute_force(texts, "minhash").items() if s > 0.6}
    assert {(i, j) for i, j, _ in fnd.minhash_pairs(texts, 0.6)} == exact


def test_empty_and_one_character_texts_are_never_paired():
    texts = ["", "", "a", "a", "Name a color.", "Name a colour."]
    for method in fnd.METHODS:
        assert [(i, j) for i, j, _ in fnd.similar_pairs(texts, 0.3, method)] == [(4, 5)]


def test_the_books_function_pairs_the_right_records_after_empty_fields():
    """The book's version drops empty texts and then indexes the records by the shorter list (records 0 and 1
    here, whose inputs are empty); ours reports the records whose inputs are similar."""
    filtered, pairs = fnd.find_near_duplicates(PLANTED, threshold=0.9, key="input")
    assert [(a["input"], b["input"]) for a, b, _ in pairs] == [(PLANTED[2]["input"], PLANTED[7]["input"])]
    assert filtered == [r for k, r in enumerate(PLANTED) if k != 7]  # the book removes by input: the second goes
    kept, instruction_pairs = fnd.find_near_duplicates(PLANTED, threshold=0.9, key="instruction")
    assert kept == PLANTED  # never removed by the instruction alone
    instructions = [item["instruction"] for item in PLANTED]
    expected = sorted(p for p, s in brute_force(instructions, "tfidf").items() if s > 0.9)
    assert [(PLANTED.index(a), PLANTED.index(b)) for a, b, _ in instruction_pairs] == expected
    assert (6, 8) in expected  # one instruction, two inputs


def test_removal_keeps_the_first_of_each_group_whatever_the_field_order():
    a = fnd.find_duplicates(PLANTED, ["output", "instruction+input"], ["instruction+input", "output"], 0.7)
    b = fnd.find_duplicates(PLANTED, ["instruction+input"], ["output", "instruction+input"], 0.7)
    assert a.removed == b.removed == [3, 5, 7, 9]
    assert fnd.deduplicate(PLANTED, a) == [r for k, r in enumerate(PLANTED) if k not in (3, 5, 7, 9)]
    chain = fnd.group_pairs([(4, 7, 0.9), (2, 4, 0.9), (7, 9, 0.9), (0, 1, 0.9)])  # 2-4-7-9 chain: one group
    assert chain == [[0, 1], [2, 4, 7, 9]]


# --- the command -----------------------------------------------------------------------------------------

@pytest.fixture
def planted_file(tmp_path):
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(PLANTED, indent=1))
    return path


@pytest.mark.parametrize("method", fnd.METHODS)
def test_command_writes_a_deterministic_deduplicated_file(method, planted_file, tmp_path, capsys):
    before = planted_file.read_bytes()
    outputs = []
    for run in (1, 2):
        out, report = tmp_path / f"dedup{run}.json", tmp_path / f"report{run}.json"
        argv = ["--data", str(planted_file), "--method", method, "--threshold", str(THRESHOLD[method]),
                "--keys", "instruction+input", "--output", str(out), "--report", str(report)]
        assert fnd.main(argv) == 0
        outputs.append((out.read_bytes(), report.read_bytes()))
    assert outputs[0] == outputs[1]
    assert planted_file.read_bytes() == before
    assert json.loads(outputs[0][0]) == [r for k, r in enumerate(PLANTED) if k not in (3, 5, 7, 9)]
    report = json.loads(outputs[0][1])
    assert report["removed"] == [3, 5, 7, 9] and report["method"] == method
    assert report["fields"]["instruction+input"]["groups"] == PROMPT_GROUPS
    assert {(p["first"], p["second"]) for p in report["fields"]["instruction+input"]["pairs"]} == PROMPT_PAIRS
    out = capsys.readouterr().out
    assert "4 of 12 records are near-duplicates of an earlier record (in instruction+input)" in out
    assert "8 records written to" in out


def test_jsonl_in_jsonl_out(tmp_path):
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PLANTED))
    out = tmp_path / "dedup.jsonl"
    assert fnd.main(["--data", str(data), "--threshold", "0.7", "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [r for k, r in enumerate(PLANTED) if k not in (3, 5, 7, 9)]


def test_chapter_data_by_default(capsys):
    """No --data: the chapter's instruction-data.json (from the mirror); both methods agree on exact copies."""
    assert fnd.main(["--keys", "input", "--max-pairs", "1"]) == 0
    out = capsys.readouterr().out
    assert "instruction-data.json: 1100 records; tfidf, similarity > 0.9" in out


def run_main(argv):
    try:
        return fnd.main(argv)
    except SystemExit as exc:  # the parser's one-line errors
        return exc.code


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "not json", "bad jsonl", "missing key",
                                  "not a list", "threshold", "threshold word", "method", "same file", "exists",
                                  "report is output", "empty key"])
def test_one_line_errors_before_any_work(case, planted_file, tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = {"missing": ["--data", str(tmp_path / "none.json")],
            "folder": ["--data", str(tmp_path)],
            "empty": ["--data", str(tmp_path / "empty.json")],
            "not json": ["--data", str(tmp_path / "bad.json")],
            "bad jsonl": ["--data", str(tmp_path / "bad.jsonl")],
            "missing key": ["--data", str(planted_file), "--keys", "instruction", "response"],
            "not a list": ["--data", str(tmp_path / "object.json")],
            "threshold": ["--data", str(planted_file), "--threshold", "1"],
            "threshold word": ["--data", str(planted_file), "--threshold", "high"],
            "method": ["--data", str(planted_file), "--method", "simhash"],
            "same file": ["--data", str(planted_file), "--output", str(planted_file)],
            "exists": ["--data", str(planted_file), "--output", str(out)],
            "report is output": ["--data", str(planted_file), "--output", str(out), "--report", str(out)],
            "empty key": ["--data", str(planted_file), "--keys", "instruction+"]}[case]
    (tmp_path / "empty.json").write_text(" \n")
    (tmp_path / "bad.json").write_text('[{"instruction": "x",')
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n')
    (tmp_path / "object.json").write_text('{\n  "instruction": "x"\n}\n')  # an object, not a list of records
    if case == "exists":
        out.write_text("keep me")
    before = planted_file.read_bytes()
    assert run_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was searched
    lines = stderr_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert planted_file.read_bytes() == before
    if case == "exists":
        assert out.read_text() == "keep me" and "--overwrite" in lines[0]
    if case == "same file":
        assert "never overwritten" in lines[0]


# --- rewrites through the Ollama API --------------------------------------------------------------------

DATA = [
    {"instruction": "Identify the verb.", "input": "The cat sleeps.", "output": "The verb is \"sleeps.\""},
    {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
    {"instruction": "Change to past tense.", "input": "They finish the game.", "output": "They finished the game."},
    {"instruction": "Say hi.", "input": "", "output": "I say hi."},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "instruction-data.json"
    path.write_text(json.dumps(DATA))
    return path


def line(i, rewrite):
    """The line the command writes for record i when the model's rewrite is `rewrite`."""
    return json.dumps({**DATA[i], "output_2": rewrite, "index": i}, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("reply, why", [
    ("", "empty"),
    ("   ", "empty"),
    ('"Red is a primary color."', "unchanged"),
    ("x" * 400, "characters long"),
    ("Without adding any response or explanation, convert the following text to passive voice: Red is...",
     "repeats the prompt"),
    ("Sure! without adding any response   or explanation, Convert the following text to passive voice", "repeats"),
])
def test_bad_replies_are_refused(reply, why):
    text, reason = cpv.check_rewrite(reply, DATA[1]["output"])
    assert text is None and why in reason


def test_good_replies_are_cleaned():
    assert cpv.check_rewrite('  "A primary color is represented by red."\n', DATA[1]["output"]) == (
        "A primary color is represented by red.", "")
    custom = "Rewrite in simpler words: {text}"
    assert cpv.check_rewrite("Rewrite in simpler words: Red.", "Red is a primary color.", custom)[0] is None
    assert cpv.make_prompt("a {b} c", custom) == "Rewrite in simpler words: a {b} c"


def test_bad_replies_server_death_and_rerun(data_file, tmp_path, capsys):
    out = tmp_path / "passive.jsonl"
    replies = [
        "`The verb \"sleeps\" is identified.`",   # record 0: fine (backticks stripped)
        "",                                        # record 1: empty ...
        "A primary color is represented by red.",  # ... the stricter retry is fine
        "They finished the game.",                 # record 2: unchanged ...
        "x" * 500,                                 # ... and runaway long: left out
        DIE,                                       # record 3: the server dies
    ]
    fake = FakeOllama()
    fake.replies = DyingReplies(replies, fake)
    argv = ["--data", str(data_file), "--output", str(out), "--no-progress"]
    with fake:
        assert cpv.main([*argv, "--host", fake.host]) == 1
    err = capsys.readouterr().err
    (error,) = stderr_lines(err)
    assert error.startswith(f"error: the server at {fake.host} stopped answering") and "after 2 new records" in error
    assert error.endswith(f"they are saved in {out}: run the same command again to continue.")
    prompts = [r["messages"][0]["content"] for r in fake.chat_requests]
    assert len(prompts) == 6
    assert prompts[0] == cpv.make_prompt(DATA[0]["output"]) == (
        "Without adding any response or explanation, convert the following text to passive voice: "
        + DATA[0]["output"])
    assert prompts[2] == prompts[1] + cpv.STRICT_SUFFIX and prompts[4] == prompts[3] + cpv.STRICT_SUFFIX
    assert out.read_text() == line(0, 'The verb "sleeps" is identified.') + line(1, "A primary color is represented by red.")

    # A crash in the middle of writing leaves half a line; the rerun drops it and asks for records 2 and 3 only.
    with open(out, "a") as f:
        f.write('{"instruction": "Change to pa')
    with FakeOllama(["The game was finished by them.", "Hi is said by me."]) as fake2:
        assert cpv.main([*argv, "--host", fake2.host]) == 0
    assert [r["messages"][0]["content"] for r in fake2.chat_requests] == [
        cpv.make_prompt(DATA[2]["output"]), cpv.make_prompt(DATA[3]["output"])]
    assert "2 records written, 2 were there before, 0 without a usable reply" in capsys.readouterr().out
    assert out.read_text() == (line(0, 'The verb "sleeps" is identified.') + line(1, "A primary color is represented by red.")
                               + line(2, "The game was finished by them.") + line(3, "Hi is said by me."))
    assert cpv.main(argv) == 0  # all done: no server needed
    assert "already holds all 4 records" in capsys.readouterr().out


def test_invalid_replies_are_counted_and_asked_again(data_file, tmp_path, capsys):
    out = tmp_path / "passive.jsonl"
    argv = ["--data", str(data_file), "--output", str(out), "--no-progress"]
    bad = ["", "   ", "They finished the game.", "They finished the game."]  # records 1 and 2: both tries bad
    with FakeOllama(["The verb \"sleeps\" is identified.", *bad, "Hi is said by me."]) as fake:
        assert cpv.main([*argv, "--host", fake.host]) == 0
    assert "2 records written, 0 were there before, 2 without a usable reply (rerun to ask again)" in (
        capsys.readouterr().out)
    assert [json.loads(r)["index"] for r in out.read_text().splitlines()] == [0, 3]
    with FakeOllama(["A primary color is represented by red.", "The game was finished by them."]) as fake2:
        assert cpv.main([*argv, "--host", fake2.host]) == 0
    assert len(fake2.chat_requests) == 2  # only the two left out
    assert "2 records written, 2 were there before, 0 without" in capsys.readouterr().out
    assert sorted(json.loads(r)["index"] for r in out.read_text().splitlines()) == [0, 1, 2, 3]


def test_a_limit_then_the_rest(data_file, tmp_path, capsys):
    out = tmp_path / "passive.jsonl"
    argv = ["--data", str(data_file), "--output", str(out), "--no-progress"]
    with FakeOllama(["The verb \"sleeps\" is identified.", "A primary color is represented by red."]) as fake:
        assert cpv.main([*argv, "--limit", "2", "--host", fake.host]) == 0
    assert "2 records written, 0 were there before" in capsys.readouterr().out
    with FakeOllama(["The game was finished by them.", "Hi is said by me."]) as fake:
        assert cpv.main([*argv, "--host", fake.host]) == 0
    assert len(fake.chat_requests) == 2 and "2 records written, 2 were there before" in capsys.readouterr().out
    assert cpv.main([*argv, "--limit", "3"]) == 0  # a shorter run over a longer file: nothing to do, no server
    assert "already holds all 3 records" in capsys.readouterr().out
    assert [json.loads(r)["index"] for r in out.read_text().splitlines()] == [0, 1, 2, 3]


def test_malformed_server_answer_stops_with_one_line(data_file, tmp_path, capsys):
    out = tmp_path / "passive.jsonl"
    with FakeOllama(["The verb \"sleeps\" is identified.", (500, {"oops": "no message"})]) as fake:
        assert cpv.main(["--data", str(data_file), "--output", str(out), "--host", fake.host, "--no-progress"]) == 1
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "HTTP 500 without a chat message" in lines[0] and "after 1 new records" in lines[0]
    assert out.read_text() == line(0, 'The verb "sleeps" is identified.')


def test_custom_prompt_key_and_new_key(data_file, tmp_path, capsys):
    out = tmp_path / "simple.jsonl"
    with FakeOllama(["Cat sleeps.", "Make it past."]) as fake:
        assert cpv.main(["--data", str(data_file), "--output", str(out), "--host", fake.host, "--no-progress",
                         "--limit", "2", "--key", "input", "--new-key", "input_simple", "--prompt",
                         "Say it more simply: {text}", "--max-new-tokens", "20"]) == 0
    # record 1's input is "": copied without asking
    assert [r["messages"][0]["content"] for r in fake.chat_requests] == ["Say it more simply: The cat sleeps."]
    assert fake.chat_requests[0]["options"]["num_predict"] == 20
    assert "2 records written (1 with an empty input, copied), 0 were there before" in capsys.readouterr().out
    records = [json.loads(r) for r in out.read_text().splitlines()]
    assert [(r["index"], r["input_simple"]) for r in records] == [(0, "Cat sleeps."), (1, "")]


def cpv_exit(argv):
    try:
        return cpv.main(argv)
    except SystemExit as exc:
        return exc.code


def test_errors_before_any_work(data_file, tmp_path, capsys, closed_port):  # noqa: F811 (fixture)
    out = tmp_path / "passive.jsonl"
    assert cpv.main(["--data", str(data_file), "--output", str(out), "--host", f"127.0.0.1:{closed_port}"]) == 1
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: No Ollama server answers at")
    assert not out.exists()
    with FakeOllama(models=["mistral:latest"]) as fake:
        assert cpv.main(["--data", str(data_file), "--output", str(out), "--host", fake.host]) == 1
    assert "does not have the model 'llama3'" in capsys.readouterr().err and fake.chat_requests == []
    cases = [
        (["--data", str(tmp_path / "none.json")], f"error: --data {tmp_path / 'none.json'} does not exist"),
        (["--data", str(data_file), "--output", str(tmp_path)], "is a folder"),
        (["--data", str(data_file), "--output", str(data_file)], "is the instruction data"),
        (["--data", str(data_file), "--prompt", "Rewrite this."], "must contain {text}"),
        (["--data", str(data_file), "--key", "output", "--new-key", "output"], "must differ from --key"),
        (["--data", str(data_file), "--key", "response"], "record 0 is missing the key 'response'"),
        (["--data", str(data_file), "--limit", "0"], "--limit"),
        (["--data", str(data_file), "--model", " "], "--model"),
    ]
    content = data_file.read_bytes()
    for argv, message in cases:
        assert cpv_exit([*argv, "--host", f"127.0.0.1:{closed_port}"]) == 2, argv
        lines = stderr_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, lines)
    assert data_file.read_bytes() == content


def test_output_of_another_kind_is_refused_and_left_as_it_was(data_file, tmp_path, capsys):
    out = tmp_path / "passive.jsonl"
    for content in (json.dumps(DATA).encode() + b"\n", b"notes, not json", (line(1, "x")[:-1].replace(
            '"index": 1', '"index": 0') + "\n").encode()):
        out.write_bytes(content)
        with FakeOllama(["A rewrite."] * 8) as fake:
            assert cpv.main(["--data", str(data_file), "--output", str(out), "--host", fake.host]) == 2
        lines = stderr_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith(f"error: --output {out}"), lines
        assert out.read_bytes() == content and fake.paths == []


def test_ctrl_c_keeps_what_is_written(data_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "passive.jsonl"
    real_query = cpv.query_model

    def query(*args, **kwargs):
        if len(fake.chat_requests) == 2:
            raise KeyboardInterrupt
        return real_query(*args, **kwargs)

    monkeypatch.setattr(cpv, "query_model", query)
    with FakeOllama(["The verb \"sleeps\" is identified.", "A primary color is represented by red."]) as fake:
        assert cpv.main(["--data", str(data_file), "--output", str(out), "--host", fake.host, "--no-progress"]) == 130
    assert stderr_lines(capsys.readouterr().err) == [
        f"interrupted: 2 new records (2 of 4 in all) are saved in {out}; run the same command again to continue"]
    assert out.read_text() == line(0, 'The verb "sleeps" is identified.') + line(1, "A primary color is represented by red.")


def test_ctrl_c_in_a_real_run(data_file, tmp_path):
    out = tmp_path / "passive.jsonl"
    out.write_text(line(0, 'The verb "sleeps" is identified.'))
    with FakeOllama(["A primary color is represented by red.", SILENT]) as fake:
        returncode, err = interrupt_real_run("ch07.dataset_utils.create_passive_voice_entries",
                                             ["--data", str(data_file), "--output", str(out)], fake, 2)
    assert returncode == 130, err
    assert stderr_lines(err) == [f"interrupted: 1 new records (2 of 4 in all) are saved in {out}; run the same "
                                 "command again to continue"]
    assert out.read_text() == line(0, 'The verb "sleeps" is identified.') + line(1, "A primary color is represented by red.")


def test_end_to_end_against_ch07_serve(data_file, tmp_path, capsys):
    """Chapter 7's own Ollama-API server with a tiny random model (in a thread): every record is either
    written with a checked rewrite or counted; the rerun asks again for exactly the records left out."""
    import torch

    from ch04.gpt import GPTModel
    from ch07.gpt_instruction_finetuning import save_finetuned_model
    from test_llmfs_serve import SFT_CFG, serving

    torch.manual_seed(123)
    model_path = save_finetuned_model(GPTModel(SFT_CFG), tmp_path / "tiny-sft.pth", style="alpaca")
    out = tmp_path / "passive.jsonl"
    with serving(model_path, max_new_tokens=12) as (host, app):
        worker = app.state.worker
        argv = ["--data", str(data_file), "--output", str(out), "--host", host, "--model", "tiny-sft",
                "--no-progress"]
        assert cpv.main(argv) == 0
        summary = capsys.readouterr().out.splitlines()[-1]
        written, invalid = int(summary.split()[0]), int(summary.split(", ")[2].split()[0])
        records = [json.loads(r) for r in out.read_text().splitlines()] if out.exists() else []
        assert written == len(records) and written + invalid == len(DATA)
        for r in records:
            assert cpv.check_rewrite(r["output_2"], DATA[r["index"]]["output"])[0] == r["output_2"]
        requests_before = worker.stats["requests"]
        assert requests_before >= len(DATA)
        assert cpv.main(argv) == 0
        if invalid:  # the server is deterministic: the same replies, refused again
            assert worker.stats["requests"] - requests_before == 2 * invalid
            assert f"0 records written, {written} were there before, {invalid} without" in capsys.readouterr().out
        else:
            assert "already holds all 4 records" in capsys.readouterr().out


# --- the notebook's stored outputs -------------------------------------------------------------------------

NOTEBOOK = REPO / "ch07" / "dataset_utils" / "dataset-utilities.ipynb"


def stored_output(source_line: str) -> str:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    found = [c for c in cells if c["cell_type"] == "code" and source_line in "".join(c["source"])]
    assert len(found) == 1, source_line
    return "".join("".join(o.get("text") or o.get("data", {}).get("text/plain", "")) for o in found[0]["outputs"])


def test_notebook_outputs_agree_with_the_module():
    """The pairs the notebook shows for the chapter's data (whole prompts) and the records it removes are what
    the module computes now; the planted pairs were found exactly by both methods."""
    import re

    from llmfs.download import get_data_file

    data = json.loads(get_data_file("instruction-data.json").read_text(encoding="utf-8"))
    text = stored_output("# counts per method")
    for method in fnd.METHODS:
        report = fnd.find_duplicates(data, ["instruction+input"], ["instruction+input"],
                                     fnd.DEFAULT_THRESHOLD[method], method)
        shown = re.search(rf"^{method}: .*instruction\+input=(\d+) removed=(\d+)$", text, re.MULTILINE)
        assert shown and (int(shown[1]), int(shown[2])) == (len(report.pairs["instruction+input"]),
                                                            len(report.removed)), (method, text)
    planted = stored_output("# the planted pairs")
    for method in fnd.METHODS:
        assert f"{method}: found 10 pairs, the planted ones exactly: True" in planted
    assert "the result is the data before planting: True" in stored_output("planted_file = OUTPUT_DIR")
    assert "the input is unchanged: True" in stored_output("planted_file = OUTPUT_DIR")
    first = stored_output("summary = cpv.create_entries(")
    written, invalid = (int(re.search(rf"'{k}': (\d+)", first)[1]) for k in ("written", "invalid"))
    assert first.count("left out:") == invalid and first.count("output_2:") == written
    rerun = stored_output("exit_code = cpv.main(")
    assert f"0 records written, {written} were there before, {invalid} without a usable reply" in rerun
