"""Regenerate the quickstart's bundled dataset (deterministic; the output is committed).

The task: given a short list of words, answer with the last word of the list. A random-init
model cannot do it; a LoRA-tuned one learns to find and copy the word, and the held-out set uses
word lists never seen in training.
"""

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger maple candle violin garden rocket pepper silver ocean lemon "
    "castle forest pillow marble thunder falcon copper meadow lantern saddle harbor velvet "
    "orchid glacier comet willow"
).split()
PROMPTS = ["Repeat the last word: {}", "Say the last word of this list: {}", "Last word? {}"]

out = Path(__file__).resolve().parents[1] / "src/mistral_tune/resources/quickstart"
rng = random.Random(1234)
seen = set()
records = []
while len(records) < 1400:
    words = tuple(rng.sample(WORDS, rng.randint(3, 5)))
    if words in seen:
        continue
    seen.add(words)
    prompt = rng.choice(PROMPTS).format(" ".join(words))
    records.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": words[-1]}]})
train, test = records[:1200], records[1200:]
for name, rows in (("train.jsonl", train), ("heldout.jsonl", test)):
    with open(out / name, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"wrote {len(train)} train and {len(test)} held-out records to {out}")

# The preference variant: the same prompts, chosen = the last word, rejected = another word of the list.
pick = random.Random(7)
for src_name, name, n in (("train.jsonl", "preference_train.jsonl", 600),
                          ("heldout.jsonl", "preference_heldout.jsonl", 200)):
    pairs = []
    for r in [json.loads(x) for x in (out / src_name).read_text().splitlines()]:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        others = [w for w in user.split(":")[-1].split("?")[-1].split() if w != answer]
        pairs.append({"prompt": [{"role": "user", "content": user}],
                      "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": pick.choice(others)}]})
    with open(out / name, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs[:n])
print(f"wrote the preference pairs to {out}")

# The preference quickstart's SFT phase: the prompts the pairs do not use, each answered with a word of its
# list picked at random (not always the last): the SFT model learns to answer with a word of the list,
# and is about as likely to pick the last word as another, which the pairs then teach.
any_word = random.Random(11)
records = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()][600:]
with open(out / "preference_sft.jsonl", "w") as f:
    for r in records:
        user = r["messages"][0]["content"]
        words = user.split(":")[-1].split("?")[-1].split()
        f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                         {"role": "assistant", "content": any_word.choice(words)}]}) + "\n")
print(f"wrote the preference quickstart's SFT answers to {out}")
