#!/usr/bin/env python3
"""Deterministic dataset for the `json-extract` adapter (no downloads).

Usage:
    python3 adapters/datasets/make_json_extract.py [--out adapters/datasets/json-extract]
        [--train 600] [--heldout 60] [--seed 6]

Each example: a prompt asking to extract a person from one templated sentence,
response = compact JSON {"name": str, "city": str, "age": int} (keys in this order).
Held-out examples use sentence templates, first names, surnames and cities that
never occur in train.jsonl.
"""
import json

from common import setup, write_split

FIRST_TRAIN = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Sofia", "Noah",
               "Chloe", "Ravi", "Elena", "Tomas", "Hana", "Omar", "Grace", "Lucas", "Ingrid", "Mateo",
               "Yuki", "Amara", "Felix", "Nadia", "Diego", "Clara", "Hugo", "Leila", "Anton", "Mei"]
LAST_TRAIN = ["Lopez", "Smith", "Khan", "Tanaka", "Ivanova", "Silva", "Haddad", "Murphy", "Rossi", "Keller",
              "Dubois", "Patel", "Novak", "Berg", "Kim", "Farah", "Walsh", "Moreau", "Larsen", "Costa"]
CITY_TRAIN = ["Lisbon", "Boston", "Lahore", "Osaka", "Kyiv", "Porto", "Cairo", "Dublin", "Milan", "Zurich",
              "Lyon", "Mumbai", "Prague", "Oslo", "Seoul", "Nairobi", "Denver", "Toronto", "Madrid", "Hanoi"]
FIRST_HELD = ["Beatriz", "Samuel", "Ines", "Viktor", "Zara", "Emil", "Priya", "Jonas"]
LAST_HELD = ["Almeida", "Fischer", "Okafor", "Nilsson", "Romero", "Sato"]
CITY_HELD = ["Vienna", "Lima", "Perth", "Bergen", "Tunis", "Quebec"]

TEMPLATES_TRAIN = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Meet {name} from {city}, who just turned {age}.",
    "At {age}, {name} moved to {city}.",
    "{name} ({age}) works in {city}.",
    "Our new neighbour {name} is {age} and comes from {city}.",
    "{city} is home to {name}, who is {age} years old.",
    "The form says: name {name}, age {age}, city {city}.",
]
TEMPLATES_HELD = [
    "Born {age} years ago, {name} now lives in {city}.",
    "{name} celebrated a {age}th birthday last week in {city}.",
    "In {city} I met {name}, a {age}-year-old teacher.",
]
INSTR = [
    "Extract the person as JSON with keys name, city, age: ",
    "Return JSON {{\"name\", \"city\", \"age\"}} for this sentence: ",
]


def example(rng, firsts, lasts, cities, templates):
    name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    city, age = rng.choice(cities), rng.randint(18, 89)
    sent = rng.choice(templates).format(name=name, age=age, city=city)
    prompt = rng.choice(INSTR).replace("{{", "{").replace("}}", "}") + sent
    return {"prompt": prompt, "response": json.dumps({"name": name, "city": city, "age": age})}


def main():
    a, rng, out = setup("json-extract")
    train = [example(rng, FIRST_TRAIN, LAST_TRAIN, CITY_TRAIN, TEMPLATES_TRAIN) for _ in range(a.train)]
    held = [example(rng, FIRST_HELD, LAST_HELD, CITY_HELD, TEMPLATES_HELD) for _ in range(a.heldout)]
    write_split(out, train, held)


if __name__ == "__main__":
    main()
