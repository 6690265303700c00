from collections import Counter

from components.held_out import MIN_CONTAINED_CHARS, HeldOutTexts, NormalisedText
from components.ingest import normalise

ARTICLE = "Shares in the carmaker rose sharply on Monday after it reported record profits for the year."
OTHER = "The minister said the new rules would come into force next spring, after a short consultation."


def test_a_normalised_position_maps_back_to_the_original_text():
    text = "  Cafe\u0301\tau\n\nlait  and tea "
    normalised = NormalisedText(text)
    assert normalised.key == normalise(text) == "Caf\u00e9 au lait and tea"
    assert text[slice(*normalised.original(5, 12))] == "au\n\nlait"
    assert text[slice(*normalised.original(6, 10))] == "u\n\nla"  # inside words
    assert text[slice(*normalised.original(1, 3))] == "Cafe\u0301"  # NFC changed the word: all of it


def test_embedded_passages_are_cut_and_the_rest_kept_as_separate_texts():
    held_out = HeldOutTexts([ARTICLE, OTHER, "yes"])
    counts = Counter()
    wrapped = ARTICLE.replace(" ", "\n", 4)
    texts = [
        f"Intro.\n{wrapped}\nMiddle part. {OTHER} Closing line.",
        f"{ARTICLE} {ARTICLE}",  # nothing but held-out text
        "  " + ARTICLE.replace(" ", "   "),  # equal after normalising
        "yes, I agree",  # a short held-out text is only matched whole
        "yes",
        " \n ",
        f"{ARTICLE[:MIN_CONTAINED_CHARS]} is where the copy stops",  # its start alone is not the article
    ]
    kept = held_out.scrub(texts, counts)
    assert kept == ["Intro.\n", "\nMiddle part. ", " Closing line.", "yes, I agree", texts[-1]]
    assert counts == Counter(blank=1, equal=2, kept=3, passages=4,
                             chars=len(wrapped) + len(OTHER) + 2 * len(ARTICLE))


def test_overlapping_held_out_texts_are_cut_as_one_passage():
    first, second = ARTICLE, ARTICLE[40:] + " " + OTHER
    held_out = HeldOutTexts([first, second])
    counts = Counter()
    assert held_out.scrub([f"Before. {ARTICLE} {OTHER} After."], counts) == ["Before. ", " After."]
    assert counts["passages"] == 1 and counts["chars"] == len(ARTICLE) + 1 + len(OTHER)


def test_short_held_out_texts_are_never_searched_inside_others():
    short = ARTICLE[:MIN_CONTAINED_CHARS - 1]
    counts = Counter()
    assert HeldOutTexts([short]).scrub([f"News: {short}."], counts) == [f"News: {short}."]
    assert counts == Counter(kept=1)
