"""The decoding engine: every sequence being generated, decoded together one token per step.

`Decoder` owns a model's `SlotCache` and the per-slot state of the running sequences (next input
token, length, sampling settings, grammar mask), all in fixed device buffers. Sequences are
prefilled in batches as they arrive, take the lowest free slots, and leave when they end; the last
running sequence moves into a leaving one's slot, so the running ones are always slots 0..n-1. A
decoding step then works on the first `bucket(n)` slots and the first `bucket(longest)` cached
positions: on a GPU each (batch bucket, length bucket, sampling modes) is captured once as a CUDA
graph and replayed, so a step costs one launch instead of one per kernel.

What a sequence produces goes to its `sink`, called on the decoding thread with a `Token` for each
new token and an `End` last. A slot that a sequence leaves keeps its tokens' keys until it is
reused: a later prompt that begins the same way (the next turn of a conversation) computes only
what follows the common prefix, and `n` sequences of one prompt share one prefill.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..models.lora import ADAPTER_LAYERS
from ..models.multi_lora import adapter_rows
from .cache import SlotCache
from .sampling import MAX_TOP_LOGPROBS, Choice, Modes, pick

#: Tokens a batched prefill computes at once (its rows padded to the longest): a bound on the
#: activations of one prefill, however many prompts arrive together.
PREFILL_TOKENS = 16384


@dataclass(frozen=True)
class Params:
    """How one sequence is generated. temperature 0: greedy. top_k 0: no limit. logprobs: None for
    none, 0 for the chosen token's, k (at most 20) for the k most likely tokens' too. constraint: a
    grammar's mask of allowed tokens (generate/constrain.py). stop_token_ids end the sequence as the
    end-of-sequence token does (neither is sent). seed: None draws one. adapter: which of the model's
    several adapters (models/multi_lora.py, numbered from 1) the sequence uses; 0: the base."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None
    constraint: object | None = None
    stop_token_ids: tuple[int, ...] = ()
    adapter: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")


@dataclass(frozen=True)
class Token:
    """A new token; with Params.logprobs its log-probability under the model and the `top` most likely
    (id, log-probability) pairs."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class End:
    """The last item a sink gets. reason: "stop" (end of sequence or a stop token), "length"
    (max_tokens, or the cache's capacity), "cancelled", "error" (see error)."""

    reason: str
    error: BaseException | None = None


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: Params
    sink: Callable[[Token | End], None]
    stops: frozenset[int] = frozenset()
    count: int = 0
    cancelled: bool = False
    ended: bool = False
    tokens: list[int] = field(default_factory=list)


def bucket(n: int, limit: int) -> int:
    """The captured size that serves n: the next power of two, at most limit."""
    return min(limit, 1 << max(0, n - 1).bit_length())


def _adapter_state(model: torch.nn.Module) -> tuple:
    """What a captured graph baked in that can change between calls: which adapters are on."""
    return tuple(bool(m.disabled) for m in model.modules() if isinstance(m, ADAPTER_LAYERS))


class Decoder:
    """Decodes sequences added with `add` one step at a time (`step`), on the calling thread.

    slots: the most sequences decoded together; capacity: the most tokens (prompt and answer) a
    sequence may hold. graphs: replay captured CUDA graphs (default: on a GPU, outside autocast).
    lockstep: the model's weights are sharded over processes that must run the same forward passes
    (each is a collective): every addition is one prefill pass, no graphs, and `idle_step` runs a
    pass for a process whose own sequences have all ended.
    """

    def __init__(self, model, slots: int = 16, capacity: int = 4096, graphs: bool | None = None,
                 lockstep: bool = False) -> None:
        cfg = model.config
        self.model, self.slots, self.capacity = model, slots, capacity
        self.device = model.lm_head.weight.device
        self.vocab = cfg.vocab_size
        self.cache = SlotCache(cfg, slots, capacity, self.device)
        dev = self.device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)  # each slot's next input
        self.lengths = torch.zeros(slots, dtype=torch.long, device=dev)  # tokens each slot holds
        self.active = torch.zeros(slots, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(slots, device=dev)
        self.top_p = torch.ones(slots, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self.seed = torch.zeros(slots, dtype=torch.long, device=dev)
        self.counter = torch.zeros(slots, dtype=torch.long, device=dev)
        self.bitmask = torch.full((slots, (self.vocab + 31) // 32), -1, dtype=torch.int32, device=dev)
        self.adapters = adapter_rows(model)  # several adapters on the base, chosen per sequence; or None
        self.adapter = torch.zeros(slots, dtype=torch.long, device=dev)  # each slot's adapter (0: the base)
        self.rows: list[Sequence] = []  # the sequence in each running slot, in slot order
        self.held: list[list[int]] = [[] for _ in range(slots)]  # the tokens whose keys each slot holds
        self.held_adapter = [0] * slots  # the adapter those keys were computed with
        self.graphs, self.lockstep = graphs, lockstep
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Choice]] = {}
        self._pool = None
        self._state: tuple = ((), None)
        # Seeds for requests that bring none, from the OS: torch.seed() would reseed the global generator,
        # and a training run's dropout masks after an evaluation or a rollout would no longer repeat on resume.
        self._seeds = torch.Generator()
        self._seeds.seed()

    # ------------------------------------------------------------------ adding sequences

    def free(self) -> int:
        return self.slots - len(self.rows)

    def add(self, prompt: list[int], params: Params, sink: Callable[[Token | End], None],
            eos_id: int | None = None) -> Sequence:
        """Prefill and start one sequence (add_many for several: they share prefills)."""
        return self.add_many([(prompt, params, sink)], eos_id)[0]

    @torch.no_grad()
    def add_many(self, requests: list[tuple[list[int], Params, Callable]], eos_id: int | None = None
                 ) -> list[Sequence]:
        """Start sequences (at most free() of them): prefill their prompts, send each its first token.
        A prompt that does not fit the cache ends its sequence with an error at once."""
        if len(requests) > self.free():
            raise ValueError(f"{len(requests)} sequences for {self.free()} free slots")
        seqs = []
        for prompt, params, sink in requests:
            stops = frozenset(params.stop_token_ids) | ({eos_id} if eos_id is not None else set())
            seqs.append(Sequence(list(prompt), params, sink, stops))
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        self._state = (_adapter_state(self.model), autocast)  # what captured graphs bake in
        ok, adapters = [], len(self.adapters.names) if self.adapters is not None else 0
        for s in seqs:
            if not 0 <= s.params.adapter <= adapters:
                self._end(s, End("error", ValueError(f"adapter {s.params.adapter}: the model has {adapters}")))
            elif not s.prompt:
                self._end(s, End("error", ValueError("an empty prompt")))
            elif len(s.prompt) >= self.capacity:
                self._end(s, End("error", ValueError(
                    f"a prompt of {len(s.prompt)} tokens does not fit the cache ({self.capacity} tokens)")))
            else:
                ok.append(s)
        if not ok:
            return seqs
        with self._eval():
            try:
                self._start(ok)
            except Exception as exc:  # out of memory, a failing model: these fail, the running ones go on
                mine = [i for i, r in enumerate(self.rows) if r in ok]
                for s in ok:
                    if not s.ended:
                        self._end(s, End("error", exc))
                for i in mine:
                    self.held[i] = []
                self._leave(mine)
        return seqs

    def _start(self, seqs: list[Sequence]) -> None:
        first = len(self.rows)
        slots = list(range(first, first + len(seqs)))
        # Where each prompt's keys may already be: the free slot sharing the longest prefix with it.
        # Candidates are free slots not yet written in this pass (targets of earlier sequences are not).
        plans, taken = [], set(slots)  # (seq, slot, reused prefix length)
        for s, slot in zip(seqs, slots, strict=True):
            taken.discard(slot)
            best, common = slot, 0
            for f in range(first, self.slots):
                usable = not self.lockstep and f not in taken and self.held_adapter[f] == s.params.adapter
                c = _common_prefix(self.held[f], s.prompt) if usable else 0
                if c > common:
                    best, common = f, c
            taken.add(slot)
            common = min(common, len(s.prompt) - 1)  # at least one token is fed, for its logits
            if best != slot and common:
                self.cache.copy(best, slot, common)
            taken.add(best)
            plans.append((s, slot, common))
        for _, slot, _ in plans:
            self.held[slot] = []
        logits = self._prefill_all(plans)
        for s, slot, _ in plans:
            self._place(s, slot)
            self.held[slot], self.held_adapter[slot] = list(s.prompt), s.params.adapter
        self.rows.extend(seqs)
        index = torch.tensor(slots, device=self.device)
        modes = self._modes([s.params for s in seqs])
        if modes.masked:
            self._fill_masks(slots, seqs)
        choice = pick(torch.stack(logits), modes, self.temperature[index], self.top_p[index], self.top_k[index],
                      self.seed[index], self.counter[index], self.bitmask[index])
        self.tokens[index] = choice.tokens
        self.counter[index] += 1
        self._finish_step(choice, slots)

    def _prefill_all(self, plans) -> list[torch.Tensor]:
        """Each plan's last-position logits: fresh prompts in right-padded batches, identical prompts
        (for one adapter) once, prompts continuing a kept prefix one at a time."""
        out: dict[int, torch.Tensor] = {}
        fresh: dict[tuple, list[int]] = {}
        for i, (s, slot, common) in enumerate(plans):
            if common:
                out[i] = self._prefill([s.prompt[common:]], [slot], common, [s.params.adapter])[0]
            else:
                fresh.setdefault((s.params.adapter, tuple(s.prompt)), []).append(i)
        groups = sorted(fresh.items(), key=lambda kv: len(kv[0][1]))
        limit = PREFILL_TOKENS
        if self.adapters is not None:  # rows of several adapters must not reach the MLP's token chunks
            limit = min(limit, self.model.options.mlp_chunk_tokens)
        batch: list[tuple[tuple, list[int]]] = []
        for item in groups + [None]:
            if item is not None and (not batch or self.lockstep or (len(batch) + 1) * len(item[0][1]) <= limit):
                batch.append(item)
                continue
            if batch:
                rows = [plans[idx[0]][1] for _, idx in batch]
                logits = self._prefill([list(p) for (_, p), _ in batch], rows, 0, [a for (a, _), _ in batch])
                for ((_, prompt), idx), lg in zip(batch, logits, strict=True):
                    for j, i in enumerate(idx):
                        if j:  # the same prompt again: its keys are copied, not computed
                            self.cache.copy(plans[idx[0]][1], plans[i][1], len(prompt))
                        out[i] = lg
            batch = [item] if item is not None else []
        return [out[i] for i in range(len(plans))]

    def _prefill(self, prompts: list[list[int]], slots: list[int], start: int, adapters: list[int]
                 ) -> list[torch.Tensor]:
        """Forward prompts (continuing their slots' first `start` positions), each with its adapter;
        each one's last logits."""
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=self.device)
        positions = torch.arange(start, start + longest, device=self.device).expand(len(prompts), longest)
        self.cache.prefill(torch.tensor(slots, device=self.device), start, longest)
        with self._adapters_for(torch.tensor(adapters, device=self.device)):
            h = self.model.hidden_states(ids, position_ids=positions, kv_cache=self.cache)
        last = h[torch.arange(len(prompts), device=self.device), torch.tensor([len(p) - 1 for p in prompts])]
        return list(self.model.lm_head(last).float())

    def _place(self, s: Sequence, slot: int) -> None:
        p = s.params
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        self.lengths[slot] = len(s.prompt)
        self.active[slot] = 1
        self.temperature[slot] = p.temperature
        self.top_p[slot] = p.top_p
        self.top_k[slot] = p.top_k
        self.seed[slot] = seed
        self.counter[slot] = 0
        self.bitmask[slot] = -1
        self.adapter[slot] = p.adapter

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running sequence; those that end leave."""
        if not self.rows:
            return
        n = len(self.rows)
        with self._eval():
            try:
                batch = bucket(n, self.slots)
                keys = bucket(max(len(s.prompt) + s.count for s in self.rows) + 1, self.capacity)
                modes = self._modes([s.params for s in self.rows])
                if modes.masked:
                    self._fill_masks(list(range(n)), self.rows)
                choice = self._run(batch, keys, modes)
            except Exception as exc:  # the step failed (out of memory): its sequences fail, the engine goes on
                self.abort(exc)
                return
        for i in range(n, batch):
            self.held[i] = []  # a padding row wrote its position 0
        self._finish_step(choice, list(range(n)))

    def _step_fn(self, batch: int, keys: int, modes: Modes) -> Choice:
        """The decoding step as device work only (what a CUDA graph captures)."""
        positions = self.lengths[:batch]
        self.cache.decode(batch, keys, positions)
        with self._adapters_for(self.adapter[:batch]):
            h = self.model.hidden_states(self.tokens[:batch, None], position_ids=positions[:, None],
                                         kv_cache=self.cache)
        logits = self.model.lm_head(h[:, -1]).float()
        choice = pick(logits, modes, self.temperature[:batch], self.top_p[:batch], self.top_k[:batch],
                      self.seed[:batch], self.counter[:batch], self.bitmask[:batch])
        self.tokens[:batch] = choice.tokens
        self.lengths[:batch] += self.active[:batch]
        self.counter[:batch] += self.active[:batch]
        return choice

    def _run(self, batch: int, keys: int, modes: Modes) -> Choice:
        if not self._use_graphs():
            return self._step_fn(batch, keys, modes)
        key = (self._state, batch, keys, modes)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, keys, modes, self._state[1])
        graph, choice = self._graphs[key]
        graph.replay()
        return choice

    def drop(self, seq: Sequence) -> None:
        """End a running sequence now, from the decoding thread (no step needed); harmless once it has
        ended."""
        if seq.ended or seq not in self.rows:
            return
        slot = self.rows.index(seq)
        self.held[slot] = self.held[slot][:-1]  # the token it would have fed next has no keys yet
        self._end(seq, End("cancelled"))
        self._leave([slot])

    def forget(self) -> None:
        """Drop the keys kept for prefix reuse: the model's weights or its adapters' state may have
        changed since they were computed (a training step, an evaluation of the base)."""
        self.held = [[] for _ in range(self.slots)]

    def abort(self, error: BaseException) -> None:
        """End every running sequence with an error (the decoder is going away)."""
        for seq in self.rows:
            self._end(seq, End("error", error))
        self.forget()
        self._leave(list(range(len(self.rows))))

    def idle_step(self) -> None:
        """A decoding pass with no sequence in it (lockstep: the others' passes go on)."""
        with torch.no_grad(), self._eval():
            self._step_fn(1, 1, Modes())
        self.held[0] = []

    def _use_graphs(self) -> bool:
        if self.lockstep:
            return False
        return self.graphs if self.graphs is not None else self.device.type == "cuda"

    def _capture(self, batch: int, keys: int, modes: Modes, autocast: torch.dtype | None
                 ) -> tuple[torch.cuda.CUDAGraph, Choice]:
        """A CUDA graph of one step. The warm-up run's effects on the step's state are undone (its
        writes to the cache land where the real step writes again). Under autocast the casts are
        captured too, so autocast's cache of cast weights must be off while capturing."""
        if autocast is not None:
            with torch.autocast("cuda", dtype=autocast, cache_enabled=False):
                return self._capture(batch, keys, modes, None)
        saved = [t.clone() for t in (self.tokens, self.lengths, self.counter)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step_fn(batch, keys, modes)
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip((self.tokens, self.lengths, self.counter), saved, strict=True):
            t.copy_(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            choice = self._step_fn(batch, keys, modes)
        return graph, choice

    # ------------------------------------------------------------------ after a step

    def _finish_step(self, choice: Choice, slots: list[int]) -> None:
        """Send each sequence in `slots` its token (one read of the step's results); end those that
        are done and let them leave."""
        tokens = choice.tokens[:len(slots)].tolist()
        finite = choice.finite[:len(slots)].tolist()
        logprob = top_ids = top_lp = None
        if choice.logprob is not None:
            logprob = choice.logprob[:len(tokens)].tolist()
            top_ids, top_lp = choice.top_ids[:len(tokens)].tolist(), choice.top_logprobs[:len(tokens)].tolist()
        leaving = []
        for j, slot in enumerate(slots):
            s = self.rows[slot]
            token = tokens[j]
            if s.cancelled:
                self._end(s, End("cancelled"))
            elif not finite[j]:
                self._end(s, End("error", FloatingPointError(
                    "the model's output is not finite (NaN or infinite logits): its weights may have diverged")))
            elif token in s.stops:
                self._end(s, End("stop"))
            else:
                k = s.params.logprobs
                item = Token(token) if k is None else Token(
                    token, logprob[j], tuple(zip(top_ids[j][:k], top_lp[j][:k], strict=True)))
                grammar = s.params.constraint
                if grammar is not None:
                    try:
                        grammar.accept(token)
                    except Exception as exc:  # a token the grammar refuses: this sequence fails alone
                        self._end(s, End("error", exc))
                        leaving.append(slot)
                        continue
                s.count += 1
                s.tokens.append(token)
                s.sink(item)
                if grammar is not None and grammar.finished:
                    self._end(s, End("stop"))  # complete: only the end of sequence could follow
                elif s.count < s.params.max_tokens and len(s.prompt) + s.count < self.capacity:
                    self.held[slot].append(token)
                    continue
                else:
                    self._end(s, End("length"))
            leaving.append(slot)
        self._leave(leaving)

    def _leave(self, slots: list[int]) -> None:
        """The sequences in these slots leave; the last running ones move into their places."""
        for slot in sorted(slots, reverse=True):
            last = len(self.rows) - 1
            if slot != last:
                n = len(self.held[last])
                self.cache.copy(last, slot, n)
                for t in (self.tokens, self.lengths, self.active, self.temperature, self.top_p, self.top_k,
                          self.seed, self.counter, self.bitmask, self.adapter):
                    t[slot] = t[last]
                self.rows[slot] = self.rows[last]
                self.held_adapter[slot] = self.held_adapter[last]
                # Both slots now hold the moved sequence's keys, but for the token it will feed next.
                self.held[slot], self.held[last] = list(self.held[last]), self.held[last][:-1]
            self.rows.pop()
            self.active[last] = 0
            self.lengths[last] = 0

    def _end(self, s: Sequence, end: End) -> None:
        s.ended = True
        s.sink(end)

    # ------------------------------------------------------------------ helpers

    def _modes(self, params: list[Params]) -> Modes:
        return Modes(sample=any(p.temperature > 0 for p in params),
                     filter=any(p.temperature > 0 and (p.top_p < 1 or p.top_k > 0) for p in params),
                     masked=any(p.constraint is not None for p in params),
                     logprobs=any(p.logprobs is not None for p in params))

    def _fill_masks(self, slots: list[int], seqs: list[Sequence]) -> None:
        host = torch.full((len(slots), self.bitmask.shape[1]), -1, dtype=torch.int32)
        for j, s in enumerate(seqs):
            c = s.params.constraint
            if c is not None:
                host[j] = 0  # tokens past the grammar's vocabulary stay disallowed
                c.fill_mask(host[j])
        self.bitmask[torch.tensor(slots, device=self.device)] = host.to(self.device)

    def _adapters_for(self, index: torch.Tensor) -> contextlib.AbstractContextManager:
        """The pass's rows use these adapters (0: the base), when the model has several."""
        return self.adapters.selected(index) if self.adapters is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model, slots: int, capacity: int, lockstep: bool = False) -> Decoder:
    """The model's decoder, kept between calls (its cache and captured graphs are the costly part),
    replaced by one of this call's size when it is too small (not by a union of sizes: a long-context
    call of few rows and a wide one of short rows would make a cache of many long rows). Keys kept
    by an earlier call are forgotten: the weights may have changed since."""
    d = _shared.get(model)
    if (d is None or d.slots < slots or d.capacity < capacity or d.device != model.lm_head.weight.device
            or d.lockstep != lockstep or d.rows):
        _shared.pop(model, None)
        del d
        d = _shared[model] = Decoder(model, slots, -(-capacity // 256) * 256, lockstep=lockstep)
    d.forget()
    return d
