"""Write the shipped chat data (examples/data/chat/*.jsonl): short conversations with answers that can be
checked exactly, generated from hand-written templates with a seeded random generator.

    python examples/data/chat/make_chat_data.py            # rewrites the files next to this script
    python examples/data/chat/make_chat_data.py OUT_DIR    # or writes them into OUT_DIR

Skills: unit conversion (``350 centimetres``), weekday arithmetic (``Thursday``) and extracting one field of a
record (``Porto``). ``train.jsonl`` / ``validation.jsonl`` mix conversion and weekdays in one- to three-turn
conversations, some with a system prompt; ``tasks.jsonl`` holds two tasks told apart by its ``task`` column
(``weekday``, ``extract``). The same seed writes the same files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 0
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
#: (from unit, to unit, factor)
UNITS = [("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("litres", "millilitres", 1000), ("minutes", "seconds", 60),
         ("days", "hours", 24), ("centimetres", "millimetres", 10)]
ASK_UNITS = ["How many {to} are in {v} {frm}?", "Convert {v} {frm} to {to}.", "What is {v} {frm} in {to}?",
             "{v} {frm} is how many {to}?"]
FOLLOW_UNITS = ["And {v} {frm}?", "What about {v} {frm}?", "Now do {v} {frm}."]
ASK_AHEAD = ["Today is {day}. What day of the week will it be in {n} days?",
             "If today is {day}, which weekday is it {n} days from now?",
             "It is {day}. What day is it after {n} days?"]
ASK_BACK = ["Today is {day}. What day of the week was it {n} days ago?",
            "If today is {day}, which weekday was it {n} days ago?"]
SYSTEMS = ["You are a precise assistant. Answer with the result only.",
           "Reply with the answer and nothing else.",
           "You convert units and count weekdays. Give only the answer."]
FIRST = ["Lena", "Tomas", "Amara", "Kenji", "Sofia", "Piotr", "Nadia", "Omar", "Ines", "Henrik", "Maya", "Luca"]
LAST = ["Ortiz", "Novak", "Okafor", "Sato", "Berg", "Kowalski", "Haddad", "Rossi", "Silva", "Lund", "Moreau"]
CITIES = ["Porto", "Lyon", "Krakow", "Nairobi", "Osaka", "Quito", "Tampere", "Leeds", "Graz", "Cork", "Perth",
          "Tunis", "Bergen", "Valencia", "Gdansk", "Izmir"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
FIELDS = ["name", "city", "year", "colour"]


def _number(rng: random.Random) -> float:
    return rng.choice([rng.randint(1, 20), rng.randint(1, 19) + 0.5])


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def conversion(rng: random.Random) -> list[dict]:
    """One conversion question, sometimes with one or two follow-ups in the same units."""
    frm, to, factor = rng.choice(UNITS)
    v = _number(rng)
    turns = [rng.choice(ASK_UNITS).format(v=_shown(v), frm=frm, to=to), f"{_shown(v * factor)} {to}"]
    for _ in range(rng.choice([0, 0, 1, 2])):
        v = _number(rng)
        turns += [rng.choice(FOLLOW_UNITS).format(v=_shown(v), frm=frm), f"{_shown(v * factor)} {to}"]
    return _messages(turns)


def weekday(rng: random.Random, multi_turn: bool = True) -> list[dict]:
    """A weekday question: directly, or with today's day said first and acknowledged."""
    day, n = rng.randrange(7), rng.randint(1, 30)
    back = rng.random() < 0.3
    answer = DAYS[(day - n) % 7] if back else DAYS[(day + n) % 7]
    if multi_turn and rng.random() < 0.4:
        ask = f"What day was it {n} days ago?" if back else f"What day will it be in {n} days?"
        return _messages([f"Today is {DAYS[day]}.", f"Noted: today is {DAYS[day]}.", ask, answer])
    return _messages([rng.choice(ASK_BACK if back else ASK_AHEAD).format(day=DAYS[day], n=n), answer])


def extraction(rng: random.Random) -> list[dict]:
    """A record of four fields in a random order, and a question for one of them."""
    values = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "city": rng.choice(CITIES),
              "year": str(rng.randint(1950, 2024)), "colour": rng.choice(COLOURS)}
    order = rng.sample(FIELDS, len(FIELDS))
    record = "; ".join(f"{k}={values[k]}" for k in order)
    wanted = rng.choice(FIELDS)
    return _messages([f"Record: {record}\nWhat is the {wanted}?", values[wanted]])


def _messages(turns: list[str]) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _with_system(rng: random.Random, messages: list[dict], share: float) -> list[dict]:
    if rng.random() < share:
        return [{"role": "system", "content": rng.choice(SYSTEMS)}, *messages]
    return messages


def mixed(rng: random.Random, n: int) -> list[dict]:
    """``n`` rows of the assistant task: conversions and weekdays, a third with a system prompt."""
    rows = []
    for _ in range(n):
        messages = conversion(rng) if rng.random() < 0.6 else weekday(rng)
        rows.append({"messages": _with_system(rng, messages, 1 / 3)})
    return rows


def two_tasks(rng: random.Random, n: int) -> list[dict]:
    """``n`` rows for each of the tasks ``weekday`` and ``extract``, interleaved, named in a ``task`` column."""
    rows = []
    for _ in range(n):
        rows.append({"task": "weekday", "messages": weekday(rng, multi_turn=False)})
        rows.append({"task": "extract", "messages": extraction(rng)})
    return rows


def write_chat_data(out: Path) -> dict[str, int]:
    """Write ``train.jsonl`` (360 rows), ``validation.jsonl`` (60) and ``tasks.jsonl`` (2 x 160) into ``out``.

    Returns:
        File name -> rows written.
    """
    rng = random.Random(SEED)
    files = {"train.jsonl": mixed(rng, 360), "validation.jsonl": mixed(rng, 60), "tasks.jsonl": two_tasks(rng, 160)}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(out / name, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for file, count in write_chat_data(target).items():
        print(f"{target / file}: {count} rows")
