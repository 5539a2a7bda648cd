"""Pair construction: best-vs-worst and margin threshold, counted by hand; failures never pair."""

import pytest

from alignkit.pairs import build_pairs, select_pairs
from alignkit.records import Prompt, Sample, Verdict, to_dict


def scored(scores, status=None):
    out = []
    for i, s in enumerate(scores):
        sid = f"p#s{i}"
        ok = status is None or status[i] == "ok"
        out.append((Sample(sid, "p", f"text {i}", "", f"a{i}", True, 3, "stop"),
                    Verdict(sid, "p", "ref", "ok" if ok else "failed", s if ok else None, {}, f"why {i}",
                            None if ok else "bad json")))
    return out


def test_best_worst_picks_max_and_min():
    assert select_pairs(scored([0.5, 0.9, 0.1, 0.9]), "best_worst", 0.0) == [(1, 2)]


def test_best_worst_skips_ties_and_small_margins():
    assert select_pairs(scored([0.5, 0.5]), "best_worst", 0.0) == []
    assert select_pairs(scored([0.5, 0.6]), "best_worst", 0.2) == []


def test_threshold_counts_all_ordered_pairs_reaching_margin():
    # scores 1.0, 0.6, 0.5, 0.0 with margin >= 0.4: (0,1)(0,2)(0,3)(1,3)(2,3) -> 5 by hand
    pairs = select_pairs(scored([1.0, 0.6, 0.5, 0.0]), "threshold", 0.4)
    assert sorted(pairs) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown pairs strategy"):
        select_pairs(scored([1, 0]), "random", 0)


def test_build_pairs_trl_format_and_failed_verdicts_excluded(tmp_path):
    prompt = Prompt("p", "Describe the image.", images=["/img/a.png"], task="describe")
    items = scored([0.2, 0.9, 0.0, 0.7], status=["ok", "ok", "failed", "ok"])
    samples, verdicts = [s for s, _ in items], [v for _, v in items]
    pairs, summary = build_pairs([prompt], samples, verdicts, {"p": "Describe the image. Think."})
    assert summary["num_pairs"] == 1 and summary["skipped"] == {"failed verdicts": 1}
    pair = to_dict(pairs[0])
    assert pair["chosen_id"] == "p#s1" and pair["rejected_id"] == "p#s0"
    assert pair["prompt"] == [{"role": "user", "content": [{"type": "image"},
                                                           {"type": "text", "text": "Describe the image. Think."}]}]
    assert pair["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "text 1"}]}]
    assert pair["images"] == ["/img/a.png"]
    assert pair["margin"] == pytest.approx(0.7)
    assert (pair["chosen_score"], pair["rejected_score"]) == (0.9, 0.2)
    assert (pair["chosen_rationale"], pair["rejected_rationale"]) == ("why 1", "why 0")


def test_sample_for_unknown_prompt_is_an_error():
    items = scored([1.0, 0.0])
    with pytest.raises(ValueError, match="unknown prompt_id"):
        build_pairs([Prompt("other", "q")], [s for s, _ in items], [v for _, v in items], {"other": "q"})
