"""Synthetic, offline data for ``multitune quickstart``: sentiment, NER and sentence similarity.

The quickstart trains the packaged MiniLM-L6 encoder on three tasks at once in a few minutes
on a CPU, so it needs data that is small, learnable and yet honest about generalisation.
Everything here was written for this project: hand-written word lists, entity names and
sentence templates, combined by one seeded ``random.Random(seed)`` (never the global RNG),
so a given seed always produces byte-identical files.

Design:

* **Held-out vocabulary.** Every word list below is split by position with
  :func:`split_vocabulary`: every fourth entry (index 3, 7, 11, ...) is *validation-only*.
  Training data draws from the other three quarters; validation draws from the whole list,
  so about a quarter of its names, places, organisations, sentiment words, review topics and
  similarity topics were never seen in training. The split does not depend on the seed, so
  tests (and curious users) can tell which entries are held out.
* **No leaked sentences.** Validation is generated after training and any candidate whose
  sentence already occurs in the training split is redrawn; duplicates within a split are
  redrawn too.
* **Sentiment** reviews mix plain statements, intensifiers, negation ("not bland at all" is
  positive), contrast (the clause after "but" carries the label) and set phrases ("not worth
  it"), with labels alternating so the classes are balanced.
* **NER** sentences come from templates whose ``{PER}``, ``{LOC}`` and ``{ORG}`` slots become
  BIO-tagged entities of one to three tokens; some templates have no entity at all.
* **Similarity** pairs start from one event template. The score band follows from how the second
  sentence is built: a paraphrase of the same event with the same details (4.2-5.0), the same
  event with one detail changed (2.5-3.8), another event of the same topic (1.0-2.4), or an
  event of another topic (0.0-0.8). Bands are used in equal numbers.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from multitune.fileio import write_text_atomic

__all__ = ["write_quickstart_data", "split_vocabulary"]

# ----------------------------------------------------------------------------- sizes
SENTIMENT_SIZES = {"train": 1600, "validation": 300}
NER_SIZES = {"train": 1000, "validation": 250}
SIMILARITY_SIZES = {"train": 1000, "validation": 250}

# ----------------------------------------------------------------------------- people, places, organisations
FIRST_NAMES = (
    "Maria", "Daniel", "Aisha", "Tomas", "Priya", "Lukas", "Elena", "Omar", "Sofia", "Kenji",
    "Amara", "Mateo", "Ingrid", "Rahul", "Chloe", "Dmitri", "Fatima", "Hugo", "Leila", "Andre",
    "Yuki", "Nadia", "Pablo", "Freya", "Samuel", "Zara", "Victor", "Mei", "Jonas", "Beatriz",
    "Tariq", "Clara", "Emeka", "Hannah", "Ravi", "Astrid", "Diego", "Olga", "Malik", "Lucia",
    "Henrik", "Ayesha", "Marco", "Sigrid", "Kwame", "Isabel", "Arjun", "Noor", "Felix", "Camila",
    "Anders", "Chiara", "Jamal", "Rosa", "Stefan", "Keiko", "Thabo", "Elif", "Oscar", "Mira",
    "Bruno", "Leona", "Ivan", "Selin", "Nikolai", "Ana", "Rafael", "Hana", "Emil", "Paloma",
    "Yusuf", "Greta", "Kofi", "Lena", "Sanjay", "Irene", "Mateus", "Aiko", "Liam", "Noemi",
    "Farid", "Vera", "Soren", "Anika", "Julian", "Esther", "Tobias", "Amina", "Benedikt", "Dario",
)
SURNAMES = (
    "Lopez", "Okafor", "Novak", "Lindqvist", "Tanaka", "Moreau", "Petrov", "Haddad", "Kowalski",
    "Fernandes", "Nakamura", "Schmidt", "Mensah", "Rossi", "Johansson", "Gupta", "Dubois",
    "Ivanova", "Silva", "Yilmaz", "Andersen", "Costa", "Kim", "Nguyen", "Mokoena", "Horvat",
    "Castillo", "Bergstrom", "Okonkwo", "Sato", "Romero", "Fischer", "Kaur", "Vasquez", "Eriksen",
    "Adeyemi", "Marino", "Kovacs", "Hashemi", "Duarte", "Lindgren", "Abara", "Watanabe", "Herrera",
    "Jansen", "Osei", "Bianchi", "Mendes", "Chowdhury", "Larsen", "Popescu", "Aziz", "Ortega",
    "Nilsson", "Takahashi", "Vogel", "Dimitrov", "Banerjee", "Quispe", "Sorensen", "Halvorsen",
    "Ruiz", "Kapoor", "Delgado", "Keller", "Okoro", "Varga", "Ibrahim", "Molina", "Hoffmann",
)
PLACES = (
    "Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Porto", "Helsinki", "Accra", "Seville",
    "Montreal", "Krakow", "Hanoi", "Dublin", "Valencia", "Tbilisi", "Bergen", "Marrakesh", "Quito",
    "Adelaide", "Gdansk", "Manila", "Zurich", "Lagos", "Bogota", "Tallinn", "Osaka", "Lyon",
    "Cairo", "Vienna", "Buenos Aires", "Riga", "Istanbul", "Geneva", "Madrid", "Chennai",
    "Edinburgh", "Munich", "Auckland", "Havana", "Prague", "Budapest", "Dakar", "Seoul", "Toronto",
    "Athens", "Bilbao", "Kampala", "Hamburg", "Vancouver", "Copenhagen", "Jakarta", "Naples",
    "Cape Town", "Glasgow", "Tunis", "Rio de Janeiro", "Brisbane", "Mumbai", "Stockholm", "Warsaw",
    "Kuala Lumpur", "Mexico City", "Addis Ababa", "Portugal", "Kenya", "Norway", "Peru", "Iceland",
    "Ghana", "Vietnam", "Morocco", "Hong Kong",
)
ORGANISATIONS = (
    "Bluefin Logistics", "Harborlight Bank", "Granite Peak Foods", "Silverleaf Health",
    "Redwood Analytics", "Copperline Energy", "Brightwater Utilities", "Nimbus Airways",
    "Tidewell Insurance", "Oakridge Motors", "Lumen Robotics", "Kestrel Pharmaceuticals",
    "Meridian Textiles", "Cobalt Ridge Mining", "Sunfield Farms", "Pinecrest University",
    "Riverbend Hospital", "Atlas Freight", "Quillon Software", "Vantor Systems", "Starling Media",
    "Orion Shipping", "Marigold Hotels", "Highgate Capital", "Bramble Books", "Crescent Telecom",
    "Polaris Rail", "Driftwood Studios", "Ironbark Construction", "Saffron Kitchens",
    "Westbrook College", "Ambervale Bank", "Fernhill Water", "Zephyr Cycles", "Halcyon Labs",
    "Tessera Chips", "Greywolf Security", "Alder Institute", "Blue Harbour Ferries",
    "Juniper Clinics", "Larkspur Airlines", "Cinder Games", "Maplestone Bakeries", "Zentrix",
    "Novalink", "Quorvia", "Verity News", "Aurelia Cosmetics",
)
TITLES = ("Dr.", "Ms.", "Mr.", "Professor")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "June", "July", "August", "September",
          "October", "November", "December")
NUMBERS = ("two", "three", "five", "seven", "ten", "twelve", "15", "20", "35", "40", "80", "120")
OBJECTS = ("umbrella", "laptop", "ladder", "kettle", "map", "guitar", "camera", "parcel",
           "bicycle", "notebook", "toolbox", "blanket", "suitcase", "lamp", "printer", "jacket")

# ----------------------------------------------------------------------------- NER templates
NER_TEMPLATES = (
    "{PER} flew from {LOC} to {LOC} on {DAY} .",
    "Shares of {ORG} rose {NUM} percent after the merger was announced .",
    "{PER} of {ORG} said the plant in {LOC} will reopen in {MONTH} .",
    "{ORG} opened a new office in {LOC} last {DAY} .",
    "According to {PER} , the festival in {LOC} drew {NUM} thousand visitors .",
    "{PER} and {PER} met in {LOC} to discuss the deal with {ORG} .",
    "{PER} joined {ORG} as chief engineer in {MONTH} .",
    "After {NUM} years in {LOC} , {PER} moved back to {LOC} .",
    "{ORG} signed a contract with {ORG} worth {NUM} million dollars .",
    "Police in {LOC} said {PER} was not injured in the crash .",
    "{PER} won the marathon in {LOC} on {DAY} morning .",
    "Did {PER} call you back about the flat in {LOC} ?",
    "{PER} thanked the staff at {ORG} for their help .",
    "The train from {LOC} to {LOC} was delayed by {NUM} minutes .",
    "{PER} 's new book about {LOC} will be published by {ORG} .",
    "Engineers at {ORG} in {LOC} have built a cheaper battery .",
    "{PER} told reporters that {ORG} would cut prices in {MONTH} .",
    "Students from {LOC} visited {ORG} on {DAY} .",
    "Heavy rain closed several roads around {LOC} on {DAY} .",
    "{ORG} recalled {NUM} thousand kettles sold in {LOC} .",
    "My sister works as a nurse at {ORG} with {PER} .",
    "We spent a week in {LOC} with {PER} and the kids .",
    "{PER} was named head of research at {ORG} .",
    "The mayor of {LOC} , {PER} , opened the new library on {DAY} .",
    "Tickets for the concert in {LOC} sold out in {NUM} minutes .",
    "{ORG} moved its headquarters from {LOC} to {LOC} .",
    "Last {DAY} , {PER} sent me a postcard from {LOC} .",
    "Investors worry that {ORG} will lose money in {LOC} this year .",
    "{PER} met {PER} at a conference in {LOC} .",
    "Thanks to {PER} , {ORG} raised {NUM} thousand euros for charity .",
    "Flights between {LOC} and {LOC} resume on {DAY} , {ORG} said .",
    "Have you seen the photos {PER} took in {LOC} ?",
)
NER_PLAIN_TEMPLATES = (
    "The meeting was moved to {DAY} because of the storm .",
    "Prices rose {NUM} percent in {MONTH} , the highest in a decade .",
    "Please bring the {OBJECT} to the office before noon .",
    "The {OBJECT} broke again , so we ordered a new one on {DAY} .",
    "Nobody expected the match to last {NUM} minutes .",
    "It rained all day on {DAY} , and the buses were late .",
    "She left the {OBJECT} on the kitchen table last night .",
    "Our team finished the report {NUM} days early .",
    "The {OBJECT} was cheaper than we expected in {MONTH} .",
    "He promised to return the {OBJECT} by {DAY} .",
    "Sales of the new {OBJECT} doubled in {MONTH} .",
    "We waited {NUM} minutes for the doctor on {DAY} .",
)

# ----------------------------------------------------------------------------- sentiment vocabulary
POSITIVE_WORDS = (
    "wonderful", "excellent", "superb", "fantastic", "delightful", "brilliant", "outstanding",
    "impressive", "lovely", "charming", "terrific", "marvellous", "splendid", "first-rate",
    "top-notch", "flawless", "great", "enjoyable", "pleasant", "reliable", "refreshing",
    "memorable", "stunning", "remarkable", "exceptional", "perfect", "amazing", "fabulous",
    "gorgeous", "satisfying", "worthwhile", "polished", "elegant", "thoughtful", "inviting",
    "uplifting", "sublime", "magnificent", "wholesome", "spotless", "dazzling", "exquisite",
    "faultless", "heavenly",
)
NEGATIVE_WORDS = (
    "terrible", "awful", "dreadful", "disappointing", "mediocre", "poor", "horrible", "boring",
    "dull", "bland", "sloppy", "flimsy", "overpriced", "useless", "frustrating", "annoying",
    "unpleasant", "lousy", "shoddy", "tedious", "forgettable", "messy", "clumsy", "careless",
    "confusing", "clunky", "lifeless", "stale", "unreliable", "pathetic", "miserable", "dismal",
    "atrocious", "subpar", "second-rate", "painful", "tiresome", "underwhelming", "lacklustre",
    "uninspired", "sluggish", "faulty", "dreary", "shabby",
)
POSITIVE_PHRASES = (
    "worth every penny", "highly recommended", "not bad at all", "I would go back in a heartbeat",
    "a real treat", "it exceeded my expectations", "no complaints whatsoever",
    "I will definitely return", "money well spent", "better than I hoped", "five stars from me",
    "it made my week",
)
NEGATIVE_PHRASES = (
    "not worth it", "not worth the money", "a complete waste of time", "never again",
    "I want my money back", "avoid at all costs", "a huge letdown", "I regret it",
    "worse than I feared", "save your money", "nothing special at all", "I will not be returning",
)
INTENSIFIERS = ("", "", "", "really ", "truly ", "very ", "quite ", "extremely ", "absolutely ",
                "incredibly ", "rather ", "genuinely ")
REVIEW_TOPICS = (  # (what is reviewed, parts of it a review can single out)
    ("film", ("plot", "acting", "ending", "soundtrack", "opening scene", "dialogue")),
    ("documentary", ("narration", "camera work", "pacing", "interviews")),
    ("novel", ("story", "main character", "writing", "final chapter")),
    ("album", ("lyrics", "vocals", "production", "second track")),
    ("concert", ("sound", "setlist", "crowd", "encore")),
    ("restaurant", ("food", "service", "dessert", "wine list", "atmosphere")),
    ("cafe", ("coffee", "pastries", "staff", "music")),
    ("bakery", ("bread", "croissants", "cakes", "prices")),
    ("pizza place", ("crust", "toppings", "delivery", "sauce")),
    ("hotel", ("room", "breakfast", "staff", "view", "bed")),
    ("hostel", ("dorm", "kitchen", "showers", "location")),
    ("airline", ("crew", "seats", "meals", "boarding")),
    ("train service", ("carriages", "timetable", "ticket machines", "conductor")),
    ("taxi ride", ("driver", "car", "route", "fare")),
    ("laptop", ("battery", "screen", "keyboard", "speakers")),
    ("phone", ("camera", "battery", "display", "charger")),
    ("headset", ("sound quality", "ear cushions", "microphone", "cable")),
    ("blender", ("motor", "jug", "lid", "buttons")),
    ("coffee machine", ("milk frother", "water tank", "espresso", "buttons")),
    ("vacuum cleaner", ("suction", "filter", "cord", "brush")),
    ("pair of running shoes", ("sole", "laces", "fit", "cushioning")),
    ("backpack", ("zips", "straps", "pockets", "fabric")),
    ("tent", ("poles", "zip", "groundsheet", "instructions")),
    ("video game", ("graphics", "story", "controls", "soundtrack", "final level")),
    ("board game", ("rules", "pieces", "artwork", "box")),
    ("museum", ("exhibits", "guided tour", "gift shop", "audio guide")),
    ("gym", ("equipment", "trainers", "changing rooms", "classes")),
    ("hair salon", ("haircut", "stylist", "booking", "prices")),
    ("dental clinic", ("dentist", "receptionist", "waiting room", "treatment")),
    ("plumbing company", ("plumber", "quote", "repair", "cleanup")),
    ("courier service", ("delivery", "tracking", "packaging", "driver")),
    ("banking app", ("login", "design", "transfers", "customer support")),
    ("theme park", ("rides", "queues", "food stalls", "shows")),
    ("cooking class", ("teacher", "recipes", "ingredients", "kitchen")),
    ("language course", ("teacher", "textbook", "lessons", "homework")),
    ("car rental", ("car", "pickup", "paperwork", "staff")),
    ("spa", ("massage", "sauna", "towels", "pool")),
    ("bookshop", ("selection", "staff", "reading corner", "prices")),
)
# {good}/{good2} carry the label's polarity, {bad} the opposite one; the label is always right.
REVIEW_TEMPLATES = (
    # plain statements and intensifiers
    "The {a} of this {topic} {a_be} {intens}{good}.",
    "This {topic} was {intens}{good}, and the {a} {a_be} {good2}.",
    "I found the {a} {intens}{good}.",
    "We tried this {topic} last week and the {a} {a_be} {intens}{good}.",
    "What {good_a} {topic}, the {a} {a_be} {intens}{good2}!",
    "Overall, the {topic} felt {intens}{good}.",
    "My friends and I thought the {a} {a_be} {intens}{good}.",
    "The {a} {a_be} {good} and the {b} {b_be} {intens}{good2}.",
    # negation of the opposite polarity
    "The {a} {a_be} not {bad} at all.",
    "Honestly, this {topic} is not {bad} at all.",
    "I would not call the {a} {bad}.",
    "Nothing about the {a} of this {topic} felt {bad}.",
    "The {a} {a_be} {good}, not {bad} like the reviews said.",
    "Contrary to what I expected, the {a} {a_be} not {bad}.",
    # contrast: the last clause decides
    "The {a} {a_be} {bad} but the {b} {b_be} {intens}{good}.",
    "Although the {a} {a_be} {bad}, the {b} {b_be} {intens}{good}.",
    "The {a} seemed {bad} at first, but in the end the {topic} was {good}.",
    "The {a} {a_be} {bad}, yet overall this {topic} was {intens}{good}.",
    "Despite the {bad} {a}, the {b} made this {topic} {good}.",
    # set phrases
    "{phrase}: the {a} {a_be} {intens}{good}.",
    "This {topic} was {good}, {phrase}.",
    "As for this {topic}, {phrase}.",
    "The {a} and the {b} were both {good}; {phrase}.",
)

# ----------------------------------------------------------------------------- similarity topics
# Each topic holds events; each event holds paraphrases using the same slots ({p} person,
# {l} place, {d} day of the week).
SIMILARITY_TOPICS = (
    (("{p} baked a chocolate cake for the party in {l}.", "{p} made a chocolate cake for the celebration in {l}.",
      "For the party in {l}, {p} baked a chocolate cake."),
     ("{p} burned the rice while cooking dinner on {d}.", "On {d}, {p} scorched the rice while making dinner.")),
    (("{p} bought a new bicycle in {l}.", "{p} purchased a new bike in {l}.", "In {l}, {p} got a new bicycle."),
     ("{p} rode sixty kilometres along the river on {d}.", "On {d}, {p} cycled sixty kilometres beside the river.")),
    (("A heavy storm flooded the streets of {l} on {d}.", "On {d}, a severe storm left the streets of {l} under water."),
     ("Snow closed the airport in {l} for two days.", "The airport in {l} was shut for two days because of snow.")),
    (("{p} scored two goals in the match in {l} on {d}.", "In the game in {l} on {d}, {p} found the net twice."),
     ("The team from {l} lost the cup final on penalties.", "The {l} side was beaten on penalties in the cup final.")),
    (("{p} played the violin at a concert in {l}.", "{p} performed on the violin during a concert in {l}."),
     ("{p} recorded a new album of folk songs.", "{p} made a new record of folk songs.")),
    (("{p} planted tomatoes in the back garden on {d}.", "On {d}, {p} put tomato plants in the back garden."),
     ("Slugs ate most of the lettuce in {p}'s garden.", "Most of the lettuce in {p}'s garden was eaten by slugs.")),
    (("{p} missed the morning flight to {l}.", "{p} did not make the early flight to {l}.",
      "The early plane to {l} left without {p}."),
     ("{p} booked a cheap hotel near the station in {l}.",
      "{p} reserved an inexpensive hotel close to the station in {l}.")),
    (("{p} broke an arm while skiing on {d}.", "On {d}, {p} fractured an arm in a skiing accident."),
     ("The new hospital in {l} opened its doors to patients.", "Patients can now visit the newly opened hospital in {l}.")),
    (("{p} passed the final maths exam with top marks.", "{p} got the highest grade in the final mathematics exam."),
     ("The school in {l} will close early on {d} for a teacher training day.",
      "On {d}, the school in {l} is shutting early so teachers can train.")),
    (("{p} adopted a grey kitten from the shelter in {l}.", "{p} took home a grey kitten from the animal shelter in {l}."),
     ("{p}'s dog ran away during the fireworks on {d}.", "During the fireworks on {d}, {p}'s dog escaped.")),
    (("{p} moved into a small flat in {l}.", "{p} relocated to a little apartment in {l}."),
     ("The rent in {l} went up again this year.", "Housing costs in {l} rose once more this year.")),
    (("{p} dropped a phone into the sea on {d}.", "On {d}, {p}'s phone fell into the sea."),
     ("A software update made {p}'s laptop much slower.", "{p}'s laptop lost a lot of speed after a software update.")),
    (("{p} started a new job at a bank in {l}.", "{p} began working for a bank in {l}."),
     ("{p} asked for a pay rise on {d}.", "On {d}, {p} requested a higher salary.")),
    (("{p} bought a pair of winter boots at the market in {l}.", "At the market in {l}, {p} purchased some winter boots."),
     ("The shopping centre in {l} was crowded on {d}.", "On {d}, the mall in {l} was packed with people.")),
    (("The train to {l} was cancelled on {d}.", "On {d}, the train service to {l} was called off."),
     ("{p} fell asleep on the bus and missed the stop.", "{p} dozed off on the bus and went past the stop.")),
    (("{p} climbed the highest peak near {l}.", "{p} reached the summit of the tallest mountain close to {l}."),
     ("{p} got lost on a forest trail on {d}.", "On {d}, {p} lost the way on a trail in the woods.")),
    (("{p} painted a portrait of a fisherman in {l}.", "In {l}, {p} made a painting of a fisherman."),
     ("The museum in {l} bought a rare medieval map.", "A rare map from the middle ages was acquired by the museum in {l}.")),
    (("{p} directed a short film about life in {l}.", "{p} made a short movie about everyday life in {l}."),
     ("The cinema in {l} showed an old silent film on {d}.", "On {d}, an old silent movie was screened at the cinema in {l}.")),
    (("{p} got married in a small chapel in {l}.", "{p} had a wedding in a little chapel in {l}."),
     ("{p} visited grandparents in {l} on {d}.", "On {d}, {p} went to see the grandparents in {l}.")),
    (("{p} caught a huge salmon in the river near {l}.", "{p} landed an enormous salmon from the river close to {l}."),
     ("A fishing boat sank off the coast of {l} on {d}.", "On {d}, a fishing vessel went down off the {l} coast.")),
    (("{p} passed the driving test on {d}.", "On {d}, {p} got through the driving exam."),
     ("{p}'s car broke down on the motorway to {l}.", "On the highway to {l}, {p}'s car stopped working.")),
    (("{p} discovered a new species of beetle near {l}.", "A previously unknown kind of beetle was found by {p} near {l}."),
     ("Researchers in {l} built a faster microscope.", "A quicker microscope was developed by scientists in {l}.")),
    (("{p} was elected mayor of {l}.", "{p} won the vote to become mayor of {l}.", "The people of {l} chose {p} as their mayor."),
     ("Voters in {l} rejected the plan for a new airport.",
      "The proposal for a new airport was turned down by voters in {l}.")),
    (("{p} opened a vegetarian restaurant in {l}.", "{p} launched a meat-free restaurant in {l}."),
     ("{p} ordered pizza for the whole office on {d}.", "On {d}, {p} got pizza delivered for everyone at the office.")),
    (("{p} finished the marathon in {l} in under three hours.", "{p} completed the {l} marathon in less than three hours."),
     ("{p} twisted an ankle during a morning run on {d}.", "On {d}, {p} sprained an ankle while jogging in the morning.")),
    (("{p} wrote a novel set in {l}.", "{p} is the author of a novel that takes place in {l}."),
     ("{p} returned ten library books on {d}.", "On {d}, {p} brought back ten books to the library.")),
    (("A new wind farm near {l} started producing power.", "Near {l}, a recently built wind farm began generating electricity."),
     ("{p} installed solar panels on the roof on {d}.", "On {d}, {p} put solar panels up on the roof.")),
    (("Thieves stole a painting from a gallery in {l} on {d}.", "On {d}, a painting was taken by burglars from a gallery in {l}."),
     ("{p} found a lost wallet and gave it to the police.", "{p} handed a wallet found on the street to the police.")),
    (("{p} opened a savings account on {d}.", "On {d}, {p} set up a savings account."),
     ("The central bank in {l} raised interest rates.", "Interest rates were increased by the central bank in {l}.")),
    (("Workers finished the new bridge in {l} ahead of schedule.", "The new bridge in {l} was completed earlier than planned."),
     ("{p} repaired the leaking roof on {d}.", "On {d}, {p} fixed the roof that was letting in water.")),
    (("{p} danced the lead role in a ballet in {l}.", "In {l}, {p} performed the main part in a ballet."),
     ("The theatre in {l} sold out every show on {d}.", "Every performance at the theatre in {l} on {d} was sold out.")),
    (("{p} swam across the lake near {l}.", "{p} crossed the lake close to {l} by swimming."),
     ("The beach in {l} was closed on {d} because of jellyfish.", "On {d}, jellyfish forced the closure of the beach in {l}.")),
    (("{p} raised money for the animal shelter in {l}.", "{p} collected funds for the animal rescue centre in {l}."),
     ("{p} volunteered at the food bank on {d}.", "On {d}, {p} helped out as a volunteer at the food bank.")),
    (("{p} won a chess tournament in {l}.", "{p} took first place at a chess competition in {l}."),
     ("{p} stayed up all night playing video games on {d}.", "On {d}, {p} played video games until morning.")),
)
SIMILARITY_BANDS = ((4.2, 5.0), (2.5, 3.8), (1.0, 2.4), (0.0, 0.8))  # paraphrase, detail, topic, unrelated

# ----------------------------------------------------------------------------- logic
T = TypeVar("T")
SPLITS = ("train", "validation")


def split_vocabulary(items: Sequence[T]) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """Split a word list into (entries usable in training, validation-only entries).

    Every fourth entry (index 3, 7, 11, ...) is validation-only; the split ignores the seed.
    """
    return tuple(x for i, x in enumerate(items) if i % 4 != 3), tuple(items[3::4])


def _vocabulary(split: str) -> dict[str, tuple]:
    lists = {"first": FIRST_NAMES, "last": SURNAMES, "place": PLACES, "org": ORGANISATIONS,
             "pos": POSITIVE_WORDS, "neg": NEGATIVE_WORDS, "pos_phrase": POSITIVE_PHRASES,
             "neg_phrase": NEGATIVE_PHRASES, "review_topic": REVIEW_TOPICS, "sim_topic": SIMILARITY_TOPICS}
    return {k: split_vocabulary(v)[0] if split == "train" else tuple(v) for k, v in lists.items()}


def _draw_unique(n: int, make: Callable[[int], tuple], forbidden: set[str]) -> list:
    """Call ``make(i)`` -> (key, item, sentences) until n items with distinct keys are drawn
    and none of their sentences is in ``forbidden``."""
    keys: set = set()
    items = []
    for i in range(n):
        for _ in range(2000):
            key, item, sentences = make(i)
            if key not in keys and not any(s in forbidden for s in sentences):
                break
        else:
            raise RuntimeError(f"could not draw {n} distinct examples; the word lists are too small")
        keys.add(key)
        items.append(item)
    return items


def _review(rng: random.Random, label: str, v: dict) -> str:
    topic, parts = rng.choice(v["review_topic"])
    good, bad = (v["pos"], v["neg"]) if label == "positive" else (v["neg"], v["pos"])
    a, b = rng.sample(parts, 2)
    g1, g2 = rng.sample(good, 2)
    text = rng.choice(REVIEW_TEMPLATES).format(  # every part ending in -s is a plural noun
        topic=topic, a=a, b=b, good=g1, good2=g2, bad=rng.choice(bad), intens=rng.choice(INTENSIFIERS),
        a_be="were" if a.endswith("s") else "was", b_be="were" if b.endswith("s") else "was",
        good_a=("an " if g1[0] in "aeiou" and not g1.startswith("use") else "a ") + g1,
        phrase=rng.choice(v["pos_phrase"] if label == "positive" else v["neg_phrase"]))
    return text[0].upper() + text[1:]


def _sentiment(rng: random.Random, split: str, forbidden: set[str]) -> tuple[str, set[str]]:
    """Return (file text, its sentences); the TSV is written by hand because multitune reads TSV
    without quoting, and no review holds a tab or a quote."""
    v = _vocabulary(split)

    def make(i: int) -> tuple:
        label = ("negative", "positive")[i % 2]
        sentence = _review(rng, label, v)
        return sentence, (label, sentence), (sentence,)

    rows = _draw_unique(SENTIMENT_SIZES[split], make, forbidden)
    rng.shuffle(rows)
    text = "label\tsentence\n" + "".join(f"{label}\t{sentence}\n" for label, sentence in rows)
    return text, {sentence for _, sentence in rows}


def _entity(rng: random.Random, kind: str, v: dict) -> tuple[list[str], list[str]]:
    """Return (untagged prefix tokens such as a title, entity tokens) for PER, LOC or ORG."""
    if kind == "LOC":
        return [], rng.choice(v["place"]).split()
    if kind == "ORG":
        return [], rng.choice(v["org"]).split()
    first, last, r = rng.choice(v["first"]), rng.choice(v["last"]), rng.random()
    if r < 0.6:
        return [], [first, last]
    if r < 0.75:
        return [], [first]
    if r < 0.9:
        return [rng.choice(TITLES)], [last]
    return [], [last]


def _ner_sentence(rng: random.Random, v: dict) -> list[tuple[str, str]]:
    fillers = {"{DAY}": DAYS, "{MONTH}": MONTHS, "{NUM}": NUMBERS, "{OBJECT}": OBJECTS}
    templates = NER_PLAIN_TEMPLATES if rng.random() < 0.15 else NER_TEMPLATES
    while True:
        pairs: list[tuple[str, str]] = []
        used: set[str] = set()
        for slot in rng.choice(templates).split():
            if slot in fillers:
                pairs.append((rng.choice(fillers[slot]), "O"))
            elif slot in ("{PER}", "{LOC}", "{ORG}"):
                prefix, words = _entity(rng, slot[1:-1], v)
                while " ".join(words) in used:  # two slots of one sentence name different things
                    prefix, words = _entity(rng, slot[1:-1], v)
                used.add(" ".join(words))
                pairs += [(w, "O") for w in prefix]
                pairs += [(w, ("B-" if j == 0 else "I-") + slot[1:-1]) for j, w in enumerate(words)]
            else:
                pairs.append((slot, "O"))
        if 6 <= len(pairs) <= 20:
            return pairs


def _ner(rng: random.Random, split: str, forbidden: set[str]) -> tuple[str, set[str]]:
    """Return (file text, its sentences as space-joined tokens)."""
    v = _vocabulary(split)

    def make(i: int) -> tuple:
        pairs = _ner_sentence(rng, v)
        sentence = " ".join(token for token, _ in pairs)
        return sentence, pairs, (sentence,)

    rows = _draw_unique(NER_SIZES[split], make, forbidden)
    text = "".join("".join(f"{token}\t{tag}\n" for token, tag in pairs) + "\n" for pairs in rows)
    return text, {" ".join(token for token, _ in pairs) for pairs in rows}


def _similarity_pair(rng: random.Random, band: int, v: dict) -> tuple[str, str, str]:
    topics = v["sim_topic"]
    topic = rng.choice(topics)
    event = rng.choice(topic)

    def slots() -> dict[str, str]:
        return {"p": f"{rng.choice(v['first'])} {rng.choice(v['last'])}", "l": rng.choice(v["place"]),
                "d": rng.choice(DAYS)}

    first, values, second = rng.choice(event), slots(), slots()
    if band == 0:  # paraphrase: another wording, same details
        template, second = rng.choice([t for t in event if t != first]), values
    elif band == 1:  # same event (either wording), one of its details changed
        template, second = rng.choice(event), dict(values)
        key = rng.choice([k for k in "pld" if "{" + k + "}" in first])
        while second[key] == values[key]:
            second[key] = slots()[key]
    elif band == 2:  # same topic, another event
        template = rng.choice(rng.choice([e for e in topic if e is not event]))
    else:  # another topic
        template = rng.choice(rng.choice(rng.choice([t for t in topics if t is not topic])))
    pair = [first.format(**values), template.format(**second)]
    rng.shuffle(pair)
    low, high = SIMILARITY_BANDS[band]
    return pair[0], pair[1], f"{rng.uniform(low, high):.1f}"


def _similarity(rng: random.Random, split: str, forbidden: set[str]) -> tuple[str, set[str]]:
    """Return (file text, every sentence of every pair)."""
    v = _vocabulary(split)

    def make(i: int) -> tuple:
        row = _similarity_pair(rng, i % len(SIMILARITY_BANDS), v)
        return row[:2], row, row[:2]

    rows = _draw_unique(SIMILARITY_SIZES[split], make, forbidden)
    rng.shuffle(rows)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue(), {sentence for row in rows for sentence in row[:2]}


def write_quickstart_data(out_dir: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write the three quickstart data sets under out_dir and return {task: {"train": path, "validation": path}}.

    Deterministic for a given seed (byte-identical files). Files are written atomically (temp file + os.replace).

    Files (UTF-8):

    * ``sentiment/{train,validation}.tsv``: header ``label<TAB>sentence``, labels ``negative``/``positive``.
    * ``ner/{train,validation}.conll``: ``token<TAB>tag`` lines, BIO tags over PER/LOC/ORG, a blank
      line after each sentence.
    * ``similarity/{train,validation}.csv``: no header, ``sentence1,sentence2,score`` with the score
      in [0, 5] written with one decimal.

    Args:
        out_dir: directory to write into; created if missing. Existing files are replaced.
        seed: seed of the ``random.Random`` that draws every example.

    Returns:
        The path of every file written, keyed by task name and then split name.
    """
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    paths: dict[str, dict[str, Path]] = {}
    for task, generate, ext in (("sentiment", _sentiment, "tsv"), ("ner", _ner, "conll"),
                                ("similarity", _similarity, "csv")):
        paths[task] = {}
        forbidden: set[str] = set()
        for split in SPLITS:  # train first: its sentences are forbidden in validation
            text, sentences = generate(rng, split, forbidden)
            forbidden = sentences
            paths[task][split] = out_dir / task / f"{split}.{ext}"
            write_text_atomic(paths[task][split], text)
    return paths
