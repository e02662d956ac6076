"""Benchmark scorers: ScienceQA, VQA soft accuracy, POPE and the demo exact match.

Pure Python on purpose (no jax, no model): `python -m llava_jax.eval` calls these
on decoded text, and they must give the same numbers as the original LLaVA scripts so that
results can be compared with the papers. Each scorer names the original rule it follows and
says where it differs. Accuracies are fractions in [0, 1]; multiply by 100 for the tables.

Sources of the rules (haotian-liu/LLaVA at c121f04 unless noted):
  * ScienceQA prompt: `scripts/convert_sqa_to_llava.py` (+ `_base_prompt.py`), which writes
    `llava_test_CQM-A.json`, and `llava/eval/model_vqa_science.py --single-pred-prompt`.
  * ScienceQA scoring: `llava/eval/eval_science_qa.py`; the per-group table follows
    `tools/evaluate_acc.py` of lupantech/ScienceQA.
  * VQA: `EvalAIAnswerProcessor` and `TextVQAAccuracyEvaluator` in `llava/eval/m4c_evaluator.py`
    (the EvalAI / VQA answer normalisation), used by `eval_textvqa.py`.
  * POPE: `llava/eval/eval_pope.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llava_jax.data.conversation import IMAGE_TOKEN

# ---------------------------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------------------------

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
SCIENCEQA_SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
# The marker eval_science_qa.py gives an answer it cannot parse (and a missing prediction).
FAILED = "FAILED"

# eval_science_qa.py's pattern, kept as written: the final "." is an unescaped regex dot, so it
# matches any character after the letter ("The answer is B!" parses), but it needs *some*
# character there ("... The answer is B" at the very end of the text does not parse).
_SCIENCEQA_ANSWER_PATTERN = re.compile(r"The answer is ([A-Z]).")

# Column order of the ScienceQA paper's table (and LLaVA's Table 7).
SCIENCEQA_GROUPS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
_SUBJECT_GROUPS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_LOWER_GRADES = frozenset(f"grade{g}" for g in range(1, 7))
_UPPER_GRADES = frozenset(f"grade{g}" for g in range(7, 13))


def format_scienceqa_question(problem: Mapping[str, Any]) -> str:
    """The CQM text of one `problems.json` record, as in `llava_test_CQM-A.json`.

    `convert_sqa_to_llava.py convert_to_llava --prompt-format CQM-A` writes
    `"Context: {hint or N/A}\\nQuestion: {question}\\nOptions: (A) x (B) y"`: options on one
    line with parenthesised letters, no instruction. (It then adds `"\\n<image>"` for image
    questions; see `make_scienceqa_record`.) As in the converter, every double space is
    replaced by one space once (`str.replace`, so three spaces become two) and the text is
    stripped.
    """
    choices = list(problem["choices"])
    if len(choices) > len(SCIENCEQA_OPTIONS):
        raise ValueError(
            f"ScienceQA problem has {len(choices)} choices; at most {len(SCIENCEQA_OPTIONS)} "
            f"(letters {''.join(SCIENCEQA_OPTIONS)}) are supported."
        )
    context = (problem.get("hint") or "").strip() or "N/A"
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip(SCIENCEQA_OPTIONS, choices))
    text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {options}\n"
    return text.replace("  ", " ").strip()


def make_scienceqa_record(problem_id: str, problem: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of `llava_test_CQM-A.json` built from `problems.json`.

    For users who have ScienceQA but not LLaVA's converted question file. The `image` path is
    relative to the split's image folder (`images/test/{pid}/image.png`).
    """
    human = format_scienceqa_question(problem)
    record: dict[str, Any] = {"id": problem_id}
    if problem.get("image"):
        record["image"] = f"{problem_id}/{problem['image']}"
        human += f"\n{IMAGE_TOKEN}"
    answer_letter = SCIENCEQA_OPTIONS[problem["answer"]]
    record["conversations"] = [
        {"from": "human", "value": human},
        {"from": "gpt", "value": f"The answer is {answer_letter}."},
    ]
    return record


def build_scienceqa_prompt(record: Mapping[str, Any], single_pred_prompt: bool = True) -> str:
    """The user message LLaVA-1.5 sends for one `llava_test_CQM-A.json` entry.

    What the file holds vs what the eval adds (`model_vqa_science.py`): the file's human turn
    is the CQM text with `"\\n<image>"` at the *end* for image questions. The eval removes
    `<image>`, strips, puts `"<image>\\n"` at the *front* when the entry has an `image` key,
    and with `--single-pred-prompt` (used by `scripts/v1_5/eval/sqa.sh`) appends
    `"\\nAnswer with the option's letter from the given choices directly."`.

    The returned text is both the user turn (to be wrapped in the `vicuna_v1` template by
    the caller) and the `prompt` field of the answer record: the original writes the same
    string there, and `score_scienceqa` reads `<image>` from it for IMG-Accuracy.
    """
    try:
        human_turn = record["conversations"][0]["value"]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(
            "A ScienceQA question entry needs conversations[0].value (the llava_test_CQM-A.json "
            f"format); got keys {sorted(record) if isinstance(record, Mapping) else type(record)}."
        ) from error
    question = human_turn.replace(IMAGE_TOKEN, "").strip()
    if "image" in record:
        question = f"{IMAGE_TOKEN}\n{question}"
    if single_pred_prompt:
        question = f"{question}\n{SCIENCEQA_SINGLE_PRED_PROMPT}"
    return question


def parse_scienceqa_answer(text: str) -> str:
    """The option letter in a model answer, or `FAILED`, by eval_science_qa.py's three rules.

    1. the whole text is one of A-E (`"B"`; not `"b"`, not `"B."`);
    2. the text starts with a letter A-E followed by `". "` (`"B. polar bear"`);
    3. the pattern `The answer is ([A-Z]).` occurs exactly once (twice -> FAILED).
    Anything else is FAILED. The match is case-sensitive, as in the original.
    """
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    matches = _SCIENCEQA_ANSWER_PATTERN.findall(text)
    if len(matches) == 1:
        return matches[0]
    return FAILED


def scienceqa_choice_index(letter: str, num_choices: int) -> int:
    """Index of a parsed letter among a problem's choices; -1 for FAILED or a letter past the
    last choice (e.g. `"D"` for a two-choice question), which the original counts as wrong.

    The original's `get_pred_idx` has a `random.choice` fallback, but it sits after a
    `return -1` and never runs: unparseable answers are simply wrong, with no randomness.
    """
    valid = SCIENCEQA_OPTIONS[:num_choices]
    return valid.index(letter) if letter in valid else -1


def _scienceqa_groups(problem: Mapping[str, Any]) -> list[str]:
    """The table columns a problem counts in (ScienceQA's tools/evaluate_acc.py rules):
    subject; TXT if it has a hint, IMG if it has an image, NO if it has neither (TXT and IMG
    overlap); G1-6 or G7-12 by its `grade` field."""
    groups = []
    if problem.get("subject") in _SUBJECT_GROUPS:
        groups.append(_SUBJECT_GROUPS[problem["subject"]])
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    if has_text:
        groups.append("TXT")
    if has_image:
        groups.append("IMG")
    if not has_text and not has_image:
        groups.append("NO")
    if problem.get("grade") in _LOWER_GRADES:
        groups.append("G1-6")
    elif problem.get("grade") in _UPPER_GRADES:
        groups.append("G7-12")
    return groups


def score_scienceqa(
    answers: Iterable[Mapping[str, Any]],
    problems: Mapping[str, Mapping[str, Any]],
    split_ids: Sequence[str],
) -> dict[str, Any]:
    """Score LLaVA answer records on a ScienceQA split, as eval_science_qa.py does.

    Args:
      answers: the answers JSONL, one `{question_id, prompt, text, ...}` per question (the
        `model_vqa_science.py` output format). A later record for the same id replaces an
        earlier one; records for ids outside the split are ignored; ids are compared as
        strings.
      problems: ScienceQA `problems.json` (`{pid: {question, choices, answer, hint, image,
        subject, grade, ...}}`).
      split_ids: `pid_splits.json[split]`, e.g. the 4241 test ids.

    Returns a dict with
      accuracy, num_correct, num_examples: over the split; a missing or unparseable answer is
        wrong (never a random guess, see `scienceqa_choice_index`).
      img_accuracy, num_img_examples: LLaVA's "IMG-Accuracy", over answers whose `prompt`
        contains `<image>`. A missing answer has no prompt and is left out of it, as in the
        original. None when there are none.
      num_failed (unparseable, missing included), num_missing.
      groups: {NAT, SOC, LAN, TXT, IMG, NO, G1-6, G7-12: accuracy or None if empty}, the
        paper's breakdown from the problems.json fields. Its IMG column uses the problem's
        `image` field, so it can differ from img_accuracy when answers are missing.
      group_counts: the number of problems in each group.
      choice_indices: {pid: predicted index or -1}, the `results` map of the original's
        `--output-result` file.
    """
    answers_by_id = {str(answer["question_id"]): answer for answer in answers}
    # dict.fromkeys: the original builds a dict from the split ids, so a repeated id counts once.
    split_ids = list(dict.fromkeys(str(pid) for pid in split_ids))
    unknown = [pid for pid in split_ids if pid not in problems]
    if unknown:
        raise ValueError(
            f"{len(unknown)} split ids are not in problems.json (first: {unknown[0]!r}); "
            "pass the problems.json and pid_splits.json of the same ScienceQA release."
        )

    num_correct = num_failed = num_missing = 0
    img_total = img_correct = 0
    group_total = dict.fromkeys(SCIENCEQA_GROUPS, 0)
    group_correct = dict.fromkeys(SCIENCEQA_GROUPS, 0)
    choice_indices: dict[str, int] = {}
    for pid in split_ids:
        problem = problems[pid]
        answer = answers_by_id.get(pid)
        if answer is None:
            num_missing += 1
            text, prompt = FAILED, "Unknown"  # what the original substitutes
        else:
            text, prompt = answer["text"], answer.get("prompt", "")
        letter = parse_scienceqa_answer(text)
        num_failed += letter == FAILED
        index = scienceqa_choice_index(letter, len(problem["choices"]))
        choice_indices[pid] = index
        correct = index == problem["answer"]
        num_correct += correct
        if IMAGE_TOKEN in prompt:
            img_total += 1
            img_correct += correct
        for group in _scienceqa_groups(problem):
            group_total[group] += 1
            group_correct[group] += correct

    num_examples = len(split_ids)
    if num_examples == 0:
        raise ValueError("The ScienceQA split is empty: nothing to score.")
    return {
        "accuracy": num_correct / num_examples,
        "num_correct": num_correct,
        "num_examples": num_examples,
        "img_accuracy": img_correct / img_total if img_total else None,
        "num_img_examples": img_total,
        "num_failed": num_failed,
        "num_missing": num_missing,
        "groups": {
            group: group_correct[group] / group_total[group] if group_total[group] else None
            for group in SCIENCEQA_GROUPS
        },
        "group_counts": group_total,
        "choice_indices": choice_indices,
    }


def format_scienceqa_table(result: Mapping[str, Any]) -> str:
    """Two lines, header and percentages, in the paper's column order plus Avg."""
    header = [*SCIENCEQA_GROUPS, "Avg"]
    values = [result["groups"][group] for group in SCIENCEQA_GROUPS] + [result["accuracy"]]
    cells = ["-" if value is None else f"{100 * value:.2f}" for value in values]
    return "\t".join(header) + "\n" + "\t".join(cells)


# ---------------------------------------------------------------------------------------------
# VQA (VQAv2 / TextVQA / VizWiz style: 10 human answers per question)
# ---------------------------------------------------------------------------------------------

# Contractions of the EvalAI/VQA answer processor, written as {canonical: variants}; a variant
# word is replaced by its canonical form. Entries with upper-case keys ("Im", "Ive", "Id've",
# "I'dve") are left out because answers are lower-cased before this step, so they can never
# match. "somebody'd" -> "somebodyd" is reversed in the official table; kept as it is.
_CONTRACTION_VARIANTS = {
    "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve",
    "couldn't": "couldnt", "couldn't've": "couldn'tve couldnt've", "didn't": "didnt",
    "doesn't": "doesnt", "don't": "dont", "hadn't": "hadnt", "hadn't've": "hadnt've hadn'tve",
    "hasn't": "hasnt", "haven't": "havent", "he'd": "hed", "he'd've": "hed've he'dve",
    "he's": "hes", "how'd": "howd", "how'll": "howll", "how's": "hows", "isn't": "isnt",
    "it'd": "itd", "it'd've": "itd've it'dve", "it'll": "itll", "let's": "let's",
    "ma'am": "maam", "mightn't": "mightnt", "mightn't've": "mightnt've mightn'tve",
    "might've": "mightve", "mustn't": "mustnt", "must've": "mustve", "needn't": "neednt",
    "not've": "notve", "o'clock": "oclock", "oughtn't": "oughtnt",
    "'ow's'at": "ow's'at 'ows'at 'ow'sat", "shan't": "shant", "she'd've": "shed've she'dve",
    "she's": "she's", "should've": "shouldve", "shouldn't": "shouldnt",
    "shouldn't've": "shouldnt've shouldn'tve", "somebodyd": "somebody'd",
    "somebody'd've": "somebodyd've somebody'dve", "somebody'll": "somebodyll",
    "somebody's": "somebodys", "someone'd": "someoned", "someone'd've": "someoned've someone'dve",
    "someone'll": "someonell", "someone's": "someones", "something'd": "somethingd",
    "something'd've": "somethingd've something'dve", "something'll": "somethingll",
    "that's": "thats", "there'd": "thered", "there'd've": "thered've there'dve",
    "there're": "therere", "there's": "theres", "they'd": "theyd",
    "they'd've": "theyd've they'dve", "they'll": "theyll", "they're": "theyre",
    "they've": "theyve", "'twas": "twas", "wasn't": "wasnt", "we'd've": "wed've we'dve",
    "we've": "weve", "weren't": "werent", "what'll": "whatll", "what're": "whatre",
    "what's": "whats", "what've": "whatve", "when's": "whens", "where'd": "whered",
    "where's": "wheres", "where've": "whereve", "who'd": "whod", "who'd've": "whod've who'dve",
    "who'll": "wholl", "who's": "whos", "who've": "whove", "why'll": "whyll",
    "why're": "whyre", "why's": "whys", "won't": "wont", "would've": "wouldve",
    "wouldn't": "wouldnt", "wouldn't've": "wouldnt've wouldn'tve", "y'all": "yall",
    "y'all'll": "yall'll y'allll", "y'all'd've": "yall'd've y'alld've y'all'dve",
    "you'd": "youd", "you'd've": "youd've you'dve", "you'll": "youll", "you're": "youre",
    "you've": "youve",
}
_CONTRACTIONS = {
    variant: canonical
    for canonical, variants in _CONTRACTION_VARIANTS.items()
    for variant in variants.split()
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# "," and "?" are in the official list too, but they are already deleted before this step.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# The official pattern is r"(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a look-ahead (a typo for
# a look-behind) that always holds in front of a ".", so it reduces to this.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (= 32) in the `count` position of `sub`, so at most the
# first 32 such periods are removed. Reproduced so that scores match exactly.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's VQA answer normalisation (m4c_evaluator.EvalAIAnswerProcessor), step by step.

    1. lower-case; delete "," and "?"; split off "'s" as its own word; strip; newlines and
       tabs become spaces.
    2. punctuation: each of `;/[]"{}()=+\\_-><@`!` is deleted where it touches a space
       somewhere in the answer, otherwise replaced by a space ("x-ray" -> "x ray",
       "a - b" -> "a  b"). (The official digit-comma rule that also deletes can never fire
       here, because step 1 already removed every comma.)
    3. a "." not followed by a digit is deleted ("3.5" stays), the first 32 only.
    4. per word: number words zero..ten (and "none") become digits, the articles a/an/the
       are dropped, and contractions written without apostrophe get it back ("dont" ->
       "don't"); words are re-joined with single spaces.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()

    original = text
    for mark in _PUNCTUATION:
        # The test looks at the text as it was before any mark was handled, as the original.
        if mark + " " in original or " " + mark in original:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=_PERIOD_STRIP_COUNT)

    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one answer against the human answers.

    Variant implemented: m4c_evaluator's TextVQAAccuracyEvaluator, which LLaVA uses for
    TextVQA. Prediction and every human answer are normalised with `normalize_vqa_answer`;
    for each human answer left out in turn (the 10-choose-9 subsets for the usual 10
    answers), the score is min(#remaining humans who gave the prediction / 3, 1); the result
    is the mean over the subsets. The official VQA API (vqaEval.py) differs only in rare
    cases: it normalises the human answers only when they disagree, and then only their
    punctuation. VQAv2 and VizWiz test scores come from the EvalAI server, not from here.
    """
    if isinstance(gt_answers, str) or len(gt_answers) < 2:
        raise ValueError(
            "vqa_accuracy needs a list of at least 2 human answers (VQA datasets have 10); "
            f"got {gt_answers!r}. For single-reference data use exact_match_accuracy."
        )
    predicted = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(answer) for answer in gt_answers]
    total_matches = humans.count(predicted)
    subset_scores = []
    for left_out in humans:
        matches = total_matches - (left_out == predicted)
        subset_scores.append(min(1.0, matches / 3))
    return sum(subset_scores) / len(subset_scores)


def load_vqa_ground_truth(data: Mapping[str, Any]) -> dict[str, list[str]]:
    """{question_id (as str): human answers} from a parsed annotation file.

    Accepts TextVQA (`{"data": [{"question_id", "answers": [str, ...]}]}`) and VQAv2
    (`{"annotations": [{"question_id", "answers": [{"answer": str, ...}]}]}`).
    """
    if "data" in data:
        entries, from_dicts = data["data"], False
    elif "annotations" in data:
        entries, from_dicts = data["annotations"], True
    else:
        raise ValueError(
            "Unknown VQA annotation format: expected a top-level 'data' list (TextVQA) or "
            f"'annotations' list (VQAv2); got keys {sorted(data)}."
        )
    return {
        str(entry["question_id"]): [a["answer"] if from_dicts else a for a in entry["answers"]]
        for entry in entries
    }


def score_vqa(
    predictions: Mapping[Any, str], ground_truth: Mapping[Any, Sequence[str]]
) -> dict[str, Any]:
    """Mean VQA soft accuracy over every question in `ground_truth`.

    Args:
      predictions: {question_id: answer text}.
      ground_truth: {question_id: human answers}, e.g. from `load_vqa_ground_truth`.
    Ids are compared as strings. A question without a prediction scores 0 and is counted in
    num_missing (LLaVA's script averages over the predictions it has instead; the two agree
    on a complete run). A prediction for an unknown id is an error: the files do not match.

    Returns {accuracy, num_examples, num_missing, scores: {question_id: score}}.
    """
    truth = {str(qid): answers for qid, answers in ground_truth.items()}
    answers = {str(qid): text for qid, text in predictions.items()}
    unknown = sorted(set(answers) - set(truth))
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions have question ids missing from the ground truth "
            f"(first: {unknown[0]!r}); check that both files are for the same split."
        )
    if not truth:
        raise ValueError("The VQA ground truth is empty: nothing to score.")
    scores = {
        qid: vqa_accuracy(answers[qid], humans) if qid in answers else 0.0
        for qid, humans in truth.items()
    }
    return {
        "accuracy": sum(scores.values()) / len(scores),
        "num_examples": len(scores),
        "num_missing": len(truth) - len(answers),
        "scores": scores,
    }


# ---------------------------------------------------------------------------------------------
# POPE (object hallucination, yes/no questions)
# ---------------------------------------------------------------------------------------------

_POPE_NEGATIONS = frozenset({"No", "not", "no"})


def parse_pope_answer(text: str) -> str:
    """"yes" or "no" from a model answer, by eval_pope.py's rule.

    Keep the text before the first "." (the first sentence), delete commas, split on single
    spaces, and answer "no" iff one of the words is exactly "No", "not" or "no"; anything
    else is "yes". Kept as in the original, including its blind spots: "NO", "Not really",
    "isn't", "No!" and "No\\nThere..." all read as "yes".
    """
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in _POPE_NEGATIONS for word in words) else "yes"


def score_pope(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """POPE metrics with "yes" as the positive class, as eval_pope.py prints them.

    Args:
      predictions: model answers (raw text, parsed with `parse_pope_answer`), in label order.
      labels: "yes"/"no" from the annotation file (`coco_pope_{category}.json` `label`).

    Returns {accuracy, precision, recall, f1, yes_ratio, tp, fp, tn, fn, num_examples}.
    Where the original divides by zero (no "yes" predictions, or precision + recall = 0) the
    metric is 0.0 instead of an exception. Unlike the original, which pairs the two lists with
    `zip` and maps every label other than "no" to yes, lists of different lengths and labels
    other than "yes"/"no" are errors.
    """
    if len(predictions) != len(labels):
        raise ValueError(
            f"POPE got {len(predictions)} predictions for {len(labels)} labels; each label "
            "needs the answer to the same question, in the same order."
        )
    if not labels:
        raise ValueError("POPE got no labels: nothing to score.")
    bad = sorted({label for label in labels if label not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no'; found {bad}.")

    parsed = [parse_pope_answer(text) for text in predictions]
    tp = sum(p == "yes" and y == "yes" for p, y in zip(parsed, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(parsed, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(parsed, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(parsed, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": parsed.count("yes") / len(parsed),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "num_examples": len(labels),
    }


def score_pope_by_category(
    answers: Iterable[Mapping[str, Any]],
    questions: Iterable[Mapping[str, Any]],
    labels_by_category: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, Any]]:
    """POPE metrics per category (random / popular / adversarial), as eval_pope.py's main.

    Args:
      answers: answer records `{question_id, text, ...}` in answer-file order.
      questions: `llava_pope_test.jsonl` records `{question_id, category, ...}`.
      labels_by_category: {category: labels of `coco_pope_{category}.json`, in file order}.
    The answers of each category, in answer-file order, are paired by position with that
    category's labels: the original's rule, which relies on the answer file keeping the
    question file's order. Returns {category: score_pope result}.
    """
    category_of = {question["question_id"]: question["category"] for question in questions}
    answers = list(answers)
    missing = [a["question_id"] for a in answers if a["question_id"] not in category_of]
    if missing:
        raise ValueError(
            f"{len(missing)} POPE answers have question ids not in the question file "
            f"(first: {missing[0]!r})."
        )
    results = {}
    for category, labels in labels_by_category.items():
        texts = [a["text"] for a in answers if category_of[a["question_id"]] == category]
        try:
            results[category] = score_pope(texts, labels)
        except ValueError as error:
            raise ValueError(f"POPE category {category!r}: {error}") from error
    return results


# ---------------------------------------------------------------------------------------------
# Demo exact match (single reference answers)
# ---------------------------------------------------------------------------------------------


def normalize_short_answer(text: str) -> str:
    """Lower-case, strip whitespace and trailing periods: "Red. " and "red" compare equal."""
    return text.strip().lower().rstrip(".").rstrip()


def exact_match_accuracy(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Share of predictions equal to their reference after `normalize_short_answer`.

    Returns {accuracy, num_examples, num_correct}.
    """
    if len(preds) != len(refs):
        raise ValueError(f"Got {len(preds)} predictions for {len(refs)} references.")
    if not refs:
        raise ValueError("No references: nothing to score.")
    num_correct = sum(
        normalize_short_answer(pred) == normalize_short_answer(ref)
        for pred, ref in zip(preds, refs)
    )
    return {
        "accuracy": num_correct / len(refs),
        "num_examples": len(refs),
        "num_correct": num_correct,
    }


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (answer files, POPE labels); blank lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from error
    return records
