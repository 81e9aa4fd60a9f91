"""bench/vllm_report.py's teacher-forced verdict: vLLM fed transformers' tokens must score each of them its best
(an exact tie with another token counts, and is said); anything else, or no scores, fails the prompt."""

from __future__ import annotations

from bench.vllm_report import forced_agreement


def _row(logprob: float, best: float, best_other: float) -> dict:
    return {"logprob": logprob, "best": best, "best_other": best_other}


def test_every_token_vllms_best_passes_and_ties_are_counted():
    rows = [_row(-1.0, -1.0, -2.0), _row(-1.27, -1.27, -1.27), _row(-0.5, -0.5, -0.9)]
    assert forced_agreement(rows) == ("3/3 (1 exact tie)", True)
    assert forced_agreement(rows[:1]) == ("1/1", True)


def test_a_token_below_vllms_best_fails():
    rows = [_row(-1.0, -1.0, -2.0), _row(-1.5, -1.2, -1.2)]
    assert forced_agreement(rows) == ("1/2", False)


def test_unscored_prompts_fail_with_the_reason():
    assert forced_agreement("ValueError: no logprobs") == ("not scored (ValueError: no logprobs)", False)
    assert forced_agreement(None) == ("not scored", False)
