"""A flipped finding chip edits the draft the radiologist had (finding_chips.follow_chips):
the clauses of the flipped chips change, every other clause stays word for word, and the
result states what the chips say, as the rule-based finding reader reads it."""
from __future__ import annotations

from mrg_core.evaluation.clinical import extract_findings
from mrg_core.finding_chips import follow_chips

# the shipped CT model's chips and the words its prompt uses for them
PHRASES = {"patchy_shadow": "patchy shadow", "ground_glass": "ground glass shadow",
           "consolidation": "solid shadow", "fibrosis_stripe": "fibrotic stripes",
           "nodule": "nodule", "air_bronchogram": "air bronchus sign", "cavity": "cavity",
           "bilateral": "both lungs", "RUL": "upper lobe of the right lung",
           "RML": "middle lobe of the right lung", "RLL": "lower lobe of the right lung",
           "LUL": "upper lobe of the left lung", "LLL": "lower lobe of the left lung"}
NAMES = list(PHRASES)
FINDINGS = NAMES[:7]
HEAD = ("The thorax was symmetrical, the mediastinal heart shadow was in the middle, no "
        "enlarged lymph nodes were seen in the mediastinum, the texture of both lungs was "
        "enhanced, ")
TAIL = ("the bronchi of the lobe were clear, and no abnormal density shadow was seen in the "
        "bilateral thoracic cavities.")
PREVIOUS = HEAD + "patchy shadow was seen in the upper lobe of the right lung with blurred " \
                  "margins, " + TAIL
PREDICTED = {"patchy_shadow", "RUL"}


def edit(new: str, stated) -> str:
    return follow_chips(PREVIOUS, PREDICTED, new, set(stated), NAMES, PHRASES, FINDINGS)


def chips_read(text: str) -> set[str]:
    return extract_findings(text) & set(NAMES)


def test_no_flip_keeps_the_draft_word_for_word():
    other = HEAD + "ground glass shadow was seen in both lungs, " + TAIL
    assert edit(other, PREDICTED) == PREVIOUS


def test_a_ticked_finding_comes_from_the_new_draft_and_the_rest_stays():
    new = HEAD + "multiple patchy shadows were seen in both lungs, nodular shadow was seen " \
                 "in the upper lobe of the right lung, " + TAIL
    out = edit(new, PREDICTED | {"nodule"})
    assert out == HEAD + "patchy shadow was seen in the upper lobe of the right lung with " \
                         "blurred margins, nodular shadow was seen in the upper lobe of the " \
                         "right lung, " + TAIL
    assert chips_read(out) == PREDICTED | {"nodule"}


def test_a_ticked_finding_the_model_did_not_write_is_stated_plainly_where_the_lesion_is():
    out = edit(PREVIOUS, PREDICTED | {"cavity"})  # the new draft ignored the tick
    assert "cavity was seen in the upper lobe of the right lung" in out
    assert chips_read(out) == PREDICTED | {"cavity"}
    assert out.startswith(HEAD) and out.endswith(TAIL)
    both = edit(PREVIOUS, PREDICTED | {"cavity", "RML"})  # a finding and a lobe, one clause
    assert "cavity was seen in the upper lobe of the right lung and the middle lobe of the " \
           "right lung" in both and "also" not in both
    assert chips_read(both) == PREDICTED | {"cavity", "RML"}
    plural = edit(PREVIOUS, PREDICTED | {"fibrosis_stripe"})
    assert "fibrotic stripes were seen in the upper lobe of the right lung" in plural


def test_an_unticked_finding_loses_its_clause_and_nothing_else():
    out = edit(HEAD + TAIL, {"RUL"})
    assert out == HEAD + TAIL
    assert chips_read(out) == set()
    # its clause ended the sentence: the clause before it ends it now
    two = "Patchy shadow was seen in the upper lobe of the right lung. Nodule was seen in the " \
          "lower lobe of the left lung."
    both = {"patchy_shadow", "nodule", "RUL", "LLL"}
    out = follow_chips(two, both, "", {"patchy_shadow", "RUL"}, NAMES, PHRASES, FINDINGS)
    assert out == "Patchy shadow was seen in the upper lobe of the right lung."
    mid = "Patchy shadow was seen in the upper lobe of the right lung, nodule was seen in " \
          "the lower lobe of the left lung. The bronchi were clear."
    out = follow_chips(mid, both, "", {"patchy_shadow", "RUL"}, NAMES, PHRASES, FINDINGS)
    assert out == "Patchy shadow was seen in the upper lobe of the right lung. The bronchi " \
                  "were clear."
    # the lobe still ticked keeps a lesion: the draft's other finding is placed there
    out = follow_chips(two, both, "", both - {"nodule"}, NAMES, PHRASES, FINDINGS)
    assert out.endswith("lung, patchy shadow was also seen in the lower lobe of the left lung.")


def test_an_unticked_lobe_moves_its_finding_to_the_lobes_left():
    previous = HEAD + "patchy shadow was seen in the upper lobe of both lungs, " + TAIL
    before = {"patchy_shadow", "RUL", "LUL", "bilateral"}
    new = HEAD + "patchy shadow was seen in the upper lobe of the left lung, " + TAIL
    out = follow_chips(previous, before, new, before - {"RUL", "bilateral"}, NAMES, PHRASES,
                       FINDINGS)
    assert out == new  # the new draft's clause, in the old one's place
    assert chips_read(out) == {"patchy_shadow", "LUL"}
    # the new draft states it nowhere without the unticked lobe: stated plainly
    out = follow_chips(previous, before, previous, before - {"RUL", "bilateral"}, NAMES,
                       PHRASES, FINDINGS)
    assert chips_read(out) == {"patchy_shadow", "LUL"}
    assert "patchy shadow was seen in the upper lobe of the left lung" in out


def test_a_sentence_taken_from_the_new_draft_continues_the_clause_before_it():
    new = "Nodular shadow was seen in the upper lobe of the right lung. " + HEAD + TAIL
    out = edit(new, PREDICTED | {"nodule"})
    assert "blurred margins, nodular shadow was seen in the upper lobe of the right lung, " \
           "the bronchi" in out


def test_a_new_clause_never_states_a_chip_that_is_off():
    new = HEAD + "nodule and cavity were seen in the upper lobe of the right lung, " + TAIL
    out = edit(new, PREDICTED | {"nodule"})  # the model's clause also says cavity: not taken
    assert chips_read(out) == PREDICTED | {"nodule"}
    assert "nodule was seen in the upper lobe of the right lung" in out


def test_a_lobe_with_no_finding_anywhere_is_left_out():
    normal = HEAD + "no abnormal density shadow was seen in both lungs, " + TAIL
    out = follow_chips(normal, set(), normal, {"RML"}, NAMES, PHRASES, FINDINGS)
    assert out == normal
