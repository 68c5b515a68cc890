"""`hf-fam eval passkey|perplexity` end to end on a tiny converted folder, the files they write, the comparison with
the base model and BSWA, error paths, results reaching the model card, and interop with transformers' pipeline and
lm-evaluation-harness."""

import csv
import json
import math
import sys

import pytest
import torch
from conftest import assert_logits_close, build_tiny_tokenizer, tiny_base
from huggingface_hub import ModelCard
from test_cli import hf_fam_cli, leftovers

import hf_fam
from hf_fam import evaluation
from hf_fam.cli import main
from hf_fam.hub import write_model_card
from hf_fam.tasks import passkey_example


FAM_SETTINGS = dict(block_size=16, memory_segments=1, fam_length=4)


def run_cli(capsys, *args):
    """`hf-fam ARGS` in this process (the console script itself is run once per command, below): (exit code, out, err)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_converted(folder, **settings):
    fam = hf_fam.convert_to_fam(tiny_base("llama"), **{**FAM_SETTINGS, **settings})
    fam.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    write_model_card(folder, repo_id="someone/tiny-fam")
    return folder


@pytest.fixture(scope="module")
def fam_dir(tmp_path_factory):
    return save_converted(tmp_path_factory.mktemp("tiny_fam") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    sentences = ["A story about a cat and a dog who walk home together at night.", "The grass is green.", "The sky is blue."]
    path.write_text(" ".join(sentences[i % 3] for i in range(60)))
    return path


def test_parse_lengths_and_depths():
    assert evaluation.parse_lengths("1k, 2k,512,0.5k") == [1024, 2048, 512, 512]
    assert evaluation.parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    with pytest.raises(evaluation.EvaluationError, match="'abc'"):
        evaluation.parse_lengths("1k,abc")
    with pytest.raises(evaluation.EvaluationError, match=r"\[0, 1\]"):
        evaluation.parse_depths("0,1.5")


@pytest.mark.parametrize("task", ["passkey", "perplexity"])
def test_eval_help_explains_every_option(task, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["eval", task, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    options = ["--compare", "--output", "--dtype", "--no-progress", "--debug"]
    options += ["--lengths", "--depths", "--trials", "--key-digits", "--seed"] if task == "passkey" else ["--text", "--max-tokens", "--bucket"]
    for option in options:
        assert option in out, option
    assert "(default: None)" not in out and "(default: False)" not in out


def test_streamed_passkey_scoring_equals_one_forward_pass(fam_dir):
    fam, tokenizer = evaluation.load_fam(fam_dir)
    example = passkey_example(tokenizer, __import__("random").Random(0), 100, depth=0.5, key_digits=3)
    n = len(example.answer_ids)
    with torch.no_grad():
        expected = fam(torch.tensor([example.input_ids])).logits[:, -n - 1 : -1]
        hidden = evaluation._tail_hidden_states(fam, example.input_ids, n + 1, chunk_size=7)
        actual = fam.logits_from_hidden_states(hidden[:, :-1])
    assert_logits_close(actual, expected, rtol=1e-5)
    variant = evaluation.Variant("FAM", fam, True)
    assert evaluation.score_passkey(variant, example, 7) == hf_fam.tasks.answer_is_correct(fam, example)


def test_eval_passkey_compare_writes_table_files_and_card(fam_dir, tmp_path):
    out = tmp_path / "results"
    result = hf_fam_cli("eval", "passkey", fam_dir, "--lengths", "32,64", "--depths", "0,1", "--trials", 2, "--key-digits", 2, "--compare", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    header = result.stdout.splitlines()[0]
    for name in ("base d=0", "BSWA d=1", "FAM mean"):
        assert name in header
    assert len(result.stdout.strip().splitlines()) == 3  # header + two lengths
    document = json.loads((out / "passkey.json").read_text())
    assert document["models"] == ["base", "BSWA", "FAM"]
    assert len(document["results"]) == 2 * 2 * 3
    assert all(0 <= r["accuracy"] <= 1 and r["trials"] == 2 for r in document["results"])
    with open(out / "passkey.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    assert (out / "passkey_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "eval_results.json").read_text())
    assert {(r["model"], r["metric"]) for r in rows} == {
        (m, f"accuracy, {n} filler tokens") for m in ("base", "BSWA", "FAM") for n in (32, 64)
    }
    assert all(r.get("compared") for r in rows if r["model"] != "FAM")
    assert not leftovers(out)

    # the rows reach the card (what convert, push and merge write), with model-index metadata for the FAM rows only
    (fam_dir / "eval_results.json").write_text((out / "eval_results.json").read_text())
    try:
        card = ModelCard.load(write_model_card(fam_dir, repo_id="someone/tiny-fam"))
    finally:
        (fam_dir / "eval_results.json").unlink()
    assert "| passkey retrieval | accuracy, 32 filler tokens |" in card.text
    assert "base model, full attention" in card.text
    index = card.data.eval_results
    assert card.data.model_name == "tiny-fam"
    assert sorted(r.metric_name for r in index) == ["accuracy, 32 filler tokens", "accuracy, 64 filler tokens"]
    assert {r.metric_type for r in index} == {"accuracy"}


def test_eval_into_the_model_folder_updates_its_card(tmp_path):
    """Results written into the model folder reach its card at once (the card said "No evaluation results" until a
    push regenerated it); a card hf-fam did not write is left alone."""
    model = save_converted(tmp_path / "model")
    assert "No evaluation results" in (model / "README.md").read_text()
    result = hf_fam_cli("eval", "passkey", model, "--lengths", "32", "--depths", "0", "--trials", 1, "--key-digits", 2, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "its model card (README.md) now shows them" in result.stderr
    card = ModelCard.load(model / "README.md")
    assert "| passkey retrieval | accuracy, 32 filler tokens |" in card.text and "No evaluation results" not in card.text
    assert 'from_pretrained("someone/tiny-fam"' in card.text  # the card keeps its Hub id
    assert not leftovers(model)

    (model / "README.md").write_text("# my own card\n")
    result = hf_fam_cli("eval", "passkey", model, "--lengths", "32", "--depths", "0", "--trials", 1, "--key-digits", 2, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model / "README.md").read_text() == "# my own card\n" and "model card" not in result.stderr


def test_eval_perplexity_compare_bswa_limit_equals_base(tmp_path, text_file, capsys):
    # (M+1)B = 256 >= the 200 tokens scored and F = 0: BSWA is exactly full attention
    model = save_converted(tmp_path / "bswa", block_size=128, memory_segments=1, fam_length=0)
    code, out, err = run_cli(capsys, "eval", "perplexity", model, "--text", text_file, "--max-tokens", 200, "--bucket", 64, "--compare", "--no-progress")
    assert code == 0, err[-3000:]
    document = json.loads((model / "perplexity.json").read_text())
    assert document["models"] == ["base", "BSWA"]
    overall = document["overall"]
    assert math.isclose(overall["base"]["perplexity"], overall["BSWA"]["perplexity"], rel_tol=1e-5)
    buckets = [(r["bucket_start"], r["bucket_end"]) for r in document["results"] if r["model"] == "base"]
    assert buckets == [(1, 64), (65, 128), (129, 192), (193, 199)]
    assert "all" in out.splitlines()[-1]


def test_eval_perplexity_fam_streams_like_one_pass_and_writes_results(fam_dir, tmp_path, text_file):
    out = tmp_path / "ppl"
    result = hf_fam_cli("eval", "perplexity", fam_dir, "--text", text_file, "--max-tokens", 150, "--bucket", 50, "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "perplexity.json").read_text())
    fam, tokenizer = evaluation.load_fam(fam_dir)
    ids = tokenizer(text_file.read_text())["input_ids"][:150]
    with torch.no_grad():
        logits = fam(torch.tensor([ids])).logits[0, :-1].float()
    nll = -(logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])).mean().item()
    assert math.isclose(document["overall"]["FAM"]["nll"], nll, rel_tol=1e-5)
    assert (out / "perplexity_curve.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "eval_results.json").read_text())
    assert [r["metric"] for r in rows] == ["perplexity, tokens 1-149", "perplexity, tokens 101-149"]


def test_passkey_computes_the_initial_state_once_with_the_scores_of_every_example(fam_dir, tmp_path, monkeypatch):
    """Every example starts a new stream of the same weights: the evaluation reuses S0 (one FAM prompt pass for the
    whole run, `reuse_initial_state`) and scores every example as a model computing S0 per example does."""
    from hf_fam.modeling_fam import FamPrompt

    passes = []
    prompt_forward = FamPrompt.forward
    monkeypatch.setattr(FamPrompt, "forward", lambda self, *args: passes.append(1) or prompt_forward(self, *args))
    document = evaluation.run_passkey(
        fam_dir, lengths=[16, 24], depths=[0.0, 1.0], trials=3, key_digits=2, output=tmp_path, show_progress=False,
        log=lambda message: None,
    )
    assert len(passes) == 1
    fam, tokenizer = evaluation.load_fam(fam_dir)
    variant = evaluation.Variant("FAM", fam, True)
    for result in document["results"]:
        examples = evaluation.passkey_examples(tokenizer, result["filler_tokens"], result["depth"], 3, 0, 2)
        chunk = fam.config.block_size * (fam.config.memory_segments + 1)  # the evaluation's default
        scores = [evaluation.score_passkey(variant, example, chunk) for example in examples]
        assert result["accuracy"] == sum(hit for hit, _ in scores) / 3
        assert result["token_accuracy"] == pytest.approx(sum(tokens for _, tokens in scores) / 3, abs=1e-12)
    assert len(passes) == 1 + 12  # computed per example outside the evaluation


def test_interrupted_passkey_keeps_the_finished_lengths(fam_dir, tmp_path):
    def interrupt_after_first_length(message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluation.run_passkey(
            fam_dir, lengths=[16, 32], depths=[0.5], trials=1, key_digits=2, output=tmp_path, show_progress=False,
            log=interrupt_after_first_length,
        )
    document = json.loads((tmp_path / "passkey.json").read_text())
    assert {r["filler_tokens"] for r in document["results"]} == {16}
    assert [r["metric"] for r in json.loads((tmp_path / "eval_results.json").read_text())] == ["accuracy, 16 filler tokens"]
    assert not leftovers(tmp_path)


def test_interrupted_perplexity_keeps_the_finished_buckets(fam_dir, tmp_path, text_file, monkeypatch):
    import hf_fam.streaming

    real = hf_fam.streaming.stream_log_likelihood

    def interrupted_after_three_chunks(*args, **kwargs):
        for i, values in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield values

    monkeypatch.setattr(hf_fam.streaming, "stream_log_likelihood", interrupted_after_three_chunks)
    with pytest.raises(KeyboardInterrupt):
        evaluation.run_perplexity(
            fam_dir, text_file=text_file, max_tokens=120, bucket=20, output=tmp_path, chunk_size=16, show_progress=False
        )
    document = json.loads((tmp_path / "perplexity.json").read_text())  # 47 tokens scored: buckets 1-20 and 21-40
    assert [(r["bucket_start"], r["bucket_end"]) for r in document["results"]] == [(1, 20), (21, 40)]
    assert not leftovers(tmp_path)


def test_eval_bad_inputs_are_one_paragraph_and_write_nothing(fam_dir, tmp_path, text_file, capsys):
    out = tmp_path / "out"
    cases = [
        (("passkey", fam_dir, "--lengths", "1k,lots"), "'lots'"),
        (("passkey", fam_dir, "--depths", "0,2"), "--depths"),
        (("passkey", fam_dir, "--trials", 0), "--trials must be at least 1, got 0"),
        (("perplexity", fam_dir, "--text", tmp_path / "missing.txt"), "missing.txt does not exist"),
        (("perplexity", fam_dir, "--text", text_file, "--bucket", 0), "--bucket"),
        (("passkey", tmp_path / "nowhere"), "nowhere does not exist"),
        # a folder as --text was reported as missing; --key-digits 0 failed inside the task with "digits must be..."
        (("perplexity", fam_dir, "--text", tmp_path), "is not a file (a folder?)"),
        (("passkey", fam_dir, "--key-digits", 0), "--key-digits must be at least 1, got 0"),
        (("passkey", fam_dir, "--lengths", "1k,-5"), "--lengths values must be token counts >= 0"),
    ]
    base = tmp_path / "base"
    tiny_base("llama").save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    cases.append((("passkey", base), "not a TransformerFAM checkpoint; convert it first with `hf-fam convert`"))
    capsys.readouterr()
    for args, fragment in cases:
        code, _, err = run_cli(capsys, "eval", *args, "--output", out)
        assert code == 1 and fragment in err and "Traceback" not in err, (args, err)
        lines = err.strip().splitlines()
        assert lines[-2].startswith("hf-fam eval: error: ") and lines[-1] == "(run with --debug to see the traceback)", err
    assert not out.exists() or not any(out.iterdir())
    assert not (fam_dir / "eval_results.json").exists()


def test_eval_without_matplotlib_stops_before_running_a_model(fam_dir, tmp_path, text_file, capsys, monkeypatch):
    """The plot is written after the first length or bucket: without matplotlib the run failed only then."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "out"
    for args in (("passkey", fam_dir, "--lengths", "32"), ("perplexity", fam_dir, "--text", text_file)):
        code, _, err = run_cli(capsys, "eval", *args, "--output", out)
        assert code == 1 and "pip install matplotlib" in err, err
    assert not out.exists()


def test_fam_checkpoint_runs_in_the_text_generation_pipeline(fam_dir):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(fam_dir), trust_remote_code=True, device="cpu")
    output = generator("The grass is green. The sky is", max_new_tokens=5, do_sample=False)
    assert output[0]["generated_text"].startswith("The grass is green. The sky is")
    fam, tokenizer = evaluation.load_fam(fam_dir)
    ids = tokenizer("The grass is green. The sky is", return_tensors="pt")
    expected = fam.generate(**ids, max_new_tokens=5, do_sample=False)
    assert output[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)


LM_EVAL_CHOICE_TASK = """task: fam_tiny_passkey_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
LM_EVAL_ROLLING_TASK = """task: fam_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def test_lm_eval_harness_local_task_bswa_limit_scores_equal_the_base_model(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tokenizer = build_tiny_tokenizer()
    tiny_base("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    # (M+1)B = 128 >= every request's length and F = 0: the FAM checkpoint is full attention
    save_converted(tmp_path / "fam", block_size=64, memory_segments=1, fam_length=0)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [
        {
            "question": f"The pass key is {k}. Remember it. What is the pass key? The pass key is",
            "choices": [f" {k}", f" {k + 1}", f" {k + 2}"],
            "answer": 0,
            "text": f"The grass is green. The sky is blue. The pass key is {k}.",
        }
        for k in range(10, 16)
    ]
    (tasks / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tasks / "choice.yaml").write_text(LM_EVAL_CHOICE_TASK.format(data=tasks / "docs.jsonl"))
    (tasks / "rolling.yaml").write_text(LM_EVAL_ROLLING_TASK.format(data=tasks / "docs.jsonl"))
    scores = {}
    for name in ("base", "fam"):
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={tmp_path / name},trust_remote_code=True,dtype=float32",
            tasks=["fam_tiny_passkey_choice", "fam_tiny_rolling"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            device="cpu",
            batch_size=2,
        )["results"]
        scores[name] = (results["fam_tiny_passkey_choice"]["acc,none"], results["fam_tiny_rolling"]["word_perplexity,none"])
    assert scores["fam"][0] == scores["base"][0]
    assert math.isclose(scores["fam"][1], scores["base"][1], rel_tol=1e-5)
    assert math.isfinite(scores["fam"][1])
