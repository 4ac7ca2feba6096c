import pytest

from rksc.reasoning.select import Candidate, select


def c(answer, confidence=0.5, verifier=None):
    return Candidate(answer, confidence, verifier)


def test_vote_takes_the_majority_even_against_a_confident_verifier():
    cands = [c("7", verifier=0.99), c("8", verifier=0.2), c("8", verifier=0.3)]
    assert cands[select(cands, "vote")].answer == "8"
    assert select(cands, "verifier") == 0


def test_vote_tie_goes_to_the_answer_with_more_verifier_mass():
    cands = [c("7", verifier=0.9), c("8", verifier=0.2), c("7", verifier=0.1), c("8", verifier=0.3)]
    assert cands[select(cands, "vote")].answer == "7"


def test_composite_weights_votes_by_verifier():
    # two weak votes for 8 (0.2 + 0.2) lose to one strong vote for 7 (0.9)
    cands = [c("7", verifier=0.9), c("8", verifier=0.2), c("8", verifier=0.2)]
    assert cands[select(cands, "composite")].answer == "7"
    # without a verifier, composite falls back to generation confidence
    cands = [c("7", confidence=0.9), c("8", confidence=0.3), c("8", confidence=0.3)]
    assert cands[select(cands, "composite")].answer == "7"


def test_branches_without_answer_lose_and_best_branch_of_winning_answer_is_returned():
    cands = [c(None, verifier=1.0), c("5", verifier=0.4), c("5", verifier=0.6)]
    for method in ("vote", "verifier", "composite"):
        assert select(cands, method) == 2


def test_all_without_answer_picks_the_most_believed_branch():
    assert select([c(None, 0.2), c(None, 0.9)], "vote") == 1


def test_unknown_method_and_empty_input():
    with pytest.raises(ValueError):
        select([c("1")], "magic")
    with pytest.raises(ValueError):
        select([], "vote")
