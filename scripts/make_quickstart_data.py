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

# The preference quickstart (`mistral-tune quickstart --method dpo`): prompts asking for one word of a list.
# Its SFT phase answers with a word of the list picked at random, so the SFT model answers with a word of
# the list but favours no kind of word; its pairs prefer a word for a thing of nature (chosen) to a word
# for a made thing (rejected) of the same list. Held-out pairs use the held-out records' lists.
NATURE = set("apple river stone cloud tiger maple pepper ocean lemon forest thunder falcon meadow orchid glacier "
             "comet willow".split())
MADE = set(WORDS) - NATURE
ASK = ["Pick one word from this list: {}", "Name a word of this list: {}", "One word from: {}"]
ask, pick, any_word = random.Random(3), random.Random(7), random.Random(11)
lists = {name: [r["messages"][0]["content"].split(":")[-1].split("?")[-1].split()
                for r in map(json.loads, (out / name).read_text().splitlines())]
         for name in ("train.jsonl", "heldout.jsonl")}
for name, words_of in (("preference_train.jsonl", lists["train.jsonl"][:600]),
                       ("preference_heldout.jsonl", lists["heldout.jsonl"])):
    pairs = []
    for words in words_of:
        nature, made = [w for w in words if w in NATURE], [w for w in words if w in MADE]
        if nature and made:
            pairs.append({"prompt": [{"role": "user", "content": ask.choice(ASK).format(" ".join(words))}],
                          "chosen": [{"role": "assistant", "content": pick.choice(nature)}],
                          "rejected": [{"role": "assistant", "content": pick.choice(made)}]})
    with open(out / name, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
with open(out / "preference_sft.jsonl", "w") as f:
    for words in lists["train.jsonl"][600:]:
        f.write(json.dumps({"messages": [{"role": "user", "content": ask.choice(ASK).format(" ".join(words))},
                                         {"role": "assistant", "content": any_word.choice(words)}]}) + "\n")
print(f"wrote the preference quickstart's pairs and SFT answers to {out}")
