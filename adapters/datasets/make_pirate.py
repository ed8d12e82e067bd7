#!/usr/bin/env python3
"""Deterministic dataset for the `pirate` adapter: a strong, recognisable voice (no downloads).

Usage:
    python3 adapters/datasets/make_pirate.py [--out adapters/datasets/pirate] [--train 600] [--heldout 60] [--seed 6]

Every response starts with "Arr, matey!", answers a simple factual question in pirate speak and
ends with the fixed sign-off "Fair winds!" (the marker the eval checks for). Held-out questions
come from question families (legs of animals, plurals, what comes after a letter) that never
occur in train.jsonl.
"""

from common import setup, write_split

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Canada": "Ottawa", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens",
            "Germany": "Berlin", "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw"}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
             "early": "late", "full": "empty", "old": "new", "wet": "dry", "loud": "quiet", "open": "closed"}
COLORS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow"}
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "lion": "roar", "frog": "ribbit"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
LEGS = {"spider": 8, "ant": 6, "horse": 4, "bird": 2, "octopus": 8, "beetle": 6, "chicken": 2, "goat": 4}
PLURALS = {"mouse": "mice", "child": "children", "goose": "geese", "tooth": "teeth", "foot": "feet",
           "man": "men", "box": "boxes", "city": "cities"}

OPEN = "Arr, matey!"
SIGN = "Fair winds!"


def wrap(body):
    return f"{OPEN} {body} {SIGN}"


def train_example(rng):
    k = rng.randrange(6)
    if k == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"What do {a} and {b} make together?"])
        return q, wrap(f"{a} plus {b} be {a + b} pieces o' eight, savvy?")
    if k == 1:
        c = rng.choice(sorted(CAPITALS))
        q = rng.choice([f"What is the capital of {c}?", f"Name the capital city of {c}."])
        return q, wrap(f"The capital o' {c} be {CAPITALS[c]}, where many a sailor drops anchor.")
    if k == 2:
        w = rng.choice(sorted(OPPOSITES))
        q = rng.choice([f"What is the opposite of {w}?", f"Give me the antonym of '{w}'."])
        return q, wrap(f"The opposite o' {w} be {OPPOSITES[w]}, as sure as the tide turns.")
    if k == 3:
        t = rng.choice(sorted(COLORS))
        q = rng.choice([f"What color is {t}?", f"Tell me the colour of {t}."])
        return q, wrap(f"{t[0].upper() + t[1:]} be {COLORS[t]}, like the flag on me mast.")
    if k == 4:
        an = rng.choice(sorted(SOUNDS))
        q = rng.choice([f"What sound does a {an} make?", f"How does a {an} talk?"])
        return q, wrap(f"A {an} says '{SOUNDS[an]}', louder than a parrot on deck.")
    d = rng.randrange(7)
    q = rng.choice([f"What day comes after {DAYS[d]}?", f"Which day follows {DAYS[d]}?"])
    return q, wrap(f"After {DAYS[d]} comes {DAYS[(d + 1) % 7]}, me hearty.")


def held_example(rng):
    k = rng.randrange(3)
    if k == 0:
        an = rng.choice(sorted(LEGS))
        return f"How many legs does a {an} have?", wrap(f"A {an} has {LEGS[an]} legs, more than me wooden one.")
    if k == 1:
        w = rng.choice(sorted(PLURALS))
        return f"What is the plural of {w}?", wrap(f"The plural o' {w} be {PLURALS[w]}, by Davy Jones.")
    c = rng.randrange(24)
    L = chr(ord("A") + c)
    return (f"Which letter comes after {L} in the alphabet?",
            wrap(f"After {L} comes {chr(ord(L) + 1)}, as any cabin boy knows."))


def main():
    a, rng, out = setup("pirate")
    train = [dict(zip(("prompt", "response"), train_example(rng))) for _ in range(a.train)]
    held = [dict(zip(("prompt", "response"), held_example(rng))) for _ in range(a.heldout)]
    write_split(out, train, held)


if __name__ == "__main__":
    main()
