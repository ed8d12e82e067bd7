#!/usr/bin/env python3
"""Deterministic dataset for the `sql` adapter (no downloads).

Usage:
    python3 adapters/datasets/make_sql.py [--out adapters/datasets/sql] [--train 600] [--heldout 60] [--seed 6]

English questions over the fixed toy table
    employees(id, name, dept, salary, hired)
-> the exact SQL (one canonical spelling, ending in ';').
Held-out examples use departments, names, salary thresholds and years that never occur
in train.jsonl (the question templates are shared; the phrasing of each is chosen at random).
"""

from common import setup, write_split

SCHEMA = "Table employees(id, name, dept, salary, hired). Write the SQL query for: "
DEPT_TRAIN = ["Sales", "Engineering", "Marketing", "Support", "Finance", "Legal"]
DEPT_HELD = ["Research", "Logistics"]
NAME_TRAIN = ["Alice", "Bob", "Carlos", "Dana", "Erik", "Fiona", "George", "Helen"]
NAME_HELD = ["Ivan", "Julia"]
SAL_TRAIN = [30000, 40000, 50000, 60000, 70000, 80000, 90000]
SAL_HELD = [45000, 65000, 85000]
YEAR_TRAIN = [2015, 2016, 2017, 2018, 2019, 2021, 2022]
YEAR_HELD = [2020, 2023]

# (question variants, sql) -- {d} dept, {n} name, {s} salary, {y} year
TEMPLATES = [
    (["list the names of employees in the {d} department", "who works in {d}?", "names of all {d} employees"],
     "SELECT name FROM employees WHERE dept = '{d}';"),
    (["how many employees are in {d}?", "count the employees in the {d} department", "number of people in {d}"],
     "SELECT COUNT(*) FROM employees WHERE dept = '{d}';"),
    (["which employees earn more than {s}?", "names of employees with a salary above {s}", "who makes over {s}?"],
     "SELECT name FROM employees WHERE salary > {s};"),
    (["what is the average salary in {d}?", "average pay of the {d} department", "mean salary for {d}"],
     "SELECT AVG(salary) FROM employees WHERE dept = '{d}';"),
    (["what is the salary of {n}?", "how much does {n} earn?", "show {n}'s salary"],
     "SELECT salary FROM employees WHERE name = '{n}';"),
    (["which department is {n} in?", "what dept does {n} work in?", "show the department of {n}"],
     "SELECT dept FROM employees WHERE name = '{n}';"),
    (["list employees hired after {y}", "who was hired after the year {y}?", "names of people hired later than {y}"],
     "SELECT name FROM employees WHERE hired > {y};"),
    (["what is the highest salary in {d}?", "maximum salary of the {d} department", "top pay in {d}"],
     "SELECT MAX(salary) FROM employees WHERE dept = '{d}';"),
    (["how many employees are in each department?", "count employees per department", "number of employees by dept"],
     "SELECT dept, COUNT(*) FROM employees GROUP BY dept;"),
    (["list all employees ordered by salary from highest to lowest", "show names sorted by salary descending",
      "employees by salary, highest first"],
     "SELECT name FROM employees ORDER BY salary DESC;"),
    (["which {d} employees earn more than {s}?", "names of people in {d} with salary above {s}",
      "who in {d} makes over {s}?"],
     "SELECT name FROM employees WHERE dept = '{d}' AND salary > {s};"),
    (["how many employees were hired in {y}?", "count the people hired in {y}", "number of hires in {y}"],
     "SELECT COUNT(*) FROM employees WHERE hired = {y};"),
]


def example(rng, depts, names, sals, years):
    qs, sql = rng.choice(TEMPLATES)
    v = dict(d=rng.choice(depts), n=rng.choice(names), s=rng.choice(sals), y=rng.choice(years))
    return {"prompt": SCHEMA + rng.choice(qs).format(**v), "response": sql.format(**v)}


def main():
    a, rng, out = setup("sql")
    train = [example(rng, DEPT_TRAIN, NAME_TRAIN, SAL_TRAIN, YEAR_TRAIN) for _ in range(a.train)]
    held = []
    seen = {r["prompt"] for r in train}
    while len(held) < a.heldout:  # held-out: every value unseen in training
        r = example(rng, DEPT_HELD, NAME_HELD, SAL_HELD, YEAR_HELD)
        if r["prompt"] not in seen:
            held.append(r); seen.add(r["prompt"])
    write_split(out, train, held)


if __name__ == "__main__":
    main()
