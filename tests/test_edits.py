"""A chip redraft keeps the radiologist's own edits (mrg_core.edits.keep_user_edits)."""
from mrg_core.edits import keep_user_edits, sentences

OLD = "Patchy shadow in the lower lobe of the left lung. The bronchi were clear. No effusion."
NEW = "Ground glass shadow in the lower lobe of the left lung. The bronchi were clear. No effusion."


def test_sentences_give_the_text_back_and_do_not_cut_inside_numbers():
    text = "Findings: a 0.5 cm nodule. No effusion!\nImpression: benign?"
    parts = sentences(text)
    assert "".join(parts) == text
    assert parts == ["Findings: a 0.5 cm nodule. ", "No effusion!\n", "Impression: benign?"]
    assert sentences("") == []


def test_an_untouched_draft_is_replaced_by_the_new_one_exactly():
    assert keep_user_edits(OLD, OLD, NEW) == NEW
    assert keep_user_edits(OLD, OLD + "  \n", NEW) == NEW  # whitespace is not an edit
    assert keep_user_edits("", "", NEW) == NEW


def test_an_added_sentence_stays_after_the_sentence_it_followed():
    mine = OLD.replace("The bronchi were clear.", "The bronchi were clear. Compare with the "
                                                  "CT of May.")
    out = keep_user_edits(OLD, mine, NEW)
    assert out == ("Ground glass shadow in the lower lobe of the left lung. The bronchi were "
                   "clear. Compare with the CT of May. No effusion.")
    first = keep_user_edits(OLD, "History: fever. " + OLD, NEW)
    assert first == "History: fever. " + NEW
    last = keep_user_edits(OLD, OLD + " Follow up in 6 weeks.", NEW)
    assert last == NEW + " Follow up in 6 weeks."
    line = keep_user_edits(OLD, OLD + "\n\nFollow up in 6 weeks.", NEW)
    assert line == NEW + "\n\nFollow up in 6 weeks."  # their own paragraph stays one


def test_a_deleted_or_rewritten_model_sentence_stays_out_of_the_new_draft():
    deleted = keep_user_edits(OLD, OLD.replace(" No effusion.", ""), NEW)
    assert "effusion" not in deleted and deleted.startswith("Ground glass shadow")
    rewritten = keep_user_edits(OLD, OLD.replace("No effusion.", "Small left effusion."), NEW)
    assert rewritten == ("Ground glass shadow in the lower lobe of the left lung. The bronchi "
                         "were clear. Small left effusion.")
    assert "No effusion" not in rewritten


def test_an_edit_whose_anchor_is_gone_keeps_its_relative_place_and_order():
    # the user's two sentences followed the first model sentence, which the new draft rewrote
    mine = OLD.replace("left lung.", "left lung. Mine one. Mine two.")
    out = keep_user_edits(OLD, mine, NEW)
    assert out.index("Mine one.") < out.index("Mine two.") < out.index("No effusion.")
    assert out.count("Mine one.") == 1 and "Patchy" not in out
    # two separate additions at the same place keep the order they were written in
    a = keep_user_edits("A one. B two.", "X. A one. Y. B two.", "C three. D four.")
    assert a.index("X.") < a.index("Y.")
