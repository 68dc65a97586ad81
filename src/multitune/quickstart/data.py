"""The quickstart's data: three small English data sets written for this project from word lists and
sentence templates, combined by a seeded ``random.Random``.

Validation tests generalisation, not memorisation: about a quarter of every word list (names, places,
organisations, opinion words, topics) is held out of training and used only in validation, and no
validation sentence equals a training sentence.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Sequence
from pathlib import Path

from multitune.fileio import write_text_atomic

FIRST = ("Amelia", "Bruno", "Chiara", "Dmitri", "Elif", "Farah", "Gustav", "Hana", "Ivan", "Jonas", "Keiko", "Lars",
         "Marta", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan", "Tariq", "Ulla", "Viktor", "Wanda", "Xavier",
         "Yara", "Zofia", "Aaron", "Beatriz", "Carlos", "Daria", "Emil", "Fiona", "Georg", "Helena", "Idris", "Julia",
         "Kofi", "Leona", "Mateo", "Nina", "Omar", "Paula", "Rafael", "Sofia", "Tomas", "Uma", "Vera", "Walter",
         "Ximena", "Yusuf", "Zara", "Anika", "Bernd", "Clara", "David", "Esther", "Felix", "Greta", "Hugo", "Irene",
         "Jakob", "Kira", "Luca", "Mina", "Nils", "Olga", "Pedro", "Rina", "Samir", "Tilda", "Ugo", "Vanya", "Wim",
         "Agnes", "Boris", "Celia", "Dario", "Edith", "Filip", "Gloria")
LAST = ("Brandt", "Lopez", "Okafor", "Novak", "Silva", "Tanaka", "Larsen", "Moreau", "Kowalski", "Rossi", "Haddad",
        "Fischer", "Jensen", "Costa", "Ibrahim", "Nakamura", "Petrov", "Schmidt", "Dubois", "Ferreira", "Lindqvist",
        "Kaur", "Mensah", "Olsen", "Varga", "Weber", "Yilmaz", "Zhou", "Andersen", "Bianchi", "Castro", "Duarte",
        "Eriksen", "Fontaine", "Garcia", "Horvat", "Iqbal", "Jovanovic", "Keller", "Lehmann", "Marino", "Nielsen",
        "Ortega", "Pereira", "Quinn", "Romero", "Sato", "Torres", "Ueda", "Vogel", "Wagner", "Young", "Ziegler",
        "Amato", "Berg", "Conti", "Dahl", "Engel", "Falk", "Gallo")
PLACES = ("Lisbon", "Oslo", "Helsinki", "Porto", "Kyoto", "Nairobi", "Lima", "Quito", "Dublin", "Vienna", "Prague",
          "Krakow", "Seville", "Bergen", "Tallinn", "Riga", "Accra", "Dakar", "Hanoi", "Manila", "Perth", "Adelaide",
          "Montreal", "Halifax", "Denver", "Austin", "Boston", "Glasgow", "Cardiff", "Leeds", "Lyon", "Marseille",
          "Turin", "Naples", "Basel", "Geneva", "Utrecht", "Ghent", "Bruges", "Aarhus", "Malmo", "Tampere", "Gdansk",
          "Brno", "Zagreb", "Split", "Sofia City", "Izmir", "Cairo", "Tunis", "Rabat", "Santiago", "Cusco",
          "Bogota", "Recife", "New Orleans", "San Diego", "Buenos Aires", "Cape Town", "Kuala Lumpur")
ORGS = ("Northwind Traders", "Corvina Systems", "Bluefin Labs", "Helix Motors", "Orchard Bank", "Granite Foods",
        "Lumen Energy", "Quarry Media", "Saffron Airlines", "Tidewater Shipping", "Vireo Health", "Kestrel Robotics",
        "Mosaic Insurance", "Pinecrest Capital", "Atlas Cement", "Beacon Telecom", "Cobalt Mining", "Delta Textiles",
        "Ember Games", "Fjord Analytics", "Glacier Water", "Harbor Logistics", "Ivory Pharma", "Juniper Books",
        "Kelp Biotech", "Lantern Software", "Meridian Hotels", "Nimbus Cloud", "Opal Jewellers", "Prism Optics",
        "Quill Publishing", "Redwood Furniture", "Summit Outdoor", "Tundra Tyres", "Umber Paints", "Vantage Security",
        "Willow Dairy", "Yonder Travel", "Zephyr Wind", "Alder Chemicals", "Basalt Steel", "Cinder Studios",
        "Dune Solar", "Echo Radio")

POSITIVE = ("wonderful", "excellent", "delightful", "superb", "charming", "brilliant", "fantastic", "lovely",
            "outstanding", "impressive", "enjoyable", "terrific", "marvelous", "pleasant", "memorable", "gorgeous",
            "heartwarming", "refreshing", "splendid", "fabulous", "stunning", "flawless", "engaging", "inspiring",
            "satisfying", "elegant", "generous", "friendly", "cozy", "spotless", "tasty", "moving", "clever",
            "thoughtful", "vibrant", "smooth", "reliable", "magnificent", "uplifting", "exquisite", "sublime",
            "wholesome", "polished", "captivating")
NEGATIVE = ("awful", "terrible", "dreadful", "boring", "disappointing", "mediocre", "horrible", "tedious", "bland",
            "sloppy", "rude", "filthy", "overpriced", "clumsy", "dull", "miserable", "frustrating", "annoying",
            "shoddy", "lifeless", "noisy", "cramped", "stale", "greasy", "unbearable", "pointless", "tiresome",
            "cheap", "broken", "confusing", "forgettable", "painful", "lazy", "dismal", "grim", "soggy", "clunky",
            "chaotic", "pathetic", "lousy", "dreary", "unpleasant", "flimsy", "tasteless")
THINGS = ("film", "restaurant", "hotel", "phone", "novel", "concert", "laptop", "cafe", "museum tour", "album",
          "series", "pizza", "train ride", "hair salon", "game", "play", "bakery", "camera", "podcast", "gym",
          "ferry", "documentary", "bookshop", "headset", "spa", "musical", "tram service", "food truck", "app",
          "guided hike", "sofa", "coffee machine", "comedy show", "bike rental", "ramen bar", "exhibition")
ASPECTS = ("the service", "the ending", "the staff", "the price", "the sound", "the plot", "the food", "the room",
           "the battery", "the acting", "the design", "the music", "the view", "the pacing", "the seats")

# Similarity: subjects, actions and settings; a base sentence is subject + action + setting.
SUBJECTS = ("a man", "a woman", "a child", "an old man", "a young girl", "two boys", "a chef", "a dog", "a cat",
            "a musician", "a farmer", "a nurse", "a student", "a cyclist", "a fisherman", "a painter", "a baker",
            "a teacher", "a pilot", "a dancer", "a horse", "a police officer", "a group of friends", "a toddler",
            "a mechanic", "a runner", "a couple", "a tourist", "a waiter", "a surfer", "a climber", "a puppy")
ACTIONS = (("is playing a guitar", "is strumming a guitar"), ("is cutting vegetables", "is chopping vegetables"),
           ("is riding a bicycle", "is cycling on a bike"), ("is reading a book", "is looking through a book"),
           ("is swimming in a lake", "is swimming in the water"), ("is cooking pasta", "is making pasta"),
           ("is painting a wall", "is putting paint on a wall"), ("is running along a road", "is jogging on a road"),
           ("is eating an apple", "is biting into an apple"), ("is climbing a rock", "is scaling a rock face"),
           ("is washing a car", "is cleaning a car"), ("is singing a song", "is performing a song"),
           ("is planting flowers", "is putting flowers in the soil"), ("is feeding the birds", "is giving food to birds"),
           ("is writing a letter", "is writing a note"), ("is fixing a bike", "is repairing a bicycle"),
           ("is dancing on a stage", "is performing a dance on stage"), ("is catching a fish", "is reeling in a fish"),
           ("is drinking coffee", "is sipping a coffee"), ("is throwing a ball", "is tossing a ball"),
           ("is sleeping on a couch", "is asleep on a sofa"), ("is baking bread", "is making a loaf of bread"),
           ("is walking a dog", "is taking a dog for a walk"), ("is driving a truck", "is steering a truck"),
           ("is slicing a tomato", "is cutting a tomato into slices"), ("is typing on a laptop", "is using a laptop"),
           ("is carrying a box", "is holding a box"), ("is skating on ice", "is ice skating"))
SETTINGS = ("in a park", "in the kitchen", "on a beach", "in the street", "at a market", "near a river",
            "in a garden", "on a mountain", "in a small room", "at the station", "in the snow", "on a boat",
            "in a busy square", "at night", "in the rain", "in a forest", "on a rooftop", "at a festival")


def _held_out(words: Sequence[str], rng: random.Random, share: float = 0.25) -> tuple[list[str], list[str]]:
    """Split a word list into (train words, validation-only words)."""
    shuffled = list(words)
    rng.shuffle(shuffled)
    cut = max(1, int(len(shuffled) * share))
    return shuffled[cut:], shuffled[:cut]


def _sentiment(rng: random.Random, pos: list[str], neg: list[str], things: list[str], n: int) -> list[tuple[str, str]]:
    def one() -> tuple[str, str]:
        label = rng.choice(("positive", "negative"))
        good, bad = rng.choice(pos), rng.choice(neg)
        word, other = (good, bad) if label == "positive" else (bad, good)
        thing, aspect = rng.choice(things), rng.choice(ASPECTS)
        very = rng.choice(("", "really ", "truly ", "quite ", "absolutely ", "rather "))
        templates = [
            f"the {thing} was {very}{word}",
            f"what a {word} {thing} , {aspect} was {very}{word} too",
            f"I found the {thing} {very}{word} and would {'gladly return' if label == 'positive' else 'never return'}",
            f"{aspect} was {other} at first but overall the {thing} was {very}{word}",
            f"honestly a {word} {thing} from start to finish",
            f"the {thing} was not {other} at all , it was {word}",
            f"{'would recommend' if label == 'positive' else 'would not recommend'} this {thing} , {word} experience",
            f"our visit to the {thing} felt {very}{word}",
            f"{aspect} made the whole {thing} feel {word}",
            f"not what I expected : the {thing} turned out {very}{word}",
        ]
        return label, rng.choice(templates)

    return [one() for _ in range(n)]


def _ner(rng: random.Random, people: tuple[list[str], list[str]], places: list[str], orgs: list[str], n: int
         ) -> list[list[tuple[str, str]]]:
    first, last = people

    def ent(text: str, kind: str) -> list[tuple[str, str]]:
        words = text.split()
        return [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]

    def person() -> list[tuple[str, str]]:
        name = rng.choice(first) + (" " + rng.choice(last) if rng.random() < 0.7 else "")
        return ent(name, "PER")

    def o(text: str) -> list[tuple[str, str]]:
        return [(w, "O") for w in text.split()]

    day = lambda: rng.choice(("Monday", "Tuesday", "Friday", "Sunday", "yesterday", "today", "last week"))  # noqa: E731
    templates = [
        lambda: person() + o("flew from") + ent(rng.choice(places), "LOC") + o("to") + ent(rng.choice(places), "LOC")
        + o(f"on {day()} ."),
        lambda: o("Shares of") + ent(rng.choice(orgs), "ORG") + o("rose sharply after the results .") ,
        lambda: person() + o("joined") + ent(rng.choice(orgs), "ORG") + o("as head of research in")
        + ent(rng.choice(places), "LOC") + o("."),
        lambda: o("The new office of") + ent(rng.choice(orgs), "ORG") + o("opens in") + ent(rng.choice(places), "LOC")
        + o(f"{day()} ."),
        lambda: person() + o("and") + person() + o("met for dinner in") + ent(rng.choice(places), "LOC") + o("."),
        lambda: o("According to") + person() + o(", the deal between") + ent(rng.choice(orgs), "ORG") + o("and")
        + ent(rng.choice(orgs), "ORG") + o("is almost done ."),
        lambda: o(f"{day().capitalize()} the weather was cold and the trains were late ."),
        lambda: o("It was a quiet afternoon and nobody wanted to go outside ."),
        lambda: o("A spokesperson for") + ent(rng.choice(orgs), "ORG") + o("said that") + person()
        + o("will visit") + ent(rng.choice(places), "LOC") + o("."),
        lambda: o("Tourists in") + ent(rng.choice(places), "LOC") + o("were surprised by the prices ."),
        lambda: person() + o("has lived in") + ent(rng.choice(places), "LOC") + o("for ten years ."),
        lambda: o("We asked") + person() + o("about the plans of") + ent(rng.choice(orgs), "ORG") + o("."),
    ]
    return [rng.choice(templates)() for _ in range(n)]


def _similarity(rng: random.Random, subjects: list[str], actions: list, settings: list[str], n: int
                ) -> list[tuple[str, str, float]]:
    pairs = []
    bands = [(4.2, 5.0), (2.5, 3.8), (1.0, 2.4), (0.0, 0.8)]
    for i in range(n):
        subj, (act, para), place = rng.choice(subjects), rng.choice(actions), rng.choice(settings)
        first = f"{subj} {act} {place}"
        band = i % 4
        if band == 0:  # paraphrase
            second = f"{subj} {para} {place}" if rng.random() < 0.5 else f"{place}, {subj} {para}"
        elif band == 1:  # same subject and action, another detail
            second = f"{rng.choice([s for s in subjects if s != subj])} {para} {place}" if rng.random() < 0.5 \
                else f"{subj} {act} {rng.choice([p for p in settings if p != place])}"
        elif band == 2:  # same subject, different event
            other = rng.choice([a for a in actions if a[0] != act])
            second = f"{subj} {other[rng.randrange(2)]} {rng.choice(settings)}"
        else:  # unrelated
            other = rng.choice([a for a in actions if a[0] != act])
            second = f"{rng.choice([s for s in subjects if s != subj])} {other[0]} " \
                     f"{rng.choice([p for p in settings if p != place])}"
        low, high = bands[band]
        pairs.append((first, second, round(rng.uniform(low, high), 1)))
    return pairs


def write_quickstart_data(out_dir: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write the three quickstart data sets under ``out_dir``.

    Returns:
        ``{task: {"train": path, "validation": path}}`` for ``sentiment`` (TSV, header
        ``label<TAB>sentence``), ``ner`` (CoNLL, BIO over PER/LOC/ORG) and ``similarity`` (CSV without
        header: sentence1, sentence2, score 0-5). Deterministic for a seed; files are written atomically.
    """
    rng = random.Random(seed)
    split = {name: _held_out(words, rng) for name, words in
             (("pos", POSITIVE), ("neg", NEGATIVE), ("things", THINGS), ("first", FIRST), ("last", LAST),
              ("places", PLACES), ("orgs", ORGS), ("subjects", SUBJECTS), ("actions", ACTIONS),
              ("settings", SETTINGS))}
    out: dict[str, dict[str, Path]] = {"sentiment": {}, "ner": {}, "similarity": {}}
    seen: dict[str, set] = {"sentiment": set(), "ner": set(), "similarity": set()}
    for part, idx, sizes in (("train", 0, (1600, 1000, 1000)), ("validation", 1, (300, 250, 250))):
        def words(name: str) -> list[str]:
            # validation mixes held-out words with training words, so every example has something new
            return split[name][0] + split[name][1] if idx else split[name][0]

        def held(name: str) -> list[str]:
            return split[name][1] if idx else split[name][0]

        sent = [r for r in _sentiment(rng, held("pos"), held("neg"), words("things"), sizes[0] * 2)
                if r[1] not in seen["sentiment"]]
        sent = list(dict(((s, (lab, s)) for lab, s in sent)).values())[: sizes[0]]
        seen["sentiment"].update(s for _, s in sent)
        buf = io.StringIO()
        buf.write("label\tsentence\n" + "".join(f"{lab}\t{s}\n" for lab, s in sent))
        out["sentiment"][part] = _write(out_dir / "sentiment" / f"{part}.tsv", buf.getvalue())

        ner = _ner(rng, (held("first"), held("last")), held("places"), held("orgs"), sizes[1] * 2)
        ner = [s for s in {" ".join(w for w, _ in s): s for s in ner}.items() if s[0] not in seen["ner"]][: sizes[1]]
        seen["ner"].update(k for k, _ in ner)
        text = "\n".join("".join(f"{w}\t{t}\n" for w, t in sent_) for _, sent_ in ner)
        out["ner"][part] = _write(out_dir / "ner" / f"{part}.conll", text)

        sim = [p for p in _similarity(rng, words("subjects"), held("actions"), words("settings"), sizes[2] * 2)
               if (p[0], p[1]) not in seen["similarity"]]
        sim = list({(a, b): (a, b, s) for a, b, s in sim}.values())[: sizes[2]]
        seen["similarity"].update((a, b) for a, b, _ in sim)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows((a, b, f"{s:.1f}") for a, b, s in sim)
        out["similarity"][part] = _write(out_dir / "similarity" / f"{part}.csv", buf.getvalue())
    return out


def _write(path: Path, text: str) -> Path:
    write_text_atomic(path, text)
    return path
