"""Several adapters on one base (`serve BASE --adapter NAME=PATH ...`): requests for different adapters
(LoRA and DoRA) and for the bare base are decoded together, in one pass a step, and each answer is
what its adapter merged into its own copy of the base decodes alone; adapters that cannot be stacked, or that were
trained on another base, are refused by name."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from export_fixtures import running_server, tiny_adapter, tiny_model
from mistral_tune.cli import main
from mistral_tune.errors import ModelError
from mistral_tune.generate.decoder import Decoder, End, Params, Token
from mistral_tune.models.multi_lora import MultiLoraLinear
from mistral_tune.models.peft_format import ADAPTER_CONFIG
from mistral_tune.models.tuned import load_tuned, load_with_adapters
from plain_decoding import plain_greedy

openai = pytest.importorskip("openai")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, one_thread) -> SimpleNamespace:
    """A base, two adapters of different ranks, scalings and target modules (the second DoRA), and each
    merged alone."""
    d = tmp_path_factory.mktemp("adapters")
    base = tiny_model(d / "tiny-base")
    one = tiny_adapter(base, d / "one", r=4, alpha=8, seed=1)
    two = tiny_adapter(base, d / "two", r=8, alpha=4, seed=2, use_rslora=True, use_dora=True,
                       target_modules=["q_proj", "v_proj", "down_proj"])
    merged = [load_tuned(p).model for p in (base, one, two)]  # merge_lora, each on its own copy of the base
    return SimpleNamespace(dir=d, base=base, adapters=[("one", one), ("two", two)], merged=merged)


@pytest.fixture(scope="module")
def served(tiny):
    return load_with_adapters(tiny.base, tiny.adapters)


def _passes(model) -> list[list[int]]:
    """Records, for each forward pass, the adapter each row used (0: none), read from the layers' mask."""
    layer = next(m for m in model.modules() if isinstance(m, MultiLoraLinear))
    seen: list[list[int]] = []

    def hook(module, args, out) -> None:
        mask = module.rows.mask
        used = (mask != 0).long()
        seen.append((used * module.rows.owner).max(dim=1).values.tolist())

    return seen, layer.register_forward_hook(hook)


def test_a_mixed_batch_decodes_as_each_adapter_merged_alone(tiny, served) -> None:
    prompts = [[1, 5, 6, 7], [1, 9, 9, 9, 9, 9, 9], [1, 3]]
    reqs = [(p, a, 3 + 2 * i + a) for i, p in enumerate(prompts) for a in (2, 0, 1)]  # they leave at different steps
    dec = Decoder(served.model, slots=len(reqs), capacity=64)
    got = [[] for _ in reqs]
    seen, handle = _passes(served.model)
    try:
        dec.add_many([(p, Params(n, adapter=a), got[i].append) for i, (p, a, n) in enumerate(reqs)])
        while dec.rows:
            dec.step()
    finally:
        handle.remove()
    assert sorted(seen[0]) == sorted(a for _, a, _ in reqs)  # one prefill: every row, the same prompt thrice
    assert sorted(set(seen[1])) == [0, 1, 2]  # one pass a step, all adapters in it
    for (p, a, n), items in zip(reqs, got, strict=True):
        assert [t.id for t in items if isinstance(t, Token)] == plain_greedy(tiny.merged[a], p, n), (p, a)
    assert len({tuple(plain_greedy(m, prompts[0], 6)) for m in tiny.merged}) == 3  # the adapters differ


@torch.no_grad()
def test_one_pass_of_mixed_rows_gives_peft_s_logits_for_each_row(tiny, served) -> None:
    """The reference we did not write: PEFT's model with each adapter (LoRA; DoRA) set, and with none."""
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny.base),
                                         tiny.adapters[0][1], adapter_name="one").eval()
    ref.load_adapter(tiny.adapters[1][1], adapter_name="two")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]] * 3)
    with served.model.model.layers[0].self_attn.q_proj.rows.selected(torch.tensor([0, 1, 2])):
        ours = served.model(ids)
    with ref.disable_adapter():
        want = [ref(ids[:1]).logits[0]]
    for name in ("one", "two"):
        ref.set_adapter(name)
        want.append(ref(ids[:1]).logits[0])
    torch.testing.assert_close(ours, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_a_kept_prefix_is_reused_by_its_own_adapter_only(tiny, served) -> None:
    dec = Decoder(served.model, slots=1, capacity=64)
    fed = []
    hook = served.model.model.embed_tokens.register_forward_hook(lambda m, i, o: fed.append(i[0].numel()))

    def answer(prompt: list[int], adapter: int) -> list[int]:
        items: list = []
        dec.add(prompt, Params(4, adapter=adapter), items.append)
        while dec.rows:
            dec.step()
        return [t.id for t in items if isinstance(t, Token)]

    try:
        first = answer([1, 5, 6, 7, 8], 1)
        prompt = [1, 5, 6, 7, 8, *first, 9]
        fed.clear()
        assert answer(prompt, 2) == plain_greedy(tiny.merged[2], prompt, 4)
        assert fed[0] == len(prompt)  # adapter one's keys were not reused for adapter two
        fed.clear()
        longer = [*prompt, 10, 11]
        assert answer(longer, 2) == plain_greedy(tiny.merged[2], longer, 4)
        assert fed[0] < len(prompt)  # its own were
    finally:
        hook.remove()


def test_an_adapter_the_model_does_not_have_fails_alone(served) -> None:
    dec = Decoder(served.model, slots=2, capacity=64)
    bad, good = [], []
    dec.add_many([([1, 5], Params(2, adapter=3), bad.append), ([1, 5], Params(2, adapter=2), good.append)])
    assert isinstance(bad[-1], End) and bad[-1].reason == "error" and "adapter 3" in str(bad[-1].error)
    assert isinstance(good[0], Token)


@pytest.fixture(scope="module")
def client(served):
    for host, port in running_server(served, max_batch=4, max_tokens_limit=64):
        yield openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=60)


def test_the_server_answers_each_model_in_one_batch(tiny, served, client) -> None:
    tok = served.tokenizer
    messages = [{"role": "user", "content": "Tell me a story"}]
    ids = tok.encode_prompt(messages)
    names = [served.name, "one", "two"]
    want = {n: tok.decode(plain_greedy(m, ids, 24, eos_id=tok.eos_id)) for n, m in zip(names, tiny.merged, strict=True)}
    got, start = {}, threading.Barrier(len(names))

    def ask(name: str) -> None:
        start.wait()  # all three arrive together: they share steps
        resp = client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)
        got[name] = (resp.model, resp.choices[0].message.content)

    seen, handle = _passes(served.model)
    try:
        threads = [threading.Thread(target=ask, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        handle.remove()
    assert got == {n: (n, want[n]) for n in names}
    assert any(sorted(set(rows)) == [0, 1, 2] for rows in seen)  # the three were decoded in one step
    chunks = list(client.chat.completions.create(model="one", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    assert {c.model for c in chunks} == {"one"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["one"]


def test_the_server_lists_its_models_and_refuses_others_by_name(served, client) -> None:
    assert [m.id for m in client.models.list()] == [served.name, "one", "two"]
    assert client.models.retrieve("two").parent == served.name
    with pytest.raises(openai.NotFoundError, match="'three'"):
        client.chat.completions.create(model="three", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="'three'"):
        client.models.retrieve("three")


def _refused(tiny, adapter: Path, *needles: str) -> None:
    with pytest.raises(ModelError) as err:
        load_with_adapters(tiny.base, [("one", tiny.adapters[0][1]), ("odd", adapter)])
    for needle in ("adapter odd", *needles):
        assert needle in str(err.value)


def test_adapters_that_cannot_be_stacked_are_refused(tiny) -> None:
    _refused(tiny, tiny_adapter(tiny.base, tiny.dir / "tokens", trainable_tokens={"embed_tokens": [5, 6]}),
             "trains token rows")
    _refused(tiny, tiny_adapter(tiny.base, tiny.dir / "whole", modules_to_save=["lm_head"]), "lm_head")
    qlora = tiny_adapter(tiny.base, tiny.dir / "qlora")
    (qlora / "base_quantization.json").write_text('{"quant_type": "nf4"}')
    _refused(tiny, qlora, "NF4")


def test_adapters_of_another_base_are_refused(tiny) -> None:
    other = tiny_model(tiny.dir / "other-base", hidden_size=32, intermediate_size=64)
    adapter = tiny_adapter(other, tiny.dir / "elsewhere")
    _refused(tiny, adapter, "trained on", "other-base", ADAPTER_CONFIG)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(tiny.base)}))
    _refused(tiny, adapter, "down_proj.lora_A.weight has shape (4, 64)", "imply (4, 128)")
    with pytest.raises(ModelError, match="is an adapter"):
        load_with_adapters(tiny.adapters[0][1], [("two", tiny.adapters[1][1])])


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "one"], "expected NAME=PATH"),
    (["--adapter", "=x"], "expected NAME=PATH"),
    (["--adapter", "tiny-base=x"], "'tiny-base' is taken"),
    (["--adapter", "a=x", "--adapter", "a=y"], "'a' is taken"),
    (["--adapter", "a=x", "--engine", "llama.cpp"], "--engine torch only"),
])
def test_serve_refuses_unusable_adapter_flags(tiny, capsys, flags, message) -> None:
    assert main(["serve", str(tiny.base), *flags]) == 2
    assert message in capsys.readouterr().err
